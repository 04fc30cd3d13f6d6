"""ImageNet-shaped dry run: what breaks, and what grows, at 1000 classes and 224 px, on any machine.

It builds a 1000-class ImageFolder of 224 px-and-up JPEGs (a few per class), writes the seed's ImageNet pool
at width 1 (ResNet-18 primary, MobileNet-V2, EfficientNet-B0, ShuffleNet-V2 x0.5) with random weights as
torchvision state-dict files, and runs the stages the way a user does, each as its own process:

    squeeze  --pretrained arch=FILE,... --epochs 0     (imports the weights: the user's path)
    recover  under torchrun (--nproc ranks), PRISM at IPC --ipc for --iterations iterations
    relabel  --epochs E (stored soft labels)
    validate under torchrun (DDP), the stored labels, --validate-steps steps per epoch
    score    under torchrun: the primary's embeddings and entropies of the training images
    recover  --method bps and --method herding from those scores (real images chosen per class)

and, with --select-per-class, how the per-class selection work grows with images per class (synthetic embeddings).

Per stage it reports wall seconds, the peak RSS of every process (VmHWM, polled from /proc), files and bytes
written, the manifest's size, and for recover the seconds per image-iteration per teacher. From those it
extrapolates to the paper's runs (1000 classes x IPC 10 and IPC 50, 4000 iterations, 300 relabel epochs).

    python benchmarks/scale.py --out runs/scale                   # 1000 classes, IPC 1, 2 iterations
    python benchmarks/scale.py --out runs/scale-100 --classes 100 # the same at a tenth: the growth check

Every process runs one thread (OMP_NUM_THREADS=1), so the seconds are core-seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

POOL = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5")
PAPER = {"ipc10": 10, "ipc50": 50}
PAPER_ITERATIONS, PAPER_EPOCHS = 4000, 300


# ----------------------------------------------------------------------------- inputs
def make_folder(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0) -> dict:
    """Smooth random colour JPEGs, 256 x 256..320 (so the shorter-side resize and centre crop run)."""
    from PIL import Image

    if (root / "done.json").exists():
        return json.loads((root / "done.json").read_text())
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    n = 0
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                w = 256 + 32 * int(rng.integers(0, 3))
                Image.fromarray(small).resize((w, 256), Image.BICUBIC).save(d / f"{split}_{c}_{i}.JPEG", quality=90)
                n += 1
    info = {"files": n, "seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(p.stat().st_size for p in root.rglob("*.JPEG"))}
    (root / "done.json").write_text(json.dumps(info))
    return info


def make_weights(folder: Path, seed: int = 0) -> dict[str, str]:
    """Randomly initialised torchvision models (1000 classes) saved as plain state-dict files."""
    import torch
    import torchvision.models as tvm

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, arch in enumerate(POOL):
        path = folder / f"{arch}_random.pth"
        if not path.exists():
            torch.manual_seed(seed + i)
            torch.save(getattr(tvm, arch)(num_classes=1000).state_dict(), path)
        files[arch] = str(path)
    return files


# ----------------------------------------------------------------------------- measuring a process tree
def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _label(pid: int) -> str:
    try:
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return str(pid)
    if "RANK" in env and "torch.distributed.run" not in cmd:
        return f"rank{env['RANK']}"
    return "launcher" if "torch.distributed.run" in cmd else "main"


def measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; poll every process of its tree for its peak RSS; returns seconds and peaks."""
    peaks: dict[int, list] = {}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll():
            while not done.is_set():
                stack, seen = [proc.pid], []
                while stack:
                    p = stack.pop()
                    seen.append(p)
                    stack += _children(p)
                for p in seen:
                    kb = _hwm_kb(p)
                    if kb is not None:
                        entry = peaks.setdefault(p, [_label(p), 0])
                        entry[1] = max(entry[1], kb)
                done.wait(0.25)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({rc}); see {log}:\n" + log.read_text()[-3000:])
    by_label: dict[str, int] = {}
    for label, kb in peaks.values():
        by_label[label] = max(by_label.get(label, 0), kb)
    return {"seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": {k: round(v / 1024) for k, v in sorted(by_label.items())}}


