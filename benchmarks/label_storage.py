"""Soft-label storage: bytes and accuracy cost of prismdd's label formats (relabel) vs online labels.

Two parts (``--part bytes|accuracy|all``), printed as Markdown tables on stdout (stage logs go to stderr):

bytes     A 1000-class setting at IPC 10 (10,000 images) and 300 epochs. One epoch of synthetic logits
          (seeded Gaussian logits with a large target entry and a few large "similar-class" entries) is
          packed with prismdd's own ``pack_logits`` and the byte count is multiplied by the epoch count
          (every epoch has the same shape, so this is exact). The view parameters that relabel stores beside
          the labels are counted from a real epoch file written the way ``relabel`` writes it
          (``{**pack_logits(..), **epoch_plan(..).to_tensors()}`` through safetensors). Also: how far
          ``unpack_logits(pack_logits(x, fp16, k))`` is from ``x`` (MSE on logits, KL at T=1 and T=4).
          Seconds on 2 CPU cores.

accuracy  Fashion-MNIST, IPC 10, ConvNet student (width 0.5, the PRISM protocol: MSE + 0.1 CE, AdamW,
          decayed cosine, RandomResizedCrop 0.25 + flip + CutMix). One teacher set and one distilled set
          (reused from ``--stages`` when a finished run is there, else built: squeeze + recover); then
          ``relabel`` at fp16 with topk 0 (all logits) and topk 1, 2, 3, 5, each followed by ``validate
          --labels`` with the same student seeds, plus ``validate`` with online labels (teacher forward per
          step, fp32, the same views). Also the reconstruction error on the real teacher logits.
          ``--proposal`` adds rows for the top-k + fp16 tail-mean codec simulated from the full fp16 files
          (rewritten as dense logits); since this benchmark, ``--topk`` itself stores that tail mean, so on
          a current prismdd the plain top-k rows use the same fill.

    python benchmarks/label_storage.py --part bytes
    python benchmarks/label_storage.py --part accuracy --seeds 0,1,2 --epochs 300
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from prismdd.core.config import build_config, comma_list
from prismdd.artifacts import LABEL_KEYS, epoch_file, label_bytes, load_labelers, pack_logits, unpack_logits
from prismdd.stages.relabel import RelabelConfig, relabel
from prismdd.core.augment import ViewConfig, default_view_batch, epoch_plan, make_inputs



# ----------------------------------------------------------------------------- helpers
def nbytes(d: dict) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1000
    return f"{b}"


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def synthetic_logits(n: int, c: int, seed: int, similar: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-like logits: N(0, 1) noise, the target class +U(4, 10), ``similar`` other classes +U(1, 5)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(n, c, generator=g)
    x[torch.arange(n), y] += torch.empty(n).uniform_(4, 10, generator=g)
    sim = torch.randint(0, c, (n, similar), generator=g)
    x.scatter_add_(1, sim, torch.empty(n, similar).uniform_(1, 5, generator=g))
    return x, y


def tailmean_reconstruct(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Proposal (simulated; what --topk stores since the tail mean was added): top-k fp16 values + indices + ONE fp16 mean of the other logits as fill."""
    c = logits.shape[1]
    v, i = logits.topk(k, dim=1)
    rest = (logits.sum(1, keepdim=True) - v.sum(1, keepdim=True)) / (c - k)
    v, rest = v.half().float(), rest.half().float()
    return rest.expand(-1, c).clone().scatter_(1, i, v)


def prism_reconstruct(logits: torch.Tensor, k: int, storage: str = "fp16") -> torch.Tensor:
    return unpack_logits(pack_logits(logits, storage, k), logits.shape[1])


def errors(full: torch.Tensor, rec: torch.Tensor, chunk: int = 2000) -> dict:
    """MSE on logits and KL(softmax(full/T) || softmax(rec/T)) per sample (batchmean), T = 1 and 4."""
    mse = kl1 = kl4 = 0.0
    for s in range(0, len(full), chunk):
        a, b = full[s:s + chunk].float(), rec[s:s + chunk].float()
        mse += F.mse_loss(b, a, reduction="sum").item()
        for t, acc in ((1.0, "kl1"), (4.0, "kl4")):
            kl = F.kl_div(F.log_softmax(b / t, 1), F.log_softmax(a / t, 1), reduction="sum", log_target=True).item()
            if acc == "kl1":
                kl1 += kl
            else:
                kl4 += kl
    n = len(full)
    return {"mse": mse / full.numel(), "kl1": kl1 / n, "kl4": kl4 / n}


