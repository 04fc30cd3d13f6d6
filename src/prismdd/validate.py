"""validate: train a fresh student on distilled images (+ soft labels) and test it on real data.

The FINAL epoch's accuracy is the result; the best epoch is reported separately and marked as such.
Soft labels come from a relabel folder (``--labels``, replaying its stored views) or are computed online
from teachers (``--teachers``) on the very same views. Baselines: ``--random-real`` (a seeded random real
subset with the same IPC) and ``--full`` (the whole training set), under the same protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist
from .config import CommonConfig, comma_list
from .data import DatasetInfo, TensorImages, class_indices, load_splits
from .models import create_model
from .registry import Registry
from .relabel import (StoredLabels, ViewConfig, default_batch_size, epoch_plan, load_labelers, make_inputs)
from .squeeze import save_teacher
from .training import check_finite, evaluate, lr_factor, make_optimizer, set_lr
from .utils import (JsonlLog, PrismError, config_hash, Timer, make_generator, progress, read_json, torch_load, torch_save,
                    write_json, write_manifest)

# protocol presets: named bundles of student-training fields
PROTOCOLS: Registry[dict] = Registry("protocol")
PROTOCOLS.register("prism", {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "schedule": "decayed_cosine",
                             "loss": "mse+ce", "gamma": 0.1, "min_scale": 0.25, "mix": "cutmix"})
# seed Appendix C: hard labels, no relabel, SGD 0.1, batch 256, linear decay, 90 epochs
PROTOCOLS.register("appendix-c", {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "schedule": "linear",
                                  "loss": "ce", "batch_size": 256, "epochs": 90, "min_scale": 0.25, "mix": "none"})
PROTOCOLS.register("sre2l", {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "schedule": "cosine",
                             "loss": "kl", "temperature": 4.0, "min_scale": 0.08, "mix": "cutmix"})


@dataclass
class ValidateConfig(CommonConfig):
    out: str = "runs/prism/eval"
    protocol: str = "prism"  # prism | appendix-c | sre2l: presets of the fields below (set fields win)
    distilled: str | None = None  # a recover output folder
    labels: str | None = None  # a relabel output folder (stored soft labels)
    teachers: str | None = None  # a squeeze folder: soft labels computed online (no storage)
    label_teachers: str | None = None  # comma list of teacher archs; default: the recover run's primary
    ensemble: str = "mean"  # mean | norm-matched | weighted
    primary_weight: float = 0.5
    random_real: bool = False  # baseline: a seeded random real subset with --ipc images per class
    full: bool = False  # baseline: the whole real training set
    ipc: int = 10  # for --random-real
    student: str = "convnet"  # one or a comma list of architectures
    student_width: float = 1.0  # width multiplier of the student
    seeds: str = "0"  # comma list: one student per seed, reported as mean +- std
    epochs: int = 300
    batch_size: int | None = None  # None: 50 at IPC <= 10, else 100 (seed Table 1)
    optimizer: str = "adamw"  # adamw | sgd | adam
    lr: float = 0.001
    weight_decay: float = 0.01
    schedule: str = "decayed_cosine"  # decayed_cosine (PRISM) | cosine | linear | constant
    loss: str = "mse+ce"  # mse+ce (PRISM) | kl | ce (hard labels)
    gamma: float = 0.1  # mse+ce: weight of the hard-label CE
    temperature: float = 4.0  # kl: softmax temperature
    min_scale: float = 0.25  # RandomResizedCrop floor (seed Table 3)
    mix: str = "cutmix"  # cutmix | mixup | none
    steps_per_epoch: int | None = None  # cap on steps per epoch (None: every image once; for --full)
    eval_every: int = 50  # epochs between test evaluations (the final epoch is always evaluated)
    force: bool = False

    def validate(self):
        sources = sum(bool(x) for x in (self.distilled, self.random_real, self.full))
        if sources != 1:
            raise PrismError("validate: give exactly one of --distilled DIR, --random-real, --full")
        if self.loss not in ("mse+ce", "kl", "ce"):
            raise PrismError(f"--loss {self.loss!r}: expected mse+ce, kl or ce")
        if self.loss != "ce" and not (self.labels or self.teachers):
            raise PrismError(f"--loss {self.loss} needs soft labels: pass --labels DIR (from relabel) or "
                             f"--teachers DIR (online), or use --loss ce")
        if self.epochs < 1:
            raise PrismError("epochs: must be >= 1")
        from .relabel import ENSEMBLES

        if self.ensemble not in ENSEMBLES:
            raise PrismError(f"--ensemble {self.ensemble!r}: expected one of {', '.join(ENSEMBLES)}")


PRESET_KEY = "protocol"  # the CLI layers the named protocol under everything the user set


def preset_layer(name: str | None) -> dict:
    name = name or "prism"
    return dict(PROTOCOLS.get(name), protocol=name)


def validate_config(protocol: str = "prism", **overrides) -> ValidateConfig:
    from .config import build_config

    return build_config(ValidateConfig, preset_layer(protocol), dict(overrides, protocol=protocol))


# ----------------------------------------------------------------------------- data sources
def random_real_subset(train, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    gen = make_generator(seed, "random-real")
    idx = []
    for c, members in enumerate(class_indices(train.targets, num_classes)):
        if len(members) < ipc:
            raise PrismError(f"--ipc {ipc}: class {c} has only {len(members)} training images")
        idx.append(members[torch.randperm(len(members), generator=gen)[:ipc]])
    return torch.cat(idx)


def training_images(cfg: ValidateConfig, train, info: DatasetInfo) -> tuple[TensorImages, dict]:
    if cfg.distilled:
        from .recover import load_distilled

        ds = load_distilled(cfg.distilled)
        if ds.info.name != info.name:
            raise PrismError(f"--distilled {cfg.distilled}: made from {ds.info.name!r}, but --dataset is {info.name!r}")
        return ds, {"source": "distilled", "folder": cfg.distilled, "primary": ds.manifest["config"].get("primary")}
    if cfg.random_real:
        idx = random_real_subset(train, info.num_classes, cfg.ipc, cfg.seed)
        return TensorImages(train.get_images(idx), train.targets[idx]), {"source": "random-real", "ipc": cfg.ipc,
                                                                         "indices": idx.tolist()}
    if not isinstance(train, TensorImages):
        raise PrismError("--full on a file-backed dataset is not supported on this path; train a teacher with squeeze")
    return train, {"source": "full"}


# ----------------------------------------------------------------------------- losses
def mix_partners(y: torch.Tensor, mix) -> tuple[torch.Tensor, float]:
    """Hard label of each image's mixing partner and the share of the image that stays its own."""
    if mix is None:
        return y, 1.0
    perm, lam = (mix.perm, mix.lam) if hasattr(mix, "perm") else mix
    return y[perm.to(y.device)], float(lam)