def written(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    manifest = folder / "manifest.json"
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "manifest_bytes": manifest.stat().st_size if manifest.exists() else None}


# ----------------------------------------------------------------------------- the dry run
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train-per-class", type=int, default=2)
    ap.add_argument("--val-per-class", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=224, help="the images are 256 px and up, as ImageNet's")
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--recover-batch-size", type=int, default=50, help="the paper uses 100 (GPU memory)")
    ap.add_argument("--relabel-epochs", type=int, default=1)
    ap.add_argument("--validate-steps", type=int, default=2)
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=None, help="PRISMDD_CACHE for the decoded folder (default: <out>/cache)")
    ap.add_argument("--select-per-class", default="", help="comma list of images per class for the selection "
                    "growth rows (e.g. 100,300,1300): BPS's patterns and picks, herding and k-center on synthetic "
                    "512-d embeddings of --select-classes classes, each size in its own process (time, peak RSS)")
    ap.add_argument("--select-classes", type=int, default=1000)
    ap.add_argument("--select-ipcs", default="10,50")
    ap.add_argument("--stages", default="squeeze,recover,relabel,validate,score,select-bps,select-herding",
                    help="comma list of the stages to run, in this order (squeeze is needed by the rest)")
    ap.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)  # internal: one growth row
    args = ap.parse_args(argv)
    if args.core is not None:
        return selection_core(args.core, args.select_classes, [int(v) for v in args.select_ipcs.split(",")],
                              Path(args.out))

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PRISMDD_CACHE=args.cache or str(out / "cache"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), "-m", "prismdd"]
    data = out / "data"
    folder_info = make_folder(data, args.classes, args.train_per_class, args.val_per_class)
    weights = make_weights(out / "weights")
    common = ["--dataset", "imagefolder", "--data-root", str(data), "--resolution", str(args.resolution),
              "--device", args.device]
    dirs = {s: out / s for s in ("teachers", "recover", "labels", "validate", "score", "select-bps", "select-herding")}
    stages = {
        "squeeze": [py, "-m", "prismdd", "squeeze", *common, "--arch", ",".join(POOL), "--width", "1",
                    "--pretrained", ",".join(f"{a}={f}" for a, f in weights.items()), "--epochs", "0",
                    "--out", str(dirs["teachers"])],
        "recover": [*torchrun, "recover", *common, "--method", "prism", "--teachers", str(dirs["teachers"]),
                    "--primary", POOL[0], "--bn-pool", ",".join(POOL), "--ipc", str(args.ipc),
                    "--iterations", str(args.iterations), "--batch-size", str(args.recover_batch_size),
                    "--out", str(dirs["recover"])],
        "relabel": [py, "-m", "prismdd", "relabel", "--distilled", str(dirs["recover"]), "--teachers",
                    str(dirs["teachers"]), "--epochs", str(args.relabel_epochs), "--out", str(dirs["labels"]),
                    "--device", args.device],
        "validate": [*torchrun, "validate", "--distilled", str(dirs["recover"]), "--labels", str(dirs["labels"]),
                     "--student", args.student, "--student-width", "1", "--epochs", str(args.relabel_epochs),
                     "--steps-per-epoch", str(args.validate_steps), "--out", str(dirs["validate"]),
                     "--device", args.device],
        # the selection path (issue 34): the teacher's embeddings and entropies of every training image under
        # torchrun, then BPS and herding choose --ipc real images per class from them
        "score": [*torchrun, "score", *common, "--teachers", str(dirs["teachers"]), "--embed-arch", POOL[0],
                  "--kinds", "embedding,entropy", "--out", str(dirs["score"])],
        "select-bps": [*torchrun, "recover", *common, "--method", "bps", "--ipc", str(args.ipc),
                       "--select-scores", str(dirs["score"]), "--out", str(dirs["select-bps"])],
        "select-herding": [*torchrun, "recover", *common, "--method", "herding", "--ipc", str(args.ipc),
                           "--select-scores", str(dirs["score"]), "--out", str(dirs["select-herding"])],
    }
    rows = {}
    wanted = args.stages.split(",")
    for name, cmd in stages.items():
        if name not in wanted:
            continue
        print(f"[scale] {name} ...", flush=True)
        m = measured(cmd, env, out / f"{name}.log")
        m.update(written(dirs["teachers" if name == "squeeze" else {"relabel": "labels"}.get(name, name)]))
        rows[name] = m
        print(f"[scale] {name}: {m}", flush=True)

    if "recover" in rows and "relabel" in rows:
        recover_rates(rows, dirs)
    growth = []
    for per in [int(v) for v in args.select_per_class.split(",") if v]:
        print(f"[scale] selection growth, {per} images per class ...", flush=True)
        row_file = out / f"select-core-{per}.json"
        m = measured([py, __file__, "--core", str(per), "--select-classes", str(args.select_classes),
                      "--select-ipcs", args.select_ipcs, "--out", str(row_file)], env, out / f"select-core-{per}.log")
        growth.append(dict(json.loads(row_file.read_text()), peak_rss_mb=m["peak_rss_mb"]["main"], wall_s=m["seconds"]))
    cache = Path(env["PRISMDD_CACHE"]) / "imagefolder"
    result = {"config": vars(args), "folder": folder_info, "stages": rows, "selection_growth": growth,
              "decoded_cache_bytes": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()),
              "extrapolation": extrapolate(rows, args) if "s_per_image_iteration" in rows.get("recover", {}) else {}}
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out / "scale.md").write_text(md)
    print(md)
    return result


