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
``edc_round_robin``: each iteration uses ONE teacher of the batch's set, ``counter mod n``, for both the CE and the
statistics (R:216). The reference keeps one counter per process that every iteration advances and no batch resets
(R:170, 221); each of its ``edc_gpus`` processes optimises its share of every batch, so prismdd's batch ``b`` (one
share) is that process's (b // edc_gpus)-th and its counter is (b // edc_gpus) * iterations + it: the reference's
value, as a function of (b, it), so resume and torchrun shards give the same images. The rotation's order is
``edc_order`` (the reference's R:386 list in the preset), then the rest of the set. The reference's pool includes
AlexNet, which has no BatchNorm: with ``edc_conv`` every Conv2d input is matched (R:93-103), so a BN-free backbone
takes part through its conv statistics alone (``takes_bn_free``).
The real-data statistics (every image a RandomResizedCrop 0.08-1 + flip, as R:126-138; order and crops drawn from
(seed, "edc-stats")) are computed once per teacher and seed and stored beside the teacher
(``edc_stats_seed<seed>.safetensors``, G-VBSM's mechanism: ``stats.stored_layer_stats``), reused while the teacher's
weights and the settings that shape them match. The statistics, the EMA and the real-data pass are ``stats.py``'s
(shared with G-VBSM).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.config import comma_list, opt
from ..core.errors import PrismError
from ..core.runtime import Timer, make_generator
from .base import Options, PLUGINS, Plugin, options
from .stats import (PATCH, STATS_BATCH, batch_stats, hooked_layers, layer_stats_path, real_data_pass, smooth_stats,
                    stat_distance, stored_layer_stats)


def category_target(class_stats: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's class target: per statistic, the mean over its images of their class's value (U:222-223)."""
    return {k: t[y].mean(0) for k, t in class_stats.items()}


def layer_term(stats: dict[str, torch.Tensor], glob: dict[str, torch.Tensor], cat: dict[str, torch.Tensor],
               class_weight: float) -> torch.Tensor:
    """r_l: (1 - a) * sum of norms against the global targets + a * sum against the class targets (norms, not
    squared, as the reference)."""
    return (1 - class_weight) * stat_distance(stats, glob) + class_weight * stat_distance(stats, cat)


@options("edc", kind="plugin")
class EDCOptions(Options):
    """EDC's settings (``--method edc``): the category-aware statistics term and its round-robin."""

    edc_weight: float = opt(0.0, "edc: weight of the soft category-aware statistics term (recover.sh --r-loss 0.1); "
                                 "0 = off", minimum=0.0)
    edc_class_weight: float = opt(0.5, "edc: share of the class-statistics part in each layer's term, the rest "
                                       "matches the running statistics (--category-aware global: 0.5)",
                                  minimum=0.0)
    edc_momentum: float = opt(0.8, "edc: EMA momentum of the synthetic statistics (--training-momentum 0.8); 0 = "
                                   "none", minimum=0.0)
    edc_stats_images: int | None = opt(None, "edc: training images (random, seeded) in the one-off pass that makes the "
                                             "global conv and the class statistics (None: all, the reference)",
                                       minimum=1)
    edc_conv: bool = opt(False, "edc: also match every Conv2d input's channel and 16x16-patch statistics (G-VBSM's "
                                "conv hooks, EDC's default); off: BatchNorm layers only")
    edc_swap_patch_targets: bool = opt(False, "edc: the reference's class files hold patch mean and variance under "
                                              "each other's names (utils.py:359-362); on: match them that way")
    edc_round_robin: bool = opt(False, "edc: one teacher of the batch's set per iteration, counter mod n, for CE and "
                                       "statistics (the reference's counter)")
    edc_order: str | None = opt(None, "edc: the round-robin's order, a comma list; the batch's teachers named here "
                                      "come first, in this order, the rest after in --bn-pool order")
    edc_gpus: int = opt(1, "edc: the reference's processes per batch, each counting its own iterations: batch b (one "
                           "process's share) has counter (b // edc_gpus) * iterations + it (recover.sh: 4)", minimum=1)

    @staticmethod
    def check(cfg) -> None:
        if cfg.edc_class_weight > 1:
            raise PrismError(f"--edc-class-weight {cfg.edc_class_weight}: a share, expected 0 to 1")
        if cfg.edc_momentum >= 1:
            raise PrismError(f"--edc-momentum {cfg.edc_momentum}: expected 0 <= momentum < 1")


@PLUGINS.register("edc")
class EDC(Plugin):
    name = "edc"

    @classmethod
    def takes_bn_free(cls, cfg) -> bool:
        # a BN-free backbone (the reference's AlexNet) is matched through its Conv2d inputs, never the engine's R_BN
        return cfg.edc_conv and cfg.edc_weight > 0 and cfg.alpha_bn == 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cfg.edc_round_robin and self.cfg.budget != "constant":
            raise PrismError(f"--budget {self.cfg.budget}: edc's backbone counter (the reference's) assumes every "
                             f"batch runs --iterations steps; use --budget constant")
        # arch -> per hooked layer: (module, is_conv, global targets, class statistics (K, ...))
        self.targets: dict[str, list[tuple[nn.Module, bool, dict, dict]]] = {}
        self.handles: list = []
        self.inputs: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.ema: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (arch, layer) -> statistic -> EMA state
        self.counts: dict[str, int] = {}
        self.collect = False

    # ------------------------------------------------------------------ real-data statistics
    def stats_settings(self) -> dict:
        """What the stored statistics depend on besides the teacher's weights (the file header). The patch swap is
        applied after loading, so it is not one of them."""
        cfg, info = self.cfg, self.info
        return {"dataset": info.name, "resolution": info.resolution, "train_images": len(self.train.targets),
                "num_classes": info.num_classes, "images": cfg.edc_stats_images, "seed": cfg.seed,
                "stream": "edc-stats", "batch": STATS_BATCH, "views": "random-resized-crop 0.08-1 + flip per image",
                "patch": PATCH, "conv": cfg.edc_conv}

    def images_used(self) -> int:
        n, cap = len(self.train.targets), self.cfg.edc_stats_images
        return min(cap, n) if cap else n  # ``real_data_pass``: the first ``images`` of the order, None/0 = all

    def prepare(self, out, rank: int = 0) -> dict:
        if self.cfg.edc_weight <= 0:
            return {}
        settings, name = self.stats_settings(), edc_stats_file(self.cfg.seed)
        used, files = {}, {}
        for arch, t in self.teachers.items():
            if not hooked_layers(t.model, self.cfg.edc_conv):  # BN-free models count through their conv layers
                continue
            folder, timer = getattr(t, "folder", None), Timer()  # no folder (a bare model): computed, not stored
            stats, computed = stored_layer_stats(folder, settings, lambda: self.real_pass(t.model), rank=rank,
                                                 name=name, what="edc")
            where = layer_stats_path(folder, name) if folder is not None else None
            self.targets[arch], used[arch] = self.layer_targets(t.model, stats, where), self.images_used()
            if folder is not None:
                files[arch] = {"file": str(where), "computed": computed, "seconds": round(timer.elapsed, 2)}
        return {"statistics": {"images": used, "views": "RandomResizedCrop 0.08-1 + flip, batches of 256",
                               "conv": self.cfg.edc_conv, "stored": files, "settings": settings}}

    def real_pass(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The real-data pass over ``model``: ``<layer>.global.<stat>`` (conv layers: the batch statistics weighted
        by bs / N) and ``<layer>.class.<stat>`` (K, ...) (per class, the mean of each image's own statistics), float32
        on the CPU, unswapped (the file's content)."""
        cfg, k = self.cfg, self.info.num_classes
        layers = hooked_layers(model, cfg.edc_conv)
        hooks, order = real_data_pass(model, layers, self.train, self.info, self.device,
                                      make_generator(cfg.seed, "edc-stats"), cfg.edc_stats_images, num_classes=k)
        targets = torch.as_tensor(self.train.targets).long()
        count = torch.bincount(targets[order], minlength=k)[:k].to(self.device).clamp_min(1).double().view(-1, 1)
        out = {}
        for (name, _, conv), h in zip(layers, hooks):
            out.update({f"{name}.class.{key}": (v / count).float().cpu() for key, v in h.sums.items()})
            if conv:
                out.update({f"{name}.global.{key}": v.float().cpu() for key, v in h.glob.items()})
        return out

    def layer_targets(self, model: nn.Module, stats: dict[str, torch.Tensor],
                      where=None) -> list[tuple[nn.Module, bool, dict, dict]]:
        """Per hooked layer (module, is_conv, global targets, class statistics) on the device, from ``real_pass``'s
        tensors (computed or loaded from ``where``); BN layers' global targets are their running statistics."""
        out = []
        for name, m, conv in hooked_layers(model, self.cfg.edc_conv):
            if f"{name}.class.mean" not in stats or (conv and f"{name}.global.mean" not in stats):
                raise PrismError(f"{where}: no statistics for layer {name}; delete the file and re-run")
            cls = {key: v.to(self.device) for key, v in self._part(stats, name, "class").items()}
            if conv and self.cfg.edc_swap_patch_targets:  # U:359-362 + U:318-319: saved under each other's names
                cls["patch_mean"], cls["patch_var"] = cls["patch_var"], cls["patch_mean"]
            glob = ({key: v.to(self.device) for key, v in self._part(stats, name, "global").items()} if conv
                    else {"var": m.running_var, "mean": m.running_mean})
            out.append((m, conv, glob, cls))
        return out

    @staticmethod
    def _part(stats: dict[str, torch.Tensor], name: str, part: str) -> dict[str, torch.Tensor]:
        prefix = f"{name}.{part}."
        return {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}

    def real_statistics(self, model: nn.Module) -> tuple[list[tuple[nn.Module, bool, dict, dict]], int]:
        """The layer targets freshly computed (no file) and the number of images used."""
        return self.layer_targets(model, self.real_pass(model)), self.images_used()

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

    def rotation(self, bn_set: list[str]) -> list[str]:
        """The round-robin's order: the set's members named in ``edc_order`` first, in that order, then the others
        in the set's (--bn-pool) order."""
        named = [a for a in comma_list(self.cfg.edc_order) if a in bn_set]
        return named + [a for a in bn_set if a not in named]

    def counter(self, b: int, it: int) -> int:
        """The reference's per-process iteration counter at iteration ``it`` of batch ``b`` (module docstring)."""
        return (b // self.cfg.edc_gpus) * self.cfg.iterations + it

    def pick_teachers(self, b, it, ce_teacher, bn_set):
        if not self.cfg.edc_round_robin:
            return ce_teacher, bn_set
        order = self.rotation(bn_set)
        pick = order[self.counter(b, it) % len(order)]
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


# ----------------------------------------------------------------------------- the stored file
def edc_stats_file(seed: int) -> str:
    """EDC's statistics file beside a teacher: one per recover seed (its real-data pass is drawn from the seed)."""
    return f"edc_stats_seed{int(seed)}.safetensors"
