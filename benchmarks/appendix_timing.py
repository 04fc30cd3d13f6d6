"""What the seed's appendix D/E options cost per recovery step (and per generated image): a Markdown table.

    python benchmarks/appendix_timing.py                                   # CPU, 32 px, small batch
    python benchmarks/appendix_timing.py --device cuda --res 224 --batch 100 --iters 10 \
        --clip openai/clip-vit-base-patch32 --t2i stabilityai/sdxl-turbo    # what gpu_check.sh section 6 runs

Rows: SRe2L's step (ResNet-18 primary = BN teacher, randomly initialised: speed does not depend on training) with
pixels, with ``--param multires`` (DAS's sum of sides 1, 5, ..., full), with DAS's view noise, and with the CLIP prior
when ``--clip`` loads (a local folder or a cached id; never downloaded); then seconds per image of ``--t2i``'s
text-to-image model when it loads. A model that does not load is a row saying why, not a failure.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from recover_speed import make_teachers  # noqa: E402

from prismdd.core.data import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo  # noqa: E402
from prismdd.core.errors import PrismError  # noqa: E402
from prismdd.methods.engine import Engine, Teacher  # noqa: E402
from prismdd.methods.params import multires_sides  # noqa: E402
from prismdd.methods.priors import make_priors  # noqa: E402
from prismdd.stages.recover import recover_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--clip", default="", help="a CLIP folder or cached id for the CLIP-prior row ('' = skip)")
    p.add_argument("--t2i", default="", help="a diffusers text-to-image folder or cached id ('' = skip)")
    p.add_argument("--t2i-images", type=int, default=4)
    p.add_argument("--t2i-steps", type=int, default=None, help="denoising steps (default: the model family's)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    teachers = {"resnet18": make_teachers(["resnet18"], 1.0, a.res, 3, a.classes)["resnet18"].to(dev)}
    names = [f"class {i}" for i in range(a.classes)]
    info = DatasetInfo("bench", names, 3, a.res, IMAGENET_MEAN, IMAGENET_STD)
    x0 = torch.randn(a.batch, 3, a.res, a.res, generator=torch.Generator().manual_seed(0)).clamp(-2, 2).to(dev)
    units = [(i % a.classes, 0) for i in range(a.batch)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step_seconds(**settings) -> float:
        cfg = recover_config("sre2l", iterations=a.iters, log_every=10 ** 9, channels_last=dev.type == "cuda",
                             device=a.device, **settings)
        priors = make_priors(cfg, info, dev)  # the CLIP model loads here, outside the timing
        ts = {k: Teacher(k, m, {}, "") for k, m in teachers.items()}
        with ExitStack() as stack:
            eng = Engine(cfg, info, ts["resnet18"], ts, dev, stack, priors=priors)
            eng.run_batch(0, units, ["resnet18"], x0, None)  # warm-up (cuDNN autotuning, allocator)
            sync()
            t = time.perf_counter()
            eng.run_batch(0, units, ["resnet18"], x0, None)
            sync()
        return (time.perf_counter() - t) / a.iters

    print(f"SRe2L step, ResNet-18 (width 1, random), {a.res} px, batch {a.batch}, {a.iters} iterations, device "
          f"{torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| recovery | s / step | vs pixels |\n|---|---|---|")
    sides = multires_sides(a.res, 4)
    rows = [("pixels", {}), (f"--param multires ({len(sides)} components)", {"param": "multires"}),
            ("--param multires --view-noise 0.2", {"param": "multires", "view_noise": 0.2})]
    if a.clip:
        rows.append((f"--clip-prior {a.clip}", {"clip_prior": a.clip}))
    base = None
    for name, settings in rows:
        try:
            t = step_seconds(**settings)
        except PrismError as e:  # weights not on this machine: said, not failed
            print(f"| {name} | not timed: {e} | |")
            continue
        base = base or t
        print(f"| {name} | {t:.3f} | {t / base:.2f}x |", flush=True)
    if a.t2i:
        t2i_row(a, info, dev, sync)


def t2i_row(a, info, dev, sync) -> None:
    from prismdd.methods.t2i import TextToImage

    cfg = recover_config("t2i", t2i_model=a.t2i, device=a.device, ipc=1, t2i_batch=a.t2i_images, t2i_steps=a.t2i_steps)
    try:
        plugin = TextToImage(cfg, info, None, {}, [], dev)
        resolved = plugin.prepare(Path("/tmp"), 0)
    except PrismError as e:
        print(f"\n| generator | s / image |\n|---|---|\n| {a.t2i} | not timed: {e} |")
        return
    units = [(c, 0) for c in range(a.t2i_images)]
    plugin.synthesize(0, units[:1], None)  # warm-up
    sync()
    t = time.perf_counter()
    plugin.synthesize(0, units, None)
    sync()
    seconds = (time.perf_counter() - t) / len(units)
    settings = {k: resolved.get(k) for k in ("pipeline", "steps", "guidance", "size") if k in resolved}
    print(f"\n| generator | settings | s / image |\n|---|---|---|\n| {a.t2i} | {settings} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
