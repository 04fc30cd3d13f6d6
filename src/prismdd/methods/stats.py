"""Statistics primitives shared by the G-VBSM (``gvbsm.py``) and EDC (``edc.py``) plug-ins: ONE implementation each.

EDC's recovery is G-VBSM's statistics matching with class targets added, and both reference repositories carry
the same helpers. Citations: G-VBSM = github.com/shaoshitong/G_VBSM_Dataset_Condensation @ 1ed80b0,
``Branch_full_ImageNet_1k/recover/`` (``data_synthesis_with_svd_with_db_with_all_statistic.py`` = GS,
``utils.py`` = GU); EDC = github.com/shaoshitong/EDC @ 80116a7, ``Branch_full_ImageNet_1k/recover/``
(``recover.py`` = ER, ``utils.py`` = EU).

- ``round_up16``: ``div_sixteen_mul`` (GU:28-31, EU:30-33).
- ``patch_var_mean``: the input resized (bilinear) to multiples of 16, cut into 16x16 cells, each cell's biased
  variance and mean over (N, C, cell) (GU:193-197, EU:381-383) or per image over (C, cell) (EDC's class
  statistics, EU:392-395).
- ``batch_stats`` / ``image_stats``: the statistics matched at one layer input, keys in the order both references
  use: var, mean (GU:122-123), patch_mean, patch_var (GU:229-232; EDC the same).
- ``smoothed``: st(s) = ema + s - s.detach() with the EMA updated first (GU:114-122, 217-232; EU:213-221). Both
  references start the state at the float 0. (G-VBSM's ``isinstance(state, int)`` first-call branch never
  fires), so there is no start-value switch.
- ``smooth_stats`` / ``stat_distance``: the EMA over a layer's statistics and the sum of (unsquared) norms
  against a target (G-VBSM's term; EDC's global and class terms each).
- ``hooked_layers``: BatchNorm2d (and Conv2d) modules in module order (GS:53-64; ER:75-103, conv optional).
- ``real_data_pass`` / ``RealStats``: the real-data pass, shuffled batches of 256 RandomResizedCrop(0.08-1) + flip
  views (GS:68-95, ER:126-138), per-batch statistics summed weighted by bs / N (GU:186-201, EU:373-389); with
  ``num_classes`` also per-class sums of per-image statistics (EU:391-403).
- ``stored_layer_stats``: the real-data statistics stored beside a teacher (``save_layer_stats`` below), reused
  while the teacher's weights digest and the settings in the header match, else computed and stored (both plug-ins).
"""
from __future__ import annotations

import errno
import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import WEIGHTS, file_digest, load_if_header, settings_header
from ..core.augment import apply_views, sample_views
from ..core.data import normalize
from ..core.io import remove_orphans, save_tensors
from ..core.log import get_logger

logger = get_logger("recover.stats")

PATCH = 16  # GU:195, EU:382 (h=16, w=16)
STATS_BATCH = 256  # GS:79, ER:136 (the real-data loader's batch size)
VIEW_SCALE = (0.08, 1.0)  # RandomResizedCrop scale of the real-data views (GS:68-95, ER:126-138)
BN_KEYS = ("var", "mean")  # GU:122-123
CONV_KEYS = ("var", "mean", "patch_mean", "patch_var")  # GU:229-232 (EDC: the same order)
LAYER_STATS_FILE = "gvbsm_stats.safetensors"  # beside a teacher's model.safetensors (G-VBSM's conv statistics)
LAYER_STATS_FORMAT = "prismdd-layer-stats/1"


def round_up16(v: int) -> int:
    """GU:28-31 / EU:30-33 ``div_sixteen_mul``: the next multiple of 16 (v itself when it is one)."""
    return (int(v) + PATCH - 1) // PATCH * PATCH


@functools.lru_cache(maxsize=None)
def resize_weights(n: int, size: int = PATCH) -> torch.Tensor:
    """(size, n) float64 on the CPU: the weights of ``F.interpolate(mode="bilinear")`` from n to ``size`` along one
    axis (bilinear resizing is separable), read off by resizing the unit vectors."""
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, n, 1)
    return F.interpolate(eye, size=(size, 1), mode="bilinear")[:, 0, :, 0].t().contiguous()


