"""G-VBSM (Shao et al., CVPR 2024) as a recovery plug-in: the mechanism of its ImageNet-1k recovery code
(github.com/shaoshitong/G_VBSM_Dataset_Condensation @ 1ed80b0, ``Branch_full_ImageNet_1k/recover/``:
``data_synthesis_with_svd_with_db_with_all_statistic.py`` = S below, ``utils.py`` = U).

Per iteration ONE backbone serves every term, picked round-robin (S:147-149); the counter runs on across
batches, so iteration ``it`` of batch ``b`` uses backbone ``(b * iterations + it) % n`` (the reference's
counter as a function of (b, it), which resume and torchrun shards need). Its loss is

    CE(f(A(x)), y) + r_loss * sum_l w_l R_l(A(x)) + dd_weight * L_dd(A(x), y)        (S:151-194)

- R_l over every BatchNorm2d and Conv2d of the backbone in module order, w_0 = first_bn_multiplier (S:52-64,
  154-156). BN layer: ||running_var - st(var)|| + ||running_mean - st(mean)|| of the layer input (U:101-124);
  conv layer: the same against the REAL training set's per-channel statistics of the conv input, plus the
  mean/var of each 16x16 patch-grid cell (input resized bilinearly to a multiple of 16; U:186-234).
- st(s) = ema + s - s.detach(): value = the EMA (momentum 0.4, state starting at 0, updated with the current
  statistic first), gradient = the current statistic's (U:114-122, 217-232).
- L_dd, data densification: per class in the batch, the eigenvalues l of the Gram matrix of the 32x32-pooled
  views; KL(softmax(l / tau) || softmax(l)) (teacher detached), summed over classes (S:164-184).

Real-data conv statistics are computed once per teacher over the training set (RandomResizedCrop + flip per
image, shuffled batches of 256, per-batch statistics averaged weighted by batch size: S:68-95, U:186-201) and
stored beside the teacher (``stats.stored_layer_stats``), reused while the teacher's weights and the settings
match. Differences from the reference are listed in FIDELITY.md (G-VBSM section). The statistics, the EMA and
the real-data pass are ``stats.py``'s (shared with EDC, whose recovery builds on G-VBSM's).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import opt
from ..core.errors import PrismError
from ..core.runtime import Timer, make_generator
from .base import Options, PLUGINS, Plugin, options
from .stats import (CONV_KEYS, PATCH, STATS_BATCH, batch_stats, hooked_layers, layer_stats_path, real_data_pass,
                    smooth_stats, stat_distance, stored_layer_stats)

STATS_SEED = 0  # the stats pass's crops and order: fixed, so one file per teacher serves every recover seed


def densification_loss(x: torch.Tensor, y: torch.Tensor, tau: float, pool: int = 32) -> torch.Tensor:
    """S:164-184: per class c in the batch, G = Z_c Z_c^T (Z_c: the class's views average-pooled to pool x pool,
    flattened), l = eigenvalues of G; KL(softmax(l / tau) || softmax(l)) with the target detached, summed.

    G is symmetric, so ``eigvalsh`` gives the reference's ``eigvals(G).real`` (the KL does not depend on the
    eigenvalues' order) with a stable gradient."""
    z = F.adaptive_avg_pool2d(x.float(), pool).reshape(len(x), -1)
    total = z.new_zeros(())
    for c in sorted(set(y.tolist())):
        zc = z[y == c]
        lam = torch.linalg.eigvalsh(zc @ zc.t())
        student = lam.log_softmax(-1)
        target = (lam / tau).softmax(-1).detach()
        total = total + F.kl_div(student, target, reduction="sum")
    return total


class StatHook:
    """One layer's G-VBSM term (U:101-124 BNFeatureHook, U:203-234 ConvFeatureHook), with its EMA state."""

    def __init__(self, module: nn.Module, conv: bool, targets: dict[str, torch.Tensor] | None, momentum: float):
        self.conv, self.targets, self.momentum = conv, targets, momentum
        self.ema: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        target = self.targets if self.conv else {"var": module.running_var, "mean": module.running_mean}
        # batch_stats' keys come in the reference's order: var, mean (U:122-123), patch_mean, patch_var (U:229-232)
        self.loss = stat_distance(smooth_stats(batch_stats(inputs[0], self.conv), self.ema, self.momentum), target)

    def take(self) -> torch.Tensor:
        if self.loss is None:
            raise RuntimeError("a G-VBSM hook did not fire: the backbone was not run this iteration")
        loss, self.loss = self.loss, None
        return loss

    def remove(self) -> None:
        self.handle.remove()


def real_conv_statistics(model: nn.Module, train, info, device, images: int | None = None,
                         memory_format=torch.contiguous_format) -> tuple[dict[str, torch.Tensor], int]:
    """Every conv layer's real-data statistics (``<layer>.<var|mean|patch_var|patch_mean>``, float32) and the
    number of images used: ``images`` (None = all) of the training set in a seeded random order, each view a
    RandomResizedCrop(0.08-1) + flip of its image, in batches of 256; per-batch statistics averaged weighted
    by batch size (the reference's ``* bs / data_number`` with data_number = the images used; ``stats.py``)."""
    layers = [layer for layer in hooked_layers(model) if layer[2]]
    hooks, order = real_data_pass(model, layers, train, info, device, make_generator(STATS_SEED, "gvbsm-stats"),
                                  images, memory_format=memory_format)
    stats = {f"{name}.{k}": v.float().cpu() for (name, _, _), h in zip(layers, hooks) for k, v in h.glob.items()}
    return stats, len(order)