def student_loss(cfg: ValidateConfig, out: torch.Tensor, soft: torch.Tensor | None, y: torch.Tensor,
                 y2: torch.Tensor, lam: float) -> dict:
    # mixed inputs: the hard-label CE is mixed in the same proportion as the pixels
    ce = F.cross_entropy(out, y) if lam == 1.0 else lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y2)
    if cfg.loss == "ce":
        return {"ce": ce, "total": ce}
    if cfg.loss == "mse+ce":
        mse = F.mse_loss(out, soft)
        return {"mse": mse, "ce": ce, "total": mse + cfg.gamma * ce}
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(soft / t, 1), reduction="batchmean", log_target=True) * t * t
    return {"kl": kl, "total": kl}


# ----------------------------------------------------------------------------- one student
def student_hash(cfg: ValidateConfig, arch: str, seed: int) -> str:
    from .config import replace

    return config_hash(replace(cfg, student=arch, seeds=str(seed)),
                       exclude=("out", "device", "num_workers", "force", "eval_every"))
def train_student(cfg: ValidateConfig, arch: str, seed: int, data: TensorImages, test, info: DatasetInfo,
                  labels, ctx, folder: Path) -> dict:
    """Train one student (resumable per epoch); returns its result dict."""
    device = ctx.device
    result_path = folder / "result.json"
    chash = student_hash(cfg, arch, seed)
    if result_path.exists() and not cfg.force:
        result = read_json(result_path)
        if result.get("config_hash") != chash:
            raise PrismError(f"{folder}: holds a student trained with other settings; use --force or another --out")
        return result
    torch.manual_seed(seed)
    model = create_model(arch, info.num_classes, info.channels, info.resolution, cfg.student_width).to(device)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    ddp = ctx.world_size > 1
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    bs = labels["batch_size"]
    vc = ViewConfig(bs, cfg.min_scale, cfg.mix)
    steps = math.ceil(len(data) / bs)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    total_steps = cfg.epochs * steps
    log = JsonlLog(folder / "log.jsonl")
    ckpt = folder / "checkpoint.pt"
    start, curve = 0, []
    if ckpt.exists() and not cfg.force:
        ck = torch_load(ckpt, map_location=device)
        if ck.get("config_hash") != chash:
            raise PrismError(f"{ckpt}: an unfinished student with other settings; use --force or another --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, curve = int(ck["epoch"]), list(ck["curve"])
    timer = Timer()
    bar = progress(range(start, cfg.epochs), desc=f"validate {arch} seed {seed}",
                   disable=None if ctx.rank == 0 else True, leave=False)
    for epoch in bar:
        model.train()
        if labels["stored"] is not None:
            plan, soft_all = labels["stored"].epoch(epoch)
        else:
            plan, soft_all = epoch_plan(len(data), epoch, cfg.seed, vc, info.resolution), None
        run = 0.0
        for b, sl, idx, views, mix in plan.batches(bs):
            if b >= steps:
                break
            set_lr(opt, cfg.lr * lr_factor(cfg.schedule, (epoch * steps + b) / total_steps))
            x = make_inputs(data.get_images(idx), info, views, mix, device)
            y = data.targets[idx].to(device)
            if soft_all is not None:
                soft = soft_all[sl].to(device)
            elif labels["online"] is not None and cfg.loss != "ce":
                soft = labels["online"](x)
            else:
                soft = None
            y2, lam = mix_partners(y, mix)
            if ddp:  # each rank trains on its share of the (already mixed) batch; DDP averages the gradients
                part = slice(ctx.rank, None, ctx.world_size)
                x, y, y2 = x[part], y[part], y2[part]
                soft = soft[part] if soft is not None else None
            terms = student_loss(cfg, net(x), soft, y, y2, lam)
            check_finite(terms["total"], f"validate {arch} seed {seed} epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            run += float(terms["total"].detach())
        record = {"epoch": epoch + 1, "train_loss": run / steps, "lr": opt.param_groups[0]["lr"]}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            ev = evaluate(model, test, info, device, num_workers=cfg.num_workers)
            record.update(top1=ev["top1"], top5=ev["top5"])
            curve.append({"epoch": epoch + 1, "top1": round(ev["top1"], 3), "top5": round(ev["top5"], 3)})
            bar.set_postfix(top1=f"{ev['top1']:.2f}")
        if ctx.rank == 0:
            log.write(**record)
            torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "curve": curve, "config_hash": chash}, ckpt)
    final = curve[-1]
    best = max(curve, key=lambda c: c["top1"])
    result = {"student": arch, "seed": seed, "top1": final["top1"], "top5": final["top5"],
              "best_top1": best["top1"], "best_epoch": best["epoch"], "curve": curve,
              "seconds": round(timer.elapsed, 2), "config_hash": chash}
    if ctx.rank == 0:
        save_teacher(folder, model, info, cfg, {"top1": final["top1"], "top5": final["top5"]}, timer.elapsed)
        write_json(result_path, result)
        ckpt.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------- the stage
