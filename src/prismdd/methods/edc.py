"""EDC: soft category-aware statistics matching and round-robin backbones (Shao et al., NeurIPS 2024).

Reference: github.com/shaoshitong/EDC @ 80116a7, ``Branch_full_ImageNet_1k/recover/``: ``recover.py`` = R,
``utils.py`` = U. EDC's recovery is G-VBSM's (statistics of every BatchNorm2d and, with ``edc_conv``, every
Conv2d input, EMA-smoothed) with each layer's target split between the GLOBAL statistics and the CLASS
statistics of the batch's labels (``--category-aware global``, U:205-226 and U:462-503):

    r_l = (1 - a) sum_k ||G_lk - st(s_lk)||  +  a sum_k ||mean_{i in batch} C_lk[y_i] - st(s_lk)||,   a = 0.5

- k: (var, mean) of the layer input per channel over (N, H, W); conv layers add (patch_mean, patch_var): the
  input resized (bilinear) to multiples of 16, cut into 16x16 cells, each cell's mean/var over (N, C, cell).
- G: BN layers their running statistics; conv layers the real training set's statistics (per-batch statistics
  of shuffled batches of 256 averaged, weighted by batch size; U:373-389).
- C[c]: the average over class c's training images of each image's OWN statistics (per-image channel mean and
  variance over H, W; per-image cell statistics over (C, cell)) (U:192-203, U:391-403).
  ``edc_swap_patch_targets`` reproduces U:359-362: the class files store patch mean and patch variance under
  each other's names, so the reference matches the patch variance to the class patch MEANS and vice versa.
- st(s) = ema + s - s.detach(): the EMA's value (momentum ``edc_momentum``, state starting at 0, updated with the
  current statistic first) with the current statistic's gradient (U:213-221).

Loss: ``edc_weight * mean over the teachers that ran of sum_l w_l r_l`` (w_0 = first_bn_multiplier for the first
hooked layer in module order, R:229-231); the engine's own BN term is meant to be off (alpha_bn 0).
``edc_round_robin``: iteration ``it`` of batch ``b`` uses ONE teacher, (b * iterations + it) mod n of the
batch's set (R:216, the counter as a function of (b, it)), for both the CE and the statistics.
The real-data statistics are computed once per run in ``prepare`` (every image a RandomResizedCrop 0.08-1 +
flip, as R:126-138). The statistics, the EMA and the real-data pass are ``stats.py``'s (shared with G-VBSM).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.runtime import make_generator
from .base import PLUGINS, Plugin
from .stats import batch_stats, hooked_layers, real_data_pass, smooth_stats, stat_distance


def category_target(class_stats: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's class target: per statistic, the mean over its images of their class's value (U:222-223)."""
    return {k: t[y].mean(0) for k, t in class_stats.items()}


def layer_term(stats: dict[str, torch.Tensor], glob: dict[str, torch.Tensor], cat: dict[str, torch.Tensor],
               class_weight: float) -> torch.Tensor:
    """r_l: (1 - a) * sum of norms against the global targets + a * sum against the class targets (norms, not
    squared, as the reference)."""
    return (1 - class_weight) * stat_distance(stats, glob) + class_weight * stat_distance(stats, cat)


@PLUGINS.register("edc")
class EDC(Plugin):
    name = "edc"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # arch -> per hooked layer: (module, is_conv, global targets, class statistics (K, ...))
        self.targets: dict[str, list[tuple[nn.Module, bool, dict, dict]]] = {}
        self.handles: list = []
        self.inputs: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.ema: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (arch, layer) -> statistic -> EMA state
        self.counts: dict[str, int] = {}
        self.collect = False

    # ------------------------------------------------------------------ real-data statistics
    def prepare(self, out, rank: int = 0) -> dict:
        if self.cfg.edc_weight <= 0:
            return {}
        used = {}
        for arch, t in self.teachers.items():
            if hooked_layers(t.model, False):
                self.targets[arch], used[arch] = self.real_statistics(t.model)
        return {"statistics": {"images": used, "views": "RandomResizedCrop 0.08-1 + flip, batches of 256",
                               "conv": self.cfg.edc_conv}}

    def real_statistics(self, model: nn.Module) -> tuple[list[tuple[nn.Module, bool, dict, dict]], int]:
        cfg, k = self.cfg, self.info.num_classes
        layers = hooked_layers(model, cfg.edc_conv)
        hooks, order = real_data_pass(model, layers, self.train, self.info, self.device,
                                      make_generator(cfg.seed, "edc-stats"), cfg.edc_stats_images, num_classes=k)
        targets = torch.as_tensor(self.train.targets).long()
        count = torch.bincount(targets[order], minlength=k)[:k].to(self.device).clamp_min(1).double().view(-1, 1)
        out = []
        for (_, m, conv), h in zip(layers, hooks):
            cls = {key: (v / count).float() for key, v in h.sums.items()}
            if conv and cfg.edc_swap_patch_targets:  # U:359-362 + U:318-319: saved under each other's names
                cls["patch_mean"], cls["patch_var"] = cls["patch_var"], cls["patch_mean"]
            glob = ({key: v.float() for key, v in h.glob.items()} if conv
                    else {"var": m.running_var, "mean": m.running_mean})
            out.append((m, conv, glob, cls))
        return out, len(order)

    # ------------------------------------------------------------------ per batch
    def begin_batch(self, b, units, x):
        self.ema, self.counts, self.inputs = {}, {}, {}  # state of ONE batch (determinism contract)
        if self.cfg.edc_weight <= 0:
            return
        for arch, layers in self.targets.items():
            for i, (m, _, _, _) in enumerate(layers):
                def hook(module, inputs, arch=arch, i=i):
                    if self.collect:
                        self.inputs.setdefault(arch, []).append((i, inputs[0]))

                self.handles.append(m.register_forward_pre_hook(hook))
        self.collect = True

    def pick_teachers(self, b, it, ce_teacher, bn_set):
        if not self.cfg.edc_round_robin:
            return ce_teacher, bn_set
        pick = bn_set[(b * self.cfg.iterations + it) % len(bn_set)]
        self.counts[pick] = self.counts.get(pick, 0) + 1
        return pick, [pick]

    def losses(self, engine, xa, y, b, it, logits):
        seen, self.inputs = self.inputs, {}
        cfg = self.cfg
        if cfg.edc_weight <= 0:
            return {}
        totals = []
        for arch in logits:
            if arch not in seen:
                continue
            layers = self.targets[arch]
            total = 0.0
            for i, inp in seen[arch]:
                _, conv, glob, cls = layers[i]
                # the bn_normalize probe (no_grad) leaves the EMA alone
                stats = smooth_stats(batch_stats(inp, conv), self.ema.setdefault((arch, i), {}), cfg.edc_momentum,
                                     update=torch.is_grad_enabled())
                w = cfg.first_bn_multiplier if i == 0 else 1.0
                total = total + w * layer_term(stats, glob, category_target(cls, y), cfg.edc_class_weight)
            if cfg.bn_layer_reduce == "mean":
                total = total / len(layers)
            totals.append(total)
        if not totals:
            return {}
        return {"edc_stats": cfg.edc_weight * torch.stack(totals).mean()}

    def end_batch(self, b, record):
        self.collect = False
        for h in self.handles:
            h.remove()
        self.handles, self.inputs, self.ema = [], {}, {}
        if self.counts:
            record["edc_rotation_counts"] = dict(sorted(self.counts.items()))