@options("gvbsm", kind="plugin")
class GVBSMOptions(Options):
    """G-VBSM's settings (``--method gvbsm``)."""

    gvbsm_r_loss: float = opt(0.01, "gvbsm: weight of the summed BN + conv statistics term (recover.sh --r-loss 0.01)",
                              minimum=0.0)
    gvbsm_momentum: float = opt(0.4, "gvbsm: EMA momentum of the synthetic statistics (--training-momentum, default "
                                     "0.4)", minimum=0.0)
    gvbsm_dd_weight: float = opt(1.0, "gvbsm: weight of the data-densification loss (recover.sh --nuc-norm 1.)",
                                 minimum=0.0)
    gvbsm_tau: float = opt(4.0, "gvbsm: temperature of the densification target softmax(l / tau) (--tau 4.0)",
                           minimum=0.0)
    gvbsm_dd_pool: int = opt(32, "gvbsm: side the views are average-pooled to before the per-class Gram matrix "
                                 "(the reference's 32 at 224 px)", minimum=1)
    gvbsm_stats_images: int | None = opt(None, "gvbsm: real training images in the one-off conv-statistics pass per "
                                               "teacher (None: all, the reference); stored beside the teacher",
                                         minimum=1)


@PLUGINS.register("gvbsm")
class GVBSM(Plugin):
    name = "gvbsm"

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        if cfg.alpha_bn > 0:
            raise PrismError(f"--alpha-bn {cfg.alpha_bn}: the gvbsm plug-in replaces the BN term with its own "
                             f"statistics term (--gvbsm-r-loss); set --alpha-bn 0 (the gvbsm preset does)")
        if cfg.budget != "constant":
            raise PrismError(f"--budget {cfg.budget}: the gvbsm plug-in's backbone counter assumes every batch runs "
                             f"--iterations steps; use --budget constant")
        self.order = list(pool)  # the rotation order: --bn-pool's order (reference S:337)
        self.real: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.hooks: dict[str, list[StatHook]] = {}
        self.counts: dict[str, int] = {}
        self.current: str | None = None

    def stats_settings(self) -> dict:
        """What the stored statistics depend on besides the teacher's weights (the file header)."""
        return {"dataset": self.info.name, "resolution": self.info.resolution, "train_images": len(self.train.targets),
                "images": self.cfg.gvbsm_stats_images, "seed": STATS_SEED, "batch": STATS_BATCH,
                "views": "random-resized-crop 0.08-1 + flip per image", "patch": PATCH}

    def prepare(self, out: Path, rank: int = 0) -> dict:
        settings = self.stats_settings()
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        provenance = {}
        for arch in self.order:
            t = self.teachers[arch]
            timer = Timer()
            stats, computed = stored_layer_stats(
                t.folder, settings, lambda: real_conv_statistics(t.model, self.train, self.info, self.device,
                                                                 self.cfg.gvbsm_stats_images, fmt)[0],
                rank=rank, what="gvbsm")
            layers = [name for name, _, conv in hooked_layers(t.model) if conv]
            missing = [n for n in layers if f"{n}.mean" not in stats]
            if missing:
                raise PrismError(f"{layer_stats_path(t.folder)}: no statistics for layer {missing[0]} of "
                                 f"{arch}; delete the file and re-run")
            self.real[arch] = {n: {k: stats[f"{n}.{k}"].to(self.device) for k in CONV_KEYS} for n in layers}
            provenance[arch] = {"file": str(layer_stats_path(t.folder)), "computed": computed,
                                "seconds": round(timer.elapsed, 2)}
        return {"order": self.order, "stats": provenance, "stats_settings": settings}

    def begin_batch(self, b, units, x):
        # the EMA state lives for ONE batch (hooks made here, removed in end_batch): see FIDELITY.md
        m = self.cfg.gvbsm_momentum
        self.hooks = {arch: [StatHook(mod, conv, self.real[arch].get(name) if conv else None, m)
                             for name, mod, conv in hooked_layers(self.teachers[arch].model)]
                      for arch in self.order}
        self.counts = {}

    def pick_teachers(self, b, it, ce_teacher, bn_set):
        arch = self.order[(b * self.cfg.iterations + it) % len(self.order)]  # S:147-148, counter = b*iters + it
        self.current = arch
        self.counts[arch] = self.counts.get(arch, 0) + 1
        return arch, [arch]

    def losses(self, engine, xa, y, b, it, logits):
        hooks = self.hooks[self.current]
        weights = [self.cfg.first_bn_multiplier] + [1.0] * (len(hooks) - 1)  # S:154
        r = sum(w * h.take() for w, h in zip(weights, hooks))
        out = {"gvbsm_stats": self.cfg.gvbsm_r_loss * r}
        if self.cfg.gvbsm_dd_weight > 0:
            out["gvbsm_dd"] = self.cfg.gvbsm_dd_weight * densification_loss(xa, y, self.cfg.gvbsm_tau,
                                                                              self.cfg.gvbsm_dd_pool)
        return out

    def end_batch(self, b, record):
        for hooks in self.hooks.values():
            for h in hooks:
                h.remove()
        self.hooks = {}
        record["gvbsm"] = {"first_counter": b * self.cfg.iterations, "teacher_counts": dict(self.counts)}