def validate(cfg: ValidateConfig) -> dict:
    timer = Timer()
    ctx = dist.init(cfg.device)
    train, test, info = load_splits(cfg)
    data, source = training_images(cfg, train, info)
    stored = online = None
    bs = cfg.batch_size or default_batch_size(len(data), info.num_classes)
    if cfg.labels:
        stored = StoredLabels(cfg.labels, info.num_classes)
        v = stored.views
        if cfg.batch_size and cfg.batch_size != v["batch_size"]:
            raise PrismError(f"--batch-size {cfg.batch_size}: the labels in {cfg.labels} were made for batch size "
                             f"{v['batch_size']}; drop --batch-size or relabel")
        bs = v["batch_size"]
    elif cfg.teachers and cfg.loss != "ce":
        online = load_labelers(cfg.teachers, cfg.label_teachers, source.get("primary") or "convnet", info,
                               cfg.ensemble, cfg.primary_weight, ctx.device)
    labels = {"stored": stored, "online": online, "batch_size": bs}
    if stored is not None and (cfg.mix, cfg.min_scale) != (stored.views["mix"], stored.views["min_scale"]):
        # the stored labels belong to their views: replaying them is the only consistent choice
        print(f"[validate] using the stored views (mix={stored.views['mix']}, min_scale={stored.views['min_scale']}) "
              f"from {cfg.labels}")
    out = Path(cfg.out)
    seeds = [int(s) for s in comma_list(cfg.seeds)]
    students = comma_list(cfg.student)
    per_student = {}
    for arch in students:
        results = [train_student(cfg, arch, s, data, test, info, labels, ctx, out / f"{arch}_seed{s}") for s in seeds]
        t1 = np.array([r["top1"] for r in results])
        t5 = np.array([r["top5"] for r in results])
        per_student[arch] = {
            "top1": round(float(t1.mean()), 3), "top1_std": round(float(t1.std(ddof=1)) if len(t1) > 1 else 0.0, 3),
            "top5": round(float(t5.mean()), 3), "top5_std": round(float(t5.std(ddof=1)) if len(t5) > 1 else 0.0, 3),
            "best_top1": round(float(np.mean([r["best_top1"] for r in results])), 3),
            "seeds": seeds, "runs": results,
            "curve": _mean_curve([r["curve"] for r in results]),
        }
        if ctx.rank == 0:
            r = per_student[arch]
            print(f"[validate] {arch}: final-epoch top-1 {r['top1']:.2f} +- {r['top1_std']:.2f}% "
                  f"(best epoch {r['best_top1']:.2f}%, marked best, not the result) over seeds {seeds}")
    first = per_student[students[0]]
    label_src = ("stored:" + str(cfg.labels)) if stored else (("online:" + ",".join(online.names)) if online else "hard labels")
    protocol = {"protocol": cfg.protocol, "loss": cfg.loss, "gamma": cfg.gamma if cfg.loss == "mse+ce" else None,
                "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
                "epochs": cfg.epochs, "batch_size": bs,
                "mix": stored.views["mix"] if stored else cfg.mix, "soft_labels": label_src,
                "min_scale": stored.views["min_scale"] if stored else cfg.min_scale,
                "student_width": cfg.student_width, "result": "final epoch", "test_set": f"{info.name} test ({len(test)})"}
    metrics = {"top1": first["top1"], "top5": first["top5"], "top1_std": first["top1_std"],
               "best_top1": first["best_top1"], "curve": first["curve"], "protocol": protocol,
               "seeds": seeds, "students": per_student, "source": {k: v for k, v in source.items() if k != "indices"},
               "images": len(data)}
    if ctx.rank == 0:
        write_json(out / "metrics.json", metrics)
        write_manifest(out, "validate", cfg, inputs={"dataset": info.to_dict(), "source": source},
                       outputs={"metrics": "metrics.json", "top1": metrics["top1"]}, wall_time=timer.elapsed)
    dist.barrier(ctx)
    return metrics


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    by_epoch: dict[int, list[float]] = {}
    for c in curves:
        for p in c:
            by_epoch.setdefault(p["epoch"], []).append(p["top1"])
    return [{"epoch": e, "top1": round(float(np.mean(v)), 3)} for e, v in sorted(by_epoch.items())]
