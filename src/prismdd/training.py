"""Shared supervised-training pieces: one epoch, evaluation, LR schedules, optimisers."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DatasetInfo, iterate_batches, normalize
from .utils import PrismError


def lr_factor(schedule: str, progress: float, warmup: float = 0.0) -> float:
    """Multiplier of the base LR at ``progress`` in [0, 1] of training.

    ``decayed_cosine``: PRISM/EDC's "decayed cosine": a cosine stretched by 2.5 (so it only falls to
    0.75 by 5/6 of training), then a linear ramp to 0 over the last sixth.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - p
    if schedule == "decayed_cosine":
        knee = 5 / 6
        at = lambda q: 0.5 * (1 + math.cos(math.pi * q / 2.5))
        return at(p) if p <= knee else at(knee) * (1 - p) / (1 - knee)
    raise PrismError(f"schedule {schedule!r}: expected cosine, decayed_cosine, linear or constant")


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise PrismError(f"optimizer {name!r}: expected adamw, sgd or adam")


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@torch.no_grad()
def evaluate(model: nn.Module, split, info: DatasetInfo, device, batch_size: int = 500,
             num_workers: int = 0, channels_last: bool = False) -> dict:
    """Top-1/top-5 (percent) and mean CE loss of ``model`` on a split."""
    model.eval()
    n, c1, c5, loss = 0, 0, 0, 0.0
    for x, y in iterate_batches(split, batch_size, shuffle=False, num_workers=num_workers):
        x = normalize(x.to(device), info)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), 1).indices
        c1 += (top[:, 0] == y).sum().item()
        c5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "n": n}


def check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss):
        raise PrismError(f"{what}: loss became {loss.item()}; lower the learning rate or check the inputs")