def recover_rates(rows: dict, dirs: dict) -> None:
    """Per-image-iteration rates of recover and bytes per image-epoch of relabel, from their manifests."""
    rec = json.loads((dirs["recover"] / "manifest.json").read_text())
    records = rec["outputs"]["batches"]
    image_iters = sum(len(r["units"]) * r["iterations"] for r in records)
    teacher_iters = sum(len(r["units"]) * r["iterations"] * len(set(r["bn_set"]) | {r["primary"]}) for r in records)
    batch_seconds = sum(r["seconds"] for r in records)
    images = rec["outputs"]["num_images"]
    per_image_files = sum(1 for d in ("images", "records") for p in (dirs["recover"] / d).rglob("*") if p.is_file())
    rows["recover"].update({
        "images": images, "batches": len(records), "per_image_files": per_image_files, "batch_seconds": round(batch_seconds, 1),
        "s_per_image_iteration": round(batch_seconds / image_iters, 4),
        "teachers_per_iteration": round(teacher_iters / image_iters, 2),
        "s_per_image_iteration_per_teacher": round(batch_seconds / teacher_iters, 4)})
    lab = json.loads((dirs["labels"] / "manifest.json").read_text())["outputs"]
    rows["relabel"].update({"file_bytes_per_image_epoch": lab["file_bytes_per_image_epoch"],
                            "label_bytes_per_image_epoch": lab["bytes_per_image_epoch"]})


def selection_core(per_class: int, classes: int, ipcs: list[int], out_file: Path) -> dict:
    """The per-class selection work on synthetic embeddings, class by class as the plug-ins do it: 512-d vectors
    around 8 random centres per class (so BPS finds patterns), random entropies. Seconds per part, summed over the
    classes (making the vectors not counted)."""
    import torch

    from prismdd.methods import bps, herding, kcenter

    rng = np.random.default_rng(0)
    t = dict.fromkeys(["bps patterns (kNN + Infomap)", "bps picks"] + ["herding", "k-center"], 0.0)
    patterns = 0
    for _ in range(classes):
        centres = rng.normal(size=(8, 512)).astype(np.float32)
        feats = centres[rng.integers(0, 8, per_class)] + rng.normal(size=(per_class, 512)).astype(np.float32)
        entropy = rng.random(per_class)
        t0 = time.perf_counter()
        labels = bps.class_patterns(feats)
        t1 = time.perf_counter()
        x = bps.l2_normalise(feats)
        for ipc in ipcs:
            bps.select_class(labels, x, entropy, min(ipc, per_class), seed=0)
        t2 = time.perf_counter()
        emb = torch.from_numpy(feats)
        herding.herd(emb, min(max(ipcs), per_class))
        t3 = time.perf_counter()
        kcenter.farthest_first(emb, min(max(ipcs), per_class), 0)
        t4 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[key] += dt
        patterns += len(np.unique(labels))
    row = {"per_class": per_class, "classes": classes, "ipcs": ipcs, "seconds": {k: round(v, 2) for k, v in t.items()},
           "patterns_per_class": round(patterns / classes, 1)}
    out_file.write_text(json.dumps(row))
    return row