def var_mean(x: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over ``dim``, two-pass (mean, then mean squared deviation): measured several
    times faster on CPU than ``torch.var_mean`` or ``x.var`` for short rows (1x1 maps' H x W, 16x16 cells)."""
    mean = x.mean(dim=dim, keepdim=True)
    return (x - mean).square().mean(dim=dim), mean.squeeze(dim)


def patch_var_mean(x: torch.Tensor, per_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of each 16x16 cell of ``x`` resized (bilinear) to multiples of 16: over
    (N, C, cell) -> (cells,) each, or with ``per_image`` over (C, cell) -> (N, cells) each; cells row-major.

    Small maps are not resized in memory: with the separable resize U = A X B^T (A: nh x h, B: nw x w), a cell's
    sum is r^T X c and its sum of squares <G X H, X> (G, H: the cell's Gram matrices of A's and B's rows), in
    float64. One cell of a map of at most 8 x 8 (a 1x1 map becomes one 16x16 cell) uses plain matrix products;
    other small maps an einsum per cell; larger maps are resized (channels-last: ~5x faster on CPU)."""
    b, c, h, w = x.shape
    nh, nw = round_up16(h), round_up16(w)
    u, v = nh // PATCH, nw // PATCH
    with torch.autocast(x.device.type, enabled=False):
        if u * v == 1 and h <= PATCH // 2 and w <= PATCH // 2:  # measured: faster than resizing up to 8 px
            xd = x.double()
            ra, rb = resize_weights(h).to(x.device), resize_weights(w).to(x.device)
            s1 = torch.einsum("bcij,i,j->b", xd, ra.sum(0), rb.sum(0)).view(b, 1)
            s2 = ((ra.t() @ ra) @ xd @ (rb.t() @ rb) * xd).sum(dim=(1, 2, 3)).view(b, 1)
        elif u * v * h * w * (h + w) < 4 * nh * nw:  # other small maps: cheaper than the resized map
            xd = x.double()
            rows = resize_weights(h, nh).to(x.device).view(u, PATCH, h)
            cols = resize_weights(w, nw).to(x.device).view(v, PATCH, w)
            s1 = torch.einsum("uh,bchw,vw->buv", rows.sum(1), xd, cols.sum(1)).flatten(1)
            gx = torch.einsum("uih,uik,bckw->bcuhw", rows, rows, xd)
            xh = torch.einsum("bchw,viw,vil->bcvhl", xd, cols, cols)
            s2 = torch.einsum("bcuhw,bcvhw->buv", gx, xh).flatten(1)
        else:
            r = F.interpolate(x.float().contiguous(memory_format=torch.channels_last), size=(nh, nw), mode="bilinear")
            cells = r.reshape(b, c, u, PATCH, v, PATCH)
            var, mean = var_mean(cells, (1, 3, 5) if per_image else (0, 1, 3, 5))
            shape = (b, u * v) if per_image else (u * v,)
            return var.reshape(shape), mean.reshape(shape)
        n = c * PATCH * PATCH
        if not per_image:
            s1, s2, n = s1.sum(0), s2.sum(0), n * b
        mean = s1 / n
        return (s2 / n - mean * mean).float(), mean.float()


def batch_stats(x: torch.Tensor, conv: bool = False) -> dict[str, torch.Tensor]:
    """The batch's statistics of one layer input, float32: per-channel var/mean over (N, H, W); conv layers add
    each 16x16 cell's mean/var over (N, C, cell pixels). Keys in ``CONV_KEYS`` order."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        out = dict(zip(BN_KEYS, var_mean(x, [0] + list(range(2, x.ndim)))))
        if conv:
            out["patch_var"], out["patch_mean"] = patch_var_mean(x)
    return {k: out[k] for k in CONV_KEYS if k in out}


def image_stats(x: torch.Tensor, conv: bool = False) -> dict[str, torch.Tensor]:
    """Each image's OWN statistics (EU:197-198, 392-395): (N, C) channel var/mean over (H, W); conv layers add
    (N, cells) cell mean/var over (C, cell pixels). Keys in ``CONV_KEYS`` order."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        out = dict(zip(BN_KEYS, var_mean(x.flatten(2), 2)))
        if conv:
            out["patch_var"], out["patch_mean"] = patch_var_mean(x, per_image=True)
    return {k: out[k] for k in CONV_KEYS if k in out}


def smoothed(current: torch.Tensor, ema: torch.Tensor | None, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistic to match, new EMA state): the new EMA ``m * state + (1 - m) * current`` (no gradient; state
    None = the references' 0.) as value, the current statistic's gradient (GU:114-123, EU:213-221)."""
    new = (1 - momentum) * current.detach() + (0.0 if ema is None else momentum * ema)
    return new + current - current.detach(), new


def smooth_stats(current: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], momentum: float,
                 update: bool = True) -> dict[str, torch.Tensor]:
    """``smoothed`` of every statistic in ``current`` (same keys and order), the states kept in ``ema`` (key ->
    state, missing = 0.) and replaced by the new ones unless ``update`` is False (EDC passes False under no_grad:
    its bn_normalize probe leaves the EMA alone; G-VBSM always updates)."""
    out = {}
    for key, s in current.items():
        out[key], new = smoothed(s, ema.get(key), momentum)
        if update:
            ema[key] = new
    return out


def stat_distance(stats: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over the keys of ``stats`` of ||target_k - stats_k||_2, norms not squared (GU:122-123, 229-232;
    EU:205-226, 462-503), in float32."""
    return torch.stack([torch.linalg.vector_norm(target[k].float() - s) for k, s in stats.items()]).sum()


def hooked_layers(model: nn.Module, conv: bool = True) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, is_conv) of every BatchNorm2d, and Conv2d when ``conv``, in module order (G-VBSM GS:53-64
    hooks both always; EDC ER:75-103 adds the convs only with its conv option)."""
    kinds = (nn.BatchNorm2d, nn.Conv2d) if conv else (nn.BatchNorm2d,)
    return [(n, m, isinstance(m, nn.Conv2d)) for n, m in model.named_modules() if isinstance(m, kinds)]


class RealStats:
    """Forward pre-hook of the real-data pass at one layer. ``glob``: the conv-input statistics of each batch
    summed with weight bs / total (GU:186-201, EU:373-389). With ``num_classes`` (EDC) also ``sums``: per class
    (K, ...) float64 sums of each image's own statistics (EU:391-403); the batch statistics are then derived from
    the per-image ones (equal sizes: law of total variance) instead of computed again. ``y``: the batch's labels,
    set by ``real_data_pass``."""

    def __init__(self, conv: bool, total: int, num_classes: int | None = None):
        self.conv, self.total, self.k = conv, total, num_classes
        self.glob: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.y: torch.Tensor | None = None

    def add(self, stats: dict[str, torch.Tensor], bs: int) -> None:
        for key, v in stats.items():
            self.glob[key] = self.glob.get(key, 0.0) + v.double() * bs / self.total

    def __call__(self, module, inputs):
        x = inputs[0]
        if self.k is None:
            if self.conv:
                self.add(batch_stats(x, True), len(x))
            return
        per_image = image_stats(x, self.conv)
        if self.conv:
            batch = {}
            for mean, var in (("mean", "var"), ("patch_mean", "patch_var")):
                spread, batch[mean] = var_mean(per_image[mean].double(), 0)
                batch[var] = per_image[var].double().mean(0) + spread
            self.add(batch, len(x))
        for key, v in per_image.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros(self.k, v.shape[1], dtype=torch.float64, device=v.device)
            self.sums[key].index_add_(0, self.y, v.double())


def real_data_pass(model: nn.Module, layers: list[tuple[str, nn.Module, bool]], train, info, device,
                   gen: torch.Generator, images: int | None = None, num_classes: int | None = None,
                   memory_format=torch.contiguous_format) -> tuple[list[RealStats], torch.Tensor]:
    """Run ``model`` over ``images`` (None = all) training images in a random order drawn from ``gen``, each view
    a RandomResizedCrop(0.08-1) + flip of its image (crops from ``gen`` too), in batches of 256, with a
    ``RealStats`` pre-hook on every module of ``layers``; returns the hooks (in ``layers`` order) and the order."""
    order = torch.randperm(len(train.targets), generator=gen)
    order = order[:images] if images else order
    labels = torch.as_tensor(train.targets).long()
    hooks = [RealStats(conv, len(order), num_classes) for _, _, conv in layers]
    handles = [m.register_forward_pre_hook(h) for (_, m, _), h in zip(layers, hooks)]
    try:
        with torch.no_grad():
            for s in range(0, len(order), STATS_BATCH):
                idx = order[s: s + STATS_BATCH]
                x = normalize(train.get_images(idx), info)
                x = apply_views(x, sample_views(len(idx), gen, VIEW_SCALE, flip=True, per="image"))
                if num_classes is not None:
                    y = labels[idx].to(device)
                    for h in hooks:
                        h.y = y
                model(x.to(device).contiguous(memory_format=memory_format))
    finally:
        for h in handles:
            h.remove()
    return hooks, order


def stored_layer_stats(folder, settings: dict, compute: Callable[[], dict[str, torch.Tensor]], *, rank: int = 0,
                       name: str = LAYER_STATS_FILE, what: str = "real-data") -> tuple[dict[str, torch.Tensor], bool]:
    """(statistics, computed): the file ``name`` beside the teacher in ``folder`` when its header matches the
    teacher's current weights and ``settings``, else ``compute()`` (its tensors on the CPU), stored by rank 0
    (every rank computes the same numbers: the pass is seeded). A folder that cannot be written (a shared,
    read-only zoo) gets a notice and the statistics serve this run only; ``folder`` None: never stored."""
    stats = load_layer_stats(folder, settings, name) if folder is not None else None
    if stats is not None:
        return stats, False
    stats = compute()
    if rank == 0 and folder is not None:
        try:
            save_layer_stats(folder, stats, settings, name)
        except OSError as e:
            if not isinstance(e, PermissionError) and e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            logger.warning(f"[recover] {what}: {folder} is read-only; its real-data statistics are not stored and "
                           f"will be recomputed by the next run ({layer_stats_path(folder, name).name})")
    return stats, True


# ----------------------------------------------------------------------------- the stored file (beside a teacher)


def layer_stats_path(teacher_folder, name: str = LAYER_STATS_FILE) -> Path:
    """A teacher's stored real-data statistics: ``name`` is G-VBSM's file by default (EDC: ``edc_stats_file``)."""
    return Path(teacher_folder) / name


def layer_stats_header(teacher_folder, settings: dict) -> dict[str, str]:
    """The header a statistics file must carry to be reused: its format, the sha256 of the teacher's weights
    it was computed with (``file_digest``) and the ``settings`` (dataset, images, seed, ...), all as text."""
    return settings_header(LAYER_STATS_FORMAT, settings, teacher_digest=file_digest(Path(teacher_folder) / WEIGHTS))


def load_layer_stats(teacher_folder, settings: dict, name: str = LAYER_STATS_FILE) -> dict[str, torch.Tensor] | None:
    """The stored statistics of a teacher when the file's header matches the teacher's CURRENT weights and
    ``settings``; None when there is no file or it was made from other weights (teacher retrained in place)
    or other settings: the caller recomputes and overwrites it. A damaged file is refused (one line)."""
    return load_if_header(layer_stats_path(teacher_folder, name), layer_stats_header(teacher_folder, settings))


def save_layer_stats(teacher_folder, stats: dict[str, torch.Tensor], settings: dict,
                     name: str = LAYER_STATS_FILE) -> Path:
    """Write a teacher's statistics atomically (safetensors, header from ``layer_stats_header``)."""
    path = layer_stats_path(teacher_folder, name)
    remove_orphans(path.parent, depth=0)  # a run killed while writing here left its temporary copy (no lock here)
    save_tensors(stats, path, metadata=layer_stats_header(teacher_folder, settings))
    return path
