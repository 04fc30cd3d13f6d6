"""squeeze: train teacher networks (a zoo, one folder per architecture), resumably.

Output per teacher, in ``<out>/<arch>/``: ``model.safetensors``, ``card.json`` (arch, dataset, classes,
epochs, test top-1, seed, config, wall time), ``log.jsonl``, ``config.yaml``. While training,
``checkpoint.pt`` holds the last finished epoch so a re-run continues from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..artifacts import CARD, WEIGHTS, locked_stage, reusable, save_model, weights_problem, write_manifest
from ..core.augment import apply_views, sample_views
from ..core.config import CommonConfig, comma_list, config_hash, opt
from ..core.data import DatasetInfo, check_class_coverage, iterate_batches, load_splits, normalize
from ..core.errors import PrismError
from ..core.io import JsonlLog, read_json
from ..core.models import create_model
from ..core.runtime import Timer, default_channels_last, make_generator, resolve_device
from ..core.training import SCHEDULES, OPTIMIZERS, evaluate, fit, make_optimizer
from ..core.log import get_logger

logger = get_logger("squeeze")


@dataclass
class SqueezeConfig(CommonConfig):
    out: str = opt("runs/teachers", "output folder: one sub-folder per architecture", hashed=False)
    arch: str = opt("convnet", "one architecture, or a comma list for a zoo (one sub-folder each)")
    width: float = opt(0.5, "width multiplier: 0.5 keeps CPU runs to minutes; use 1.0 on a GPU", minimum=0.01)
    small_stem: bool | None = opt(None, "None: a 3x3 stride-1 stem without max-pool below 64 px")
    pretrained: str | None = opt(None, '"torchvision" for ImageNet weights, or a local weights file')
    epochs: int = opt(2, "training epochs (ConvNet-D3 reaches ~90% on Fashion-MNIST in 2); 0 with --pretrained "
                         "imports pretrained weights as they are", minimum=0)
    batch_size: int = opt(128, "images per optimiser step", minimum=1)
    optimizer: str = opt("adamw", "adamw | sgd (Nesterov, momentum 0.9) | adam", choices=OPTIMIZERS)
    lr: float = opt(0.002, "peak learning rate", minimum=0.0)
    weight_decay: float = opt(0.01, "weight decay (decoupled for adamw)", minimum=0.0)
    schedule: str = opt("cosine", "learning-rate schedule over all steps", choices=SCHEDULES)
    warmup: float = opt(0.02, "fraction of training with linear LR warm-up", minimum=0.0)
    min_scale: float = opt(1.0, "RandomResizedCrop scale floor (1.0 = no crop: best in 2 epochs)")
    flip: bool = opt(True, "random horizontal flips while training")
    channels_last: bool | None = opt(None, "NHWC convolutions; None: per device (on for CUDA, off on CPU: "
                                           "BENCHMARKS.md section 1)", hashed=False)
    steps_per_epoch: int | None = opt(None, "cap on optimiser steps per epoch (None: one full pass over the data)",
                                      minimum=1)
    eval_every: int = opt(1, "epochs between test evaluations (the last epoch is always evaluated)", minimum=1,
                          hashed=False)
    force: bool = opt(False, "retrain teachers that are already finished", hashed=False)

    def check(self):
        if self.epochs == 0 and not self.pretrained:
            raise PrismError("--epochs 0: would save an untrained network; give --epochs >= 1, or --pretrained to "
                             "import pretrained weights without training")
        if not 0 < self.min_scale <= 1:
            raise PrismError(f"--min-scale {self.min_scale}: must be in (0, 1]")

    @property
    def archs(self) -> list[str]:
        return comma_list(self.arch)


@locked_stage("squeeze")
def squeeze(cfg: SqueezeConfig) -> dict[str, Path]:
    """Train (or reuse) every teacher of ``cfg.arch``; returns ``{arch: folder}``."""
    timer = Timer()
    device = resolve_device(cfg.device)
    train, test, info = load_splits(cfg)
    check_class_coverage(info, train, test)  # an empty val/ or class folder: refused now, not after an epoch
    if cfg.batch_size > len(train):
        logger.warning(f"[squeeze] --batch-size {cfg.batch_size} is larger than the {len(train)} training images: "
                       f"every teacher trains with batches of {len(train)}")
    folders = {arch: train_teacher(cfg, arch, train, test, info, device) for arch in cfg.archs}
    cards = {a: read_json(p / CARD) for a, p in folders.items()}
    write_manifest(cfg.out, "squeeze", cfg, inputs={"dataset": info.to_dict()},
                   outputs={"teachers": {a: {"folder": str(p), "test_top1": cards[a]["test_top1"]}
                                         for a, p in folders.items()}},
                   wall_time=timer.elapsed)
    return folders


def teacher_hash(cfg: SqueezeConfig, arch: str, n_train: int | None = None) -> str:
    """What shapes one teacher: its config with the zoo list replaced by its own architecture (and the batch
    it really trains with, where a small training split clips it)."""
    if n_train is not None and cfg.batch_size > n_train:
        return config_hash(cfg, arch=arch, batch_size=n_train)
    return config_hash(cfg, arch=arch)


def train_batch_size(cfg: SqueezeConfig, n_train: int) -> int:
    """--batch-size, clipped to the training split: the last incomplete batch is dropped (every step the same
    size), so a batch larger than the split would train zero steps and leave a teacher at chance (issue 27)."""
    return min(cfg.batch_size, n_train)


def train_teacher(cfg: SqueezeConfig, arch: str, train, test, info: DatasetInfo, device) -> Path:
    folder = Path(cfg.out) / arch
    chash = teacher_hash(cfg, arch, len(train))
    card = reusable(folder / CARD, chash, force=cfg.force, what="a teacher")
    problem = weights_problem(folder, card) if card is not None else None
    if card is not None and problem is None:
        logger.info(f"[squeeze] {arch}: finished teacher found in {folder} (top-1 {card['test_top1']:.2f}%), "
                    f"skipping (use --force to retrain)")
        return folder
    if problem is not None:  # a card alone is no teacher: counting it finished made every reader fail (or loop)
        logger.warning(f"[squeeze] {arch}: {folder / WEIGHTS} {problem}; training the teacher again")
    if cfg.force or problem is not None:
        for p in (folder / CARD, folder / "checkpoint.pt", folder / "log.jsonl"):
            p.unlink(missing_ok=True)
    resume = reusable(folder / "checkpoint.pt", chash, what="an unfinished teacher")
    torch.manual_seed(cfg.seed)  # weight init; data order and views use their own derived generators
    pretrained = {"torchvision": True, None: False}.get(cfg.pretrained, cfg.pretrained)
    model = create_model(arch, info.num_classes, info.channels, info.resolution, cfg.width, cfg.small_stem,
                         pretrained).to(device)
    channels_last = default_channels_last(device) if cfg.channels_last is None else cfg.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt_ = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    if resume is not None:
        logger.info(f"[squeeze] {arch}: resuming after epoch {resume['epoch']}")
    batch_size = train_batch_size(cfg, len(train))
    steps = max(1, len(train) // batch_size)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)

    def batches(epoch):
        gen = make_generator(cfg.seed, "squeeze", arch, epoch)  # data order, then every step's views
        for x, y in iterate_batches(train, batch_size, shuffle=True, generator=gen,
                                    num_workers=cfg.num_workers, drop_last=True):
            yield x, y, gen

    def loss_fn(batch):
        x, y, gen = batch
        x = normalize(x.to(device), info)
        if cfg.min_scale < 1 or cfg.flip:
            x = apply_views(x, sample_views(len(x), gen, (cfg.min_scale, 1.0), flip=cfg.flip))
        loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y.to(device))
        return {"total": loss}

    def evaluate_fn():
        return evaluate(model, test, info, device, num_workers=cfg.num_workers, channels_last=channels_last)

    result = fit(model, opt_, batches, loss_fn, epochs=cfg.epochs, steps_per_epoch=steps, lr=cfg.lr,
                 schedule=cfg.schedule, warmup=cfg.warmup, evaluate_fn=evaluate_fn, eval_every=cfg.eval_every,
                 checkpoint=folder / "checkpoint.pt", config_hash=chash, resume=resume,
                 log=JsonlLog(folder / "log.jsonl"), desc=f"squeeze {arch}", verbose=True)
    save_model(folder, model, info, cfg, result["final"], result["seconds"], chash)
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    logger.info(f"[squeeze] {arch}: test top-1 {result['final']['top1']:.2f}% -> {folder}")
    chance = 100.0 / info.num_classes
    if result["final"]["top1"] <= chance * 1.5:  # said, not refused: a smoke test trains such teachers on purpose
        logger.warning(f"[squeeze] {arch}: note: test top-1 {result['final']['top1']:.2f}% is at chance level "
                       f"({chance:.1f}% for {info.num_classes} classes); images and labels made with this teacher "
                       f"carry little; train longer (--epochs) or check the data")
    return folder