def extrapolate(rows: dict, args) -> dict:
    """Linear in images (what the growth check supports): per-image figures times the paper's image counts
    (files: one PNG per image plus one record per batch, at this run's images per batch)."""
    rec, rel = rows["recover"], rows["relabel"]
    per_image = {"files": rec["per_image_files"] / rec["images"], "bytes": rec["bytes"] / rec["images"],
                 "manifest_bytes": rec["manifest_bytes"] / rec["images"]}
    out = {}
    for name, ipc in PAPER.items():
        n = 1000 * ipc
        core_s = n * PAPER_ITERATIONS * rec["s_per_image_iteration"]
        out[name] = {"images": n, "recover_core_hours_this_cpu": round(core_s / 3600),
                     "recover_files": round(per_image["files"] * n), "recover_bytes": round(per_image["bytes"] * n),
                     "recover_manifest_bytes": round(per_image["manifest_bytes"] * n),
                     "relabel_bytes_300_epochs": round(rel["file_bytes_per_image_epoch"] * n * PAPER_EPOCHS)}
    return out


def table(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['resolution']} px, classes {c['classes']}, {c['train_per_class']} train + {c['val_per_class']} val JPEGs per class, IPC "
             f"{c['ipc']}, {c['iterations']} iterations, recover batch {c['recover_batch_size']}, {c['nproc']} ranks, "
             f"1 thread per process; decoded cache {r['decoded_cache_bytes'] / 1e6:.0f} MB",
             "", "| stage | wall s | peak RSS per process (MB) | files | bytes | manifest bytes | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, m in r["stages"].items():
        notes = ""
        if name == "recover":
            notes = (f"{m['s_per_image_iteration']} s per image-iteration ({m['teachers_per_iteration']} teachers): "
                     f"{m['s_per_image_iteration_per_teacher']} s per image-iteration per teacher")
        if name == "relabel":
            notes = f"{m['file_bytes_per_image_epoch']} file bytes per image-epoch"
        rss = ", ".join(f"{k} {v}" for k, v in m["peak_rss_mb"].items())
        lines.append(f"| {name} | {m['seconds']} | {rss} | {m['files']} | {m['bytes']:,} | {m['manifest_bytes'] or '-'} "
                     f"| {notes} |")
    if r["extrapolation"]:
        lines += ["", "| paper's run (1000 classes, 4000 iterations) | images | recover core-hours (this CPU) | "
                      "recover files | recover bytes | manifest bytes | relabel bytes (300 epochs) |",
                  "|---|---|---|---|---|---|---|"]
    for name, e in r["extrapolation"].items():
        lines.append(f"| {name} | {e['images']:,} | {e['recover_core_hours_this_cpu']:,} | {e['recover_files']:,} | "
                     f"{e['recover_bytes']:,} | {e['recover_manifest_bytes']:,} | {e['relabel_bytes_300_epochs']:,} |")
    if r.get("selection_growth"):
        g0 = r["selection_growth"][0]
        parts = list(g0["seconds"])
        lines += ["", f"Selection growth: synthetic 512-d embeddings, {g0['classes']} classes, IPC "
                      f"{', '.join(map(str, g0['ipcs']))} (BPS picks at each; herding and k-center to the largest), "
                      "one process at one thread", "",
                  "| images per class | " + " | ".join(f"{p} s" for p in parts) + " | patterns per class | "
                  "peak RSS MB | s per class (all parts) |", "|---" * (len(parts) + 4) + "|"]
        for g in r["selection_growth"]:
            total = sum(g["seconds"].values())
            lines.append(f"| {g['per_class']} | " + " | ".join(f"{g['seconds'][p]}" for p in parts) +
                         f" | {g['patterns_per_class']} | {g['peak_rss_mb']} | {total / g['classes']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