def error_table(logits: torch.Tensor, ks: list[int], proposal: bool) -> str:
    c = logits.shape[1]
    rows = []
    e = errors(logits, prism_reconstruct(logits, 0))
    rows.append(["all (fp16)", 2 * c, f"{e['mse']:.2e}", f"{e['kl1']:.2e}", f"{e['kl4']:.2e}"]
                + (["", "", ""] if proposal else []))
    for k in ks:
        if k >= c:
            continue
        e = errors(logits, prism_reconstruct(logits, k))
        row = [f"top-{k}", 4 * k, f"{e['mse']:.3g}", f"{e['kl1']:.3g}", f"{e['kl4']:.3g}"]
        if proposal:
            p = errors(logits, tailmean_reconstruct(logits, k))
            row += [f"{p['mse']:.3g}", f"{p['kl1']:.3g}", f"{p['kl4']:.3g}"]
        rows.append(row)
    headers = ["stored", "B per image-epoch", "MSE logits", "KL T=1", "KL T=4"]
    if proposal:
        headers += ["proposal: MSE", "proposal: KL T=1", "proposal: KL T=4"]
    return table(headers, rows)


@contextlib.contextmanager
def quiet():
    """Stage prints (and tqdm) to stderr so stdout holds only the tables."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ----------------------------------------------------------------------------- part 1: bytes
def part_bytes(args) -> dict:
    t0 = time.perf_counter()
    c, ipc, epochs = args.classes, args.ipc, args.label_epochs
    n = c * ipc
    logits, _ = synthetic_logits(n, c, args.seed)
    full16 = nbytes(pack_logits(logits, "fp16", 0))
    ref = full16 / n
    rows = []

    def row(name, per_ie, file_per_ie=None):
        total = per_ie * n * epochs
        rows.append([name, f"{per_ie:.1f}", human(total), "-" if per_ie == 0 else f"{ref / per_ie:.1f}x",
                     "-" if file_per_ie is None else f"{file_per_ie:.1f}",
                     "-" if file_per_ie is None else human(file_per_ie * n * epochs),
                     "-" if file_per_ie is None else f"{ref / file_per_ie:.1f}x"])

    # one real epoch file per format, written as relabel writes it
    bs = default_view_batch(n, c)
    plan = epoch_plan(n, 0, args.seed, ViewConfig(bs), args.resolution)
    view_tensors = plan.to_tensors()
    tmp = Path(tempfile.mkdtemp(prefix="label_storage_"))

    def file_bytes(packed: dict) -> float:
        path = epoch_file(tmp, 0)
        save_file({**packed, **view_tensors}, str(path))
        size = path.stat().st_size
        d = load_file(str(path))
        assert label_bytes(d) == nbytes(packed)
        return size / n

    row("reference (FKD-style): full fp16 logits per view (logits only; its pickle overhead not counted)", ref)
    row("prismdd default (`relabel`: storage fp16, topk 0)", ref, file_bytes(pack_logits(logits, "fp16", 0)))
    row("prismdd `--storage fp32`", nbytes(pack_logits(logits, "fp32", 0)) / n,
        file_bytes(pack_logits(logits, "fp32", 0)))
    for k in args.ks:
        packed = pack_logits(logits, "fp16", k)
        row(f"prismdd `--topk {k}` (fp16 values + int16 indices + fp16 tail mean)", nbytes(packed) / n, file_bytes(packed))
    row("online (`validate --teachers`): nothing stored, one teacher forward per student step", 0.0)

    # the view parameters themselves
    d = load_file(str(epoch_file(tmp, 0)))
    vrows, vsum = [], 0
    for key, t in d.items():
        if key in LABEL_KEYS:
            continue
        b = t.numel() * t.element_size()
        vsum += b
        vrows.append([f"`{key}`", str(t.dtype).replace("torch.", ""), tuple(t.shape), f"{b / n:.3f}", human(b * epochs)])
    size = epoch_file(tmp, 0).stat().st_size
    header = size - vsum - label_bytes(d)
    vrows.append(["safetensors header", "-", "-", f"{header / n:.3f}", human(header * epochs)])
    vrows.append(["**all view parameters + header**", "", "", f"**{(vsum + header) / n:.2f}**",
                  f"**{human((vsum + header) * epochs)}**"])
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n## Part 1: bytes, {c} classes x IPC {ipc} = {n:,} images x {epochs} epochs\n")
    print(f"Synthetic logits (seed {args.seed}: N(0,1), target +U(4,10), 5 other classes +U(1,5)). Bytes of ONE "
          f"epoch from `pack_logits`, x {epochs} (every epoch has the same shape). Label batch size {bs} "
          f"(relabel's default at IPC <= 10), view resolution {args.resolution}.\n")
    print(table(["setting", "label B per image-epoch", f"labels, {epochs} epochs", "ratio vs full fp16",
                 "epoch file B per image-epoch (labels + view params)", f"files, {epochs} epochs",
                 "file ratio vs full fp16 logits"], rows))
    print("\nView parameters stored in every epoch file beside the labels (the same for every label format; "
          "`label_bytes` and the manifest's bytes_per_image_epoch exclude them):\n")
    print(table(["tensor", "dtype", "shape (one epoch)", "B per image-epoch", f"{epochs} epochs"], vrows))
    print(f"\nReconstruction error of `unpack_logits(pack_logits(x, 'fp16', k))` vs x, synthetic {c}-class logits "
          f"({n:,} rows); KL(p_full || p_rec) per sample, nats:\n")
    print(error_table(logits, [k for k in args.ks if k < c], args.proposal))
    print(f"\n(part 1: {time.perf_counter() - t0:.1f}s)")
    return {"rows": rows, "view_rows": vrows}


# ----------------------------------------------------------------------------- part 2: accuracy
def find_stage(stages: Path, prefix: str) -> Path | None:
    if not stages.is_dir():
        return None
    done = [p for p in sorted(stages.glob(prefix + "-*")) if (p / "manifest.json").exists()]
    return done[-1] if done else None


def setup(args, work: Path) -> tuple[Path, Path, str]:
    """(teachers folder, distilled folder, how they were obtained)."""
    stages = Path(args.stages)
    t, r = find_stage(stages, "teachers"), find_stage(stages, "recover-prism")
    if t and r and not args.build:
        return t, r, f"reused read-only from {stages}"
    from prismdd.stages.recover import recover, recover_config
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    base = work / (f"setup-{args.dataset}-w{args.teacher_width}-st{args.teacher_steps}-e{args.teacher_epochs}"
                   f"-it{args.iterations}-s{args.seed}")
    with quiet():
        squeeze(build_config(SqueezeConfig, dict(dataset=args.dataset, arch="convnet", width=args.teacher_width,
                                                 epochs=args.teacher_epochs, out=str(base / "teachers"),
                                                 steps_per_epoch=args.teacher_steps,
                                                 device="cpu", seed=args.seed)))
        recover(recover_config("prism", dataset=args.dataset, teachers=str(base / "teachers"), primary="convnet",
                               ipc=10, iterations=args.iterations, out=str(base / "prism"), device="cpu",
                               seed=args.seed))
    return base / "teachers", base / "prism", (f"built in {base}: convnet teacher width {args.teacher_width}, "
                                               f"{args.teacher_epochs} epoch(s); recover prism IPC 10, "
                                               f"{args.iterations} iterations")


def real_logits(teachers: Path, distilled: Path, epochs: int, seed: int) -> torch.Tensor:
    """fp32 teacher logits on exactly the views relabel draws, for the first ``epochs`` epochs."""
    from prismdd.artifacts import load_distilled

    ds = load_distilled(distilled)
    info = ds.info
    lab = load_labelers(str(teachers), None, ds.manifest["config"].get("primary"), info, "mean", 0.5, "cpu")
    bs = default_view_batch(len(ds), info.num_classes)
    out = []
    for e in range(epochs):
        plan = epoch_plan(len(ds), e, seed, ViewConfig(bs), info.resolution)
        for _, _, idx, views, mix in plan.batches(bs):
            out.append(lab(make_inputs(ds.images[idx], info, views, mix, "cpu")))
    return torch.cat(out)


def simulate_codec(src: Path, dst: Path, k: int, bytes_per_ie: float) -> Path:
    """Rewrite a dense fp16 relabel folder as the proposal codec would reconstruct it (dense fp32 logits)."""
    dst.mkdir(parents=True, exist_ok=True)
    m = json.loads((src / "manifest.json").read_text())
    for e in range(m["outputs"]["epochs"]):
        d = load_file(str(epoch_file(src, e)))
        d["logits"] = tailmean_reconstruct(d["logits"].float(), k).contiguous()
        save_file(d, str(epoch_file(dst, e)))
    m["outputs"]["bytes_per_image_epoch"] = bytes_per_ie
    m["outputs"]["simulated_codec"] = f"top-{k} + fp16 tail mean (simulated from {src})"
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return dst


def part_accuracy(args) -> dict:
    from prismdd.stages.validate import validate, validate_config

    t0 = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    teachers, distilled, how = setup(args, work)
    t_setup = time.perf_counter() - t0
    seeds = args.seeds
    vcommon = dict(dataset=args.dataset, distilled=str(distilled), student="convnet", student_width=0.5,
                   seeds=seeds, epochs=args.epochs, eval_every=args.epochs, device="cpu", seed=args.seed,
                   force=True)
    results = []

    def run_validate(name, bytes_ie, relabel_s, **kw):
        t = time.perf_counter()
        with quiet():
            m = validate(validate_config("prism", out=str(work / "eval" / name), **vcommon, **kw))
        runs = m["students"]["convnet"]["runs"]
        results.append({"name": name, "bytes": bytes_ie, "top1": m["top1"], "std": m["top1_std"],
                        "per_seed": [r["top1"] for r in runs], "validate_s": time.perf_counter() - t,
                        "relabel_s": relabel_s})
        spread = f" +- {m['top1_std']:.2f}" if len(runs) > 1 else " (one run)"
        print(f"[label_storage] {name}: top-1 {m['top1']:.2f}{spread} ({time.perf_counter() - t:.0f}s)",
              file=sys.stderr)

    folders = {}
    for k in [0] + [k for k in args.acc_ks if k > 0]:
        name = "fp16 topk 0 (full)" if k == 0 else f"fp16 topk {k}"
        out = work / "labels" / f"fp16-top{k}"
        t = time.perf_counter()
        with quiet():
            relabel(build_config(RelabelConfig, dict(dataset=args.dataset, distilled=str(distilled),
                                                     teachers=str(teachers), epochs=args.epochs, storage="fp16",
                                                     topk=k, out=str(out), device="cpu", seed=args.seed,
                                                     force=True)))
        rt = time.perf_counter() - t
        folders[k] = out
        b = json.loads((out / "manifest.json").read_text())["outputs"]["bytes_per_image_epoch"]
        run_validate(name, b, rt, labels=str(out))
    if args.proposal:
        for k in args.proposal_ks:
            dst = simulate_codec(folders[0], work / "labels" / f"proposal-top{k}", k, 4 * k + 2)
            run_validate(f"proposal: top-{k} + fp16 tail mean (simulated; what --topk stores since the tail mean was added)", 4 * k + 2, None, labels=str(dst))
    run_validate("online (`--teachers`, fp32, nothing stored)", 0.0, None, teachers=str(teachers))

    # real-logit reconstruction error
    rl = real_logits(teachers, distilled, args.recon_epochs, args.seed)
    p = rl.softmax(1)

    base = results[0]
    rows = []
    for r in results:
        d = [a - b for a, b in zip(r["per_seed"], base["per_seed"])]
        dm = sum(d) / len(d)
        ds = (sum((x - dm) ** 2 for x in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else 0.0
        rows.append([r["name"], f"{r['bytes']:g}", f"{r['top1']:.2f} ± {r['std']:.2f}",
                     "-" if r is base else f"{dm:+.2f} ± {ds:.2f}",
                     " / ".join(f"{x:.2f}" for x in r["per_seed"]),
                     "-" if r["relabel_s"] is None else f"{r['relabel_s']:.0f}", f"{r['validate_s']:.0f}"])
    from prismdd.artifacts import find_teachers, load_model

    cards = {a: load_model(f)[1] for a, f in find_teachers(str(teachers)).items()}
    print(f"\n## Part 2: accuracy, {args.dataset} IPC 10 (100 images), ConvNet student width 0.5\n")
    print(f"Teachers/distilled set: {how}. Teacher test top-1: "
          + ", ".join(f"{a} {c['test_top1']:.2f}%" for a, c in cards.items())
          + f". Label teacher: the recover run's primary. Student: PRISM protocol (MSE + 0.1 CE, AdamW 1e-3, "
            f"decayed cosine, RRC 0.25 + flip + CutMix, batch 50), {args.epochs} epochs, final-epoch top-1 on the "
            f"whole test set, seeds {seeds}; every row replays the same views (relabel/view seed {args.seed}). "
            f"Delta = mean ± std over seeds of the paired per-seed difference to the fp16 topk-0 row. "
            f"Setup {t_setup:.0f}s.\n")
    print(table(["setting", "label B per image-epoch", "top-1 % (mean ± std)", "delta vs full fp16 (paired)",
                 "per seed", "relabel s", "validate s (all seeds)"], rows))
    print(f"\nReconstruction error on the real teacher logits ({len(rl):,} views: {args.recon_epochs} epochs x "
          f"{len(rl) // args.recon_epochs} images; teacher mean max-softmax {p.max(1).values.mean():.3f}, mean logit range "
          f"{(rl.max(1).values - rl.min(1).values).mean():.1f}):\n")
    print(error_table(rl, [k for k in args.acc_ks if k > 0], args.proposal))
    print(f"\n(part 2: {time.perf_counter() - t0:.0f}s)")
    return {"results": results, "setup": how}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("bytes", "accuracy", "all"), default="all")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="synthetic logits, views, teacher/recover seed")
    ap.add_argument("--classes", type=int, default=1000, help="bytes part: number of classes")
    ap.add_argument("--ipc", type=int, default=10, help="bytes part: images per class")
    ap.add_argument("--label-epochs", type=int, default=300, help="bytes part: epochs of stored labels")
    ap.add_argument("--resolution", type=int, default=224, help="bytes part: view resolution (CutMix boxes)")
    ap.add_argument("--ks", default="1,5,10,20,50,100", help="bytes part: top-k values")
    ap.add_argument("--acc-ks", default="1,2,3,5", help="accuracy part: top-k values (10 classes)")
    ap.add_argument("--proposal-ks", default="1,2", help="accuracy part: top-k values of the proposal rows")
    ap.add_argument("--no-proposal", dest="proposal", action="store_false",
                    help="skip the top-k + tail-mean codec rows (simulated; what --topk stores since the tail mean was added)")
    ap.add_argument("--stages", default="runs/main/stages",
                    help="reuse finished teachers-*/ and recover-prism-*/ from here (read-only)")
    ap.add_argument("--build", action="store_true", help="build the set-up even if --stages has one")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "prismdd-label-storage"))
    ap.add_argument("--teacher-width", type=float, default=0.25)
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--teacher-steps", type=int, default=None, help="cap on teacher steps per epoch")
    ap.add_argument("--dataset", default="fashion-mnist", help="accuracy part (digits: a smoke test)")
    ap.add_argument("--iterations", type=int, default=100, help="recover iterations when building the set-up")
    ap.add_argument("--epochs", type=int, default=300, help="student epochs (= relabel epochs)")
    ap.add_argument("--seeds", default="0,1", help="student seeds")
    ap.add_argument("--recon-epochs", type=int, default=30, help="epochs of real views for the error table")
    args = ap.parse_args(argv)
    args.ks = [int(k) for k in comma_list(args.ks)]
    args.acc_ks = [int(k) for k in comma_list(args.acc_ks)]
    args.proposal_ks = [int(k) for k in comma_list(args.proposal_ks)]
    torch.set_num_threads(args.threads)

    print("```")
    print("$ " + shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
                             else sys.executable] + sys.argv))
    print(f"date (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}; torch {torch.__version__}; "
          f"nproc {len(os.sched_getaffinity(0))}; torch threads {torch.get_num_threads()}; device cpu")
    print("```")
    res = {}
    if args.part in ("bytes", "all"):
        res["bytes"] = part_bytes(args)
    if args.part in ("accuracy", "all"):
        res["accuracy"] = part_accuracy(args)
    return res


if __name__ == "__main__":
    main()
