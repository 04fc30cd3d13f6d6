"""squeeze: train teacher networks (a zoo, one folder per architecture), resumably.

Output per teacher, in ``<out>/<arch>/``: ``model.safetensors``, ``card.json`` (arch, dataset, classes,
epochs, test top-1, seed, config, wall time), ``log.jsonl``, ``config.yaml``. While training,
``checkpoint.pt`` holds the last finished epoch so a re-run continues from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .augment import apply_views, sample_views
from .config import CommonConfig, comma_list, config_to_dict
from .data import DatasetInfo, iterate_batches, load_splits, normalize
from .models import create_model, model_from_spec
from .training import check_finite, evaluate, lr_factor, make_optimizer, set_lr
from .utils import (JsonlLog, config_hash, PrismError, Timer, atomic_path, make_generator, progress, read_json,
                    resolve_device, torch_load, torch_save, write_json, write_manifest)


@dataclass
class SqueezeConfig(CommonConfig):
    out: str = "runs/teachers"
    arch: str = "convnet"  # one architecture, or a comma list for a zoo (one sub-folder each)
    width: float = 0.5  # width multiplier: 0.5 keeps CPU runs to minutes; use 1.0 on a GPU
    small_stem: bool | None = None  # None: 3x3 stride-1 stem without max-pool below 64 px
    pretrained: str | None = None  # "torchvision" for ImageNet weights, or a local weights file
    epochs: int = 2  # ConvNet-D3 reaches ~90% on Fashion-MNIST in 2 epochs
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 0.002
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup: float = 0.02  # fraction of training with linear LR warm-up
    min_scale: float = 1.0  # RandomResizedCrop scale floor for teacher training (1.0 = no crop: best in 2 epochs)
    flip: bool = True
    channels_last: bool = False
    steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (None: one full pass over the data)
    eval_every: int = 1  # epochs between test evaluations (the last epoch is always evaluated)
    force: bool = False  # retrain teachers that are already finished

    def validate(self):
        if self.epochs < 0:
            raise PrismError("epochs: must be >= 0")
        if not 0 < self.min_scale <= 1:
            raise PrismError("min_scale: must be in (0, 1]")

    @property
    def archs(self) -> list[str]:
        return comma_list(self.arch)


def squeeze(cfg: SqueezeConfig) -> dict[str, Path]:
    """Train (or reuse) every teacher of ``cfg.arch``; returns ``{arch: folder}``."""
    timer = Timer()
    device = resolve_device(cfg.device)
    train, test, info = load_splits(cfg)
    out = Path(cfg.out)
    folders = {}
    for arch in cfg.archs:
        folders[arch] = train_teacher(cfg, arch, train, test, info, device)
    teachers = {a: read_json(p / "card.json") for a, p in folders.items()}
    write_manifest(out, "squeeze", cfg, inputs={"dataset": info.to_dict()},
                   outputs={"teachers": {a: {"folder": str(p), "test_top1": teachers[a]["test_top1"]}
                                         for a, p in folders.items()}},
                   wall_time=timer.elapsed)
    return folders


def train_teacher(cfg: SqueezeConfig, arch: str, train, test, info: DatasetInfo, device) -> Path:
    folder = Path(cfg.out) / arch
    card_path, ckpt_path = folder / "card.json", folder / "checkpoint.pt"
    if card_path.exists() and not cfg.force:
        card = read_json(card_path)
        if card.get("config_hash") not in (None, teacher_hash(cfg, arch)):
            raise PrismError(f"{folder}: holds a teacher trained with other settings; use --force to retrain it, "
                             f"or another --out")
        print(f"[squeeze] {arch}: finished teacher found in {folder} (top-1 {card['test_top1']:.2f}%), "
              f"skipping (use --force to retrain)")
        return folder
    if cfg.force:
        for p in (card_path, ckpt_path, folder / "log.jsonl"):
            p.unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)  # weight init; data order and views use their own derived generators
    pretrained = {"torchvision": True, None: False}.get(cfg.pretrained, cfg.pretrained)
    model = create_model(arch, info.num_classes, info.channels, info.resolution, cfg.width, cfg.small_stem,
                         pretrained).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    log = JsonlLog(folder / "log.jsonl")
    start_epoch, elapsed_before = 0, 0.0
    if ckpt_path.exists():
        ck = torch_load(ckpt_path, map_location=device)
        if ck.get("config_hash") != teacher_hash(cfg, arch):
            raise PrismError(f"{ckpt_path}: an unfinished teacher with other settings; use --force to restart it")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, elapsed_before = int(ck["epoch"]), float(ck["elapsed"])
        print(f"[squeeze] {arch}: resuming after epoch {start_epoch}")
    timer = Timer()
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    total = max(1, cfg.epochs * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = make_generator(cfg.seed, "squeeze", arch, epoch)
        bar = progress(total=steps_per_epoch, desc=f"squeeze {arch} {epoch + 1}/{cfg.epochs}", leave=False)
        run_loss, seen = 0.0, 0
        for step, (x, y) in enumerate(iterate_batches(train, cfg.batch_size, shuffle=True, generator=gen,
                                                      num_workers=cfg.num_workers, drop_last=True)):
            if step >= steps_per_epoch:
                break
            set_lr(opt, cfg.lr * lr_factor(cfg.schedule, (epoch * steps_per_epoch + step) / total, cfg.warmup))
            x = normalize(x.to(device), info)
            if cfg.min_scale < 1 or cfg.flip:
                x = apply_views(x, sample_views(len(x), gen, (cfg.min_scale, 1.0), flip=cfg.flip))
            x = x.contiguous(memory_format=memory_format)
            loss = F.cross_entropy(model(x), y.to(device))
            check_finite(loss, f"squeeze {arch} epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item() * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss / seen:.3f}")
        bar.close()
        last = epoch + 1 == cfg.epochs
        ev = (evaluate(model, test, info, device, num_workers=cfg.num_workers, channels_last=cfg.channels_last)
              if last or (epoch + 1) % max(1, cfg.eval_every) == 0 else {"top1": None, "top5": None})
        torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "elapsed": elapsed_before + timer.elapsed, "config_hash": teacher_hash(cfg, arch)}, ckpt_path)
        # logged after the checkpoint: a kill in between never makes a resumed run log an epoch twice
        log.write(epoch=epoch + 1, train_loss=run_loss / max(seen, 1), test_top1=ev["top1"], test_top5=ev["top5"])
        if ev["top1"] is not None:
            print(f"[squeeze] {arch} epoch {epoch + 1}/{cfg.epochs}: train loss {run_loss / max(seen, 1):.4f}, "
                  f"test top-1 {ev['top1']:.2f}%")
    final = ev if cfg.epochs > start_epoch and ev["top1"] is not None else \
        evaluate(model, test, info, device, num_workers=cfg.num_workers, channels_last=cfg.channels_last)
    save_teacher(folder, model, info, cfg, final, elapsed_before + timer.elapsed)
    ckpt_path.unlink(missing_ok=True)
    print(f"[squeeze] {arch}: test top-1 {final['top1']:.2f}% -> {folder}")
    return folder


def teacher_hash(cfg: SqueezeConfig, arch: str) -> str:
    """Hash of what shapes one teacher: its config with the zoo list replaced by its own architecture."""
    from .config import replace

    return config_hash(replace(cfg, arch=arch), exclude=("out", "device", "num_workers", "force"))


def save_teacher(folder: Path, model: nn.Module, info: DatasetInfo, cfg, ev: dict, wall: float) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    card = {
        "arch": model.prismdd_spec["arch"],
        "spec": model.prismdd_spec,
        "dataset": info.name,
        "class_names": info.class_names,
        "mean": list(info.mean), "std": list(info.std),
        "epochs": getattr(cfg, "epochs", None),
        "test_top1": round(ev["top1"], 3),
        "test_top5": round(ev["top5"], 3),
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "wall_time_s": round(wall, 2),
        "config_hash": teacher_hash(cfg, model.prismdd_spec["arch"]) if isinstance(cfg, SqueezeConfig) else None,
    }
    from .config import save_config

    save_config(cfg, folder / "config.yaml")
    write_json(folder / "card.json", card)  # written last: its presence marks a finished teacher


def load_teacher(path, *, arch: str | None = None, dataset: str | None = None,
                 class_names: list[str] | None = None, device="cpu") -> tuple[nn.Module, dict]:
    """Load a teacher folder (or its ``model.safetensors``) in eval mode, checking what the caller expects."""
    folder = Path(path)
    if folder.name == "model.safetensors":
        folder = folder.parent
    card_path = folder / "card.json"
    if not card_path.exists():
        raise PrismError(f"{folder}: no card.json; not a finished teacher (train it with `prismdd squeeze`)")
    card = read_json(card_path)
    if arch is not None and card["arch"] != arch:
        raise PrismError(f"{folder}: teacher is {card['arch']!r}, expected {arch!r}")
    if dataset is not None and card["dataset"] != dataset:
        raise PrismError(f"{folder}: teacher was trained on {card['dataset']!r}, expected {dataset!r}")
    if class_names is not None and list(card["class_names"]) != list(class_names):
        raise PrismError(f"{folder}: teacher classes differ from the dataset's ({len(card['class_names'])} vs "
                         f"{len(class_names)} classes, or another order)")
    model = model_from_spec(card["spec"])
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise PrismError(f"{folder / 'model.safetensors'}: cannot load ({str(e).splitlines()[0]})") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def find_teachers(folder) -> dict[str, Path]:
    """``{arch: teacher folder}`` for every finished teacher under a squeeze output folder."""
    folder = Path(folder)
    if (folder / "card.json").exists():
        return {read_json(folder / "card.json")["arch"]: folder}
    found = {}
    for card in sorted(folder.glob("*/card.json")):
        found[read_json(card)["arch"]] = card.parent
    if not found:
        raise PrismError(f"--teachers {folder}: no finished teachers found (expected <arch>/card.json); "
                         f"train them with `prismdd squeeze --out {folder}`")
    return found
