"""Batched, seedable, differentiable image views: RandomResizedCrop + flip (+ CutMix), jitter, epoch plans.

Size: about 420 lines, because every view the package draws is defined here (crops and flips, CutMix, jitter,
PatchShuffle, RandAugment, and the epoch plans that store them), so recover, relabel and validate draw and
replay the same views from one place; a split would put the drawing of a view and its replay in two modules.

Views are *parameters* (a crop box and a flip bit per image, a box and a permutation per CutMix batch)
drawn from a ``torch.Generator`` and applied with one ``grid_sample`` for the whole batch. That makes
them (a) differentiable w.r.t. the pixels, for recovery; (b) cheap to store and replay exactly, so
relabel and validate see identical views (FKD-style) without pickling tensors.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import functools
import math
import multiprocessing
import random  # only inside rand_augment_images: seeded per image from the stored views, state restored after
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import DatasetInfo, normalize
from .errors import PrismError
from .runtime import make_generator


@dataclass
class Views:
    boxes: torch.Tensor  # (N, 4) float: x0, y0, w, h as fractions of the image side
    flips: torch.Tensor  # (N,) bool
    # PatchShuffle (RDED), applied before the crop: (N, f) long each; strip j of the output is strip cols[j]
    # (rows[j]) of the input. None: no shuffle.
    cols: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    # RandAugment (DELT), applied to the uint8 image before everything else: (N,) int64, the seed of each
    # image's timm RandAugment draw (see ``rand_augment_images``). None: no RandAugment.
    ra_seeds: torch.Tensor | None = None

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        d = {prefix + "boxes": self.boxes, prefix + "flips": self.flips.to(torch.uint8)}
        if self.cols is not None:
            d.update({prefix + "shuffle_cols": self.cols, prefix + "shuffle_rows": self.rows})
        if self.ra_seeds is not None:
            d[prefix + "rand_augment_seeds"] = self.ra_seeds
        return d

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "") -> "Views":
        cols, rows = d.get(prefix + "shuffle_cols"), d.get(prefix + "shuffle_rows")
        seeds = d.get(prefix + "rand_augment_seeds")
        return cls(d[prefix + "boxes"].float(), d[prefix + "flips"].bool(),
                   None if cols is None else cols.long(), None if rows is None else rows.long(),
                   None if seeds is None else seeds.long())

    def __getitem__(self, sl) -> "Views":
        return Views(self.boxes[sl], self.flips[sl], None if self.cols is None else self.cols[sl],
                     None if self.rows is None else self.rows[sl],
                     None if self.ra_seeds is None else self.ra_seeds[sl])


def sample_patch_shuffle(n: int, factor: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One column order and one row order per image (each a uniform permutation of ``factor`` strips), as
    RDED's ``ShufflePatches`` (``random.shuffle`` of the column strips, then of the row strips)."""
    cols = torch.rand(n, factor, generator=generator).argsort(1)
    rows = torch.rand(n, factor, generator=generator).argsort(1)
    return cols, rows


def shuffle_patches(x: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """RDED's PatchShuffle on a batch (B, C, H, W): the image is cut into ``f`` column strips of width
    W // f (pixels beyond f * (W // f) are dropped, as the reference's slicing drops them), reordered so
    that output strip j is input strip ``cols[b, j]``; then the same with ``f`` row strips of height
    H // f and ``rows``. Columns and rows are permuted independently (f! * f! arrangements, not (f*f)!)."""
    b, c, h, w = x.shape
    f = cols.shape[1]
    th, tw = h // f, w // f
    x = x[:, :, : f * th, : f * tw]
    ci = (cols.to(x.device)[:, :, None] * tw + torch.arange(tw, device=x.device)).reshape(b, 1, 1, f * tw)
    x = x.gather(3, ci.expand(b, c, f * th, f * tw))
    ri = (rows.to(x.device)[:, :, None] * th + torch.arange(th, device=x.device)).reshape(b, 1, f * th, 1)
    return x.gather(2, ri.expand(b, c, f * th, f * tw))


# ----------------------------------------------------------------------------- RandAugment (DELT)
# DELT's evaluation/validation/main.py:119-125 builds its student transform with exactly these hparams
DELT_RAND_AUGMENT_HPARAMS = {"translate_const": 117, "img_mean": (124, 116, 104)}


@functools.lru_cache(maxsize=8)
def rand_augment_transform(config: str):
    """timm's ``rand_augment_transform(config, hparams=DELT's)``, built once per config string. timm is an
    optional extra; without it (or with a string timm does not parse) this stops with one PrismError line."""
    try:
        from timm.data.auto_augment import rand_augment_transform as timm_rand_augment
    except ImportError:
        raise PrismError(f"--rand-augment {config}: needs timm; pip install 'prismdd[timm]'") from None
    try:  # timm fills in magnitude_std etc. with setdefault: hand it a fresh dict every time
        transform = timm_rand_augment(config_str=config, hparams=dict(DELT_RAND_AUGMENT_HPARAMS))
    except (AssertionError, ValueError, KeyError, IndexError):
        raise PrismError(f"--rand-augment {config!r}: not a timm RandAugment string (DELT's: rand-m6-n2-mstd1.0); "
                         f"'' turns it off") from None
    for op in getattr(transform, "ops", []):
        if op.name == "Posterize":
            op.aug_fn = functools.partial(posterize_any_bits, op.aug_fn)
    return transform


def posterize_any_bits(timm_posterize, img, bits_to_keep, **kwargs):
    """timm's Posterize keeps int(level / 10 * 4) bits, 0 for a magnitude below 2.5 (with ``mstd1.0`` about one
    Posterize draw in 4,300). Older Pillow turned 0 bits into a black image (mask ~255); Pillow 13 raises
    ValueError, which stopped a student's training mid-run. Keep the old result, the one DELT's environment made."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return timm_posterize(img, bits_to_keep, **kwargs)


def sample_rand_augment_seeds(n: int, generator: torch.Generator) -> torch.Tensor:
    """One int64 seed per image for its RandAugment draw."""
    return torch.randint(0, 2 ** 63 - 1, (n,), generator=generator)


def rand_augment_images(images_uint8: torch.Tensor, seeds: torch.Tensor, config: str, workers: int = 0) -> torch.Tensor:
    """timm's RandAugment on each uint8 image (B, C, H, W), as DELT applies it to the PIL image before
    ToTensor; image i's draw is replayable from ``seeds[i]``, so the result does not depend on ``workers``.

    timm draws from Python's ``random`` (each op's probability, its magnitude noise, the resampling filter) and
    numpy's global generator (which ops): both are seeded from ``seeds[i]`` for image i, and their states are
    saved before the batch and restored after it, so no other random stream moves. A 1-channel image is fed as
    the RGB image with three equal channels (what DELT's PIL loader, ``convert('RGB')``, makes of a greyscale
    file), and the student's one channel is the luminance of DELT's RGB result (PIL's ``convert('L')``):
    pixels whose channels stay equal come back unchanged, the fill (124, 116, 104) of rotations, shears and
    translations reads 117.

    ``workers`` > 1: the batch is split over that many worker processes (DELT runs it in its DataLoader workers).
    Threads would not do: timm's draws come from the interpreter-wide ``random`` and numpy generators."""
    if seeds is None or not config:
        raise PrismError("RandAugment: the views carry no seeds or no --rand-augment string was given; "
                         "relabel (or validate) with the same --rand-augment on both sides")
    rand_augment_transform(config)  # timm missing or a bad string: one line here, not a worker's traceback
    arr = images_uint8.detach().cpu().numpy()
    c = arr.shape[1]
    if c not in (1, 3):
        raise PrismError(f"--rand-augment {config}: works on 1- or 3-channel images, these have {c}")
    seeds_list = seeds.tolist()
    if workers > 1 and len(arr) > 1:
        parts = np.array_split(np.arange(len(arr)), min(workers, len(arr)))
        done = rand_augment_pool(workers).map(_rand_augment_array, [arr[p] for p in parts],
                                              [[seeds_list[i] for i in p] for p in parts], [config] * len(parts))
        return torch.from_numpy(np.concatenate(list(done)))
    return torch.from_numpy(_rand_augment_array(arr, seeds_list, config))


def _rand_augment_array(arr: np.ndarray, seeds: list[int], config: str) -> np.ndarray:
    """The per-image loop of ``rand_augment_images`` (module level: worker processes call it)."""
    transform, c = rand_augment_transform(config), arr.shape[1]
    out = np.empty_like(arr)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        for i, s in enumerate(seeds):
            random.seed(s)
            np.random.seed([s & 0xFFFFFFFF, s >> 32])
            img = Image.fromarray(np.ascontiguousarray(arr[i].transpose(1, 2, 0))) if c == 3 else \
                Image.fromarray(np.ascontiguousarray(arr[i, 0])).convert("RGB")
            img = transform(img)
            out[i] = np.asarray(img).transpose(2, 0, 1) if c == 3 else np.asarray(img.convert("L"))[None]
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return out


_POOLS: dict[int, concurrent.futures.ProcessPoolExecutor] = {}  # workers -> the pool kept for the process's life


def rand_augment_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool kept for the life of the process (shut down at exit). "spawn": a forked copy of a process that
    holds torch's thread pools (or CUDA) can hang."""
    if workers not in _POOLS:
        if not _POOLS:
            atexit.register(_close_pools)
        _POOLS[workers] = concurrent.futures.ProcessPoolExecutor(workers,
                                                                 mp_context=multiprocessing.get_context("spawn"))
    return _POOLS[workers]


def _close_pools() -> None:
    """Shut the pools down and drop them while the interpreter is whole: a pool collected during its teardown runs
    its weakref callback after ``multiprocessing`` is gone, and a clean exit printed ``Exception ignored in ...
    weakref_cb ... AttributeError: 'NoneType' object has no attribute 'util'`` (issue 36)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def sample_views(n: int, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True, attempts: int = 10, per: str = "image") -> Views:
    """torchvision's RandomResizedCrop sampling, vectorised: ``attempts`` candidates per image, the first
    that fits is taken, else the whole image (torchvision falls back to a centre crop).

    ``per='batch'``: ONE crop box and ONE flip bit shared by all ``n`` images, as the SRe2L/PRISM recovery
    scripts do (they apply ``RandomResizedCrop`` and ``RandomHorizontalFlip`` to the whole 4-D tensor).
    """
    if per == "batch":
        one = sample_views(1, generator, scale, ratio, flip, attempts)
        return Views(one.boxes.expand(n, 4).clone(), one.flips.expand(n).clone())
    if per != "image":
        raise PrismError(f"crop per {per!r}: expected batch or image")
    lo, hi = float(scale[0]), float(scale[1])
    area = torch.empty(n, attempts).uniform_(lo, hi, generator=generator)
    logr = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    w, h = torch.sqrt(area * r), torch.sqrt(area / r)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    sel = first.clamp(min=0).unsqueeze(1)
    w = torch.where(first >= 0, w.gather(1, sel).squeeze(1), torch.ones(n))
    h = torch.where(first >= 0, h.gather(1, sel).squeeze(1), torch.ones(n))
    u = torch.rand(n, 2, generator=generator)
    x0, y0 = u[:, 0] * (1 - w), u[:, 1] * (1 - h)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return Views(torch.stack([x0, y0, w, h], 1), flips)


def apply_views(x: torch.Tensor, views: Views, size: int | None = None) -> torch.Tensor:
    """PatchShuffle where ``views`` carries one (before the crop, as RDED's transform order), then crop
    ``views.boxes`` out of ``x`` (B, C, H, W), resize to ``size`` (bilinear), flip where set."""
    b = x.shape[0]
    size = size or x.shape[-1]
    if views.cols is not None:
        x = shuffle_patches(x, views.cols, views.rows)
    boxes = views.boxes.to(x.device, x.dtype)
    x0, y0, w, h = boxes.unbind(1)
    sx = torch.where(views.flips.to(x.device), -w, w)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = 2 * x0 + w - 1  # box centre in [-1, 1] coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class CutMix:
    perm: torch.Tensor  # (N,) long: partner of each image
    box: torch.Tensor  # (4,) long: y0, y1, x0, x1 in pixels
    lam: float  # fraction of the image that stays its own (after clipping the box)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.box.tolist()
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[self.perm.to(x.device)][:, :, y0:y1, x0:x1]
        return out


def sample_cutmix(n: int, size: int, generator: torch.Generator) -> CutMix:
    """CutMix with lambda ~ Beta(1, 1) = U(0, 1), the usual setting, drawn from ``generator``."""
    lam = float(torch.rand(1, generator=generator))
    cut = math.sqrt(1 - lam)
    ch = cw = int(size * cut)
    cy, cx = torch.randint(0, size, (2,), generator=generator).tolist()
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, size)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, size)
    perm = torch.randperm(n, generator=generator)
    lam = 1 - (y1 - y0) * (x1 - x0) / (size * size)
    return CutMix(perm, torch.tensor([y0, y1, x0, x1]), lam)


JITTER_MODES = ("reference", "symmetric")


def jitter(x: torch.Tensor, limit: int, generator: torch.Generator, mode: str = "reference") -> torch.Tensor:
    """Roll the whole batch (one offset pair for all images) along H and W.

    ``reference``: offsets from randint(0, limit) inclusive on each axis, as the SRe2L/PRISM scripts
    (``random.randint(0, lim)`` then ``torch.roll(..., dims=(2, 3))``); ``symmetric``: from -limit..limit.
    """
    if limit <= 0:
        return x
    if mode == "reference":
        dx, dy = torch.randint(0, limit + 1, (2,), generator=generator).tolist()
    elif mode == "symmetric":
        dx, dy = torch.randint(-limit, limit + 1, (2,), generator=generator).tolist()
    else:
        raise PrismError(f"jitter mode {mode!r}: expected one of {', '.join(JITTER_MODES)}")
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def scale_jitter(resolution: int, at_224: int = 32) -> int:
    """Jitter of 32 px at 224 px, scaled to the resolution (2 px at 28, 1 px at 8)."""
    return max(1, round(at_224 * resolution / 224))


# ----------------------------------------------------------------------------- epoch plans (relabel + validate)
BATCH_RULES = ("seed", "rded", "frepo")


def default_view_batch(n_images: int, num_classes: int, rule: str = "seed") -> int:
    """Student/relabel batch size when none is given. ``seed``: 50 at IPC <= 10, else 100 (seed Table 1).
    ``rded``: RDED's argument.py (DELT's evaluation/argument.py adds IPC 20-40): 10 at IPC 1, 50 up to
    IPC 20, else 100; doubled for 100 or 1000 classes, 100 flat for 200 (Tiny-ImageNet). Both are capped
    at the number of images, as the reference caps its batch at ipc * nclass."""
    ipc = n_images / max(1, num_classes)
    if rule == "seed":
        return min(n_images, 50 if ipc <= 10 else 100)
    if rule == "frepo":  # FRePo's eval.py: min(N, 500)
        return max(1, min(n_images, 500))
    if rule != "rded":
        raise PrismError(f"batch rule {rule!r}: expected one of {', '.join(BATCH_RULES)}")
    bs = 10 if ipc <= 1 else 50 if ipc <= 20 else 100
    bs = 100 if num_classes == 200 else bs * 2 if num_classes in (100, 1000) else bs
    return max(1, min(n_images, bs))


@dataclass
class ViewConfig:
    """What defines the views; shared by relabel and validate so both see the same inputs."""

    batch_size: int
    min_scale: float = 0.25  # seed Table 3: 0.25 was best on ImageNet-1K IPC 10
    mix: str = "cutmix"  # cutmix | mixup | none
    flip: bool = True
    patch_shuffle: int = 0  # RDED's PatchShuffle grid factor (0 or 1: none)
    rand_augment: str = ""  # DELT's timm RandAugment config string ("": none)


@dataclass
class EpochPlan:
    order: torch.Tensor  # (N,) image index at each position
    views: Views  # per position
    mixes: list  # per batch: CutMix, a Mixup tuple (perm, lam), or None

    def batches(self, batch_size: int):
        for b, s in enumerate(range(0, len(self.order), batch_size)):
            sl = slice(s, s + batch_size)
            yield b, sl, self.order[sl], self.views[sl], self.mixes[b]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        d = {"order": self.order, **self.views.to_dict()}
        if self.mixes and self.mixes[0] is not None:
            nb, bs = len(self.mixes), max(len(m.perm if isinstance(m, CutMix) else m[0]) for m in self.mixes)
            perm = torch.full((nb, bs), -1, dtype=torch.long)
            lam = torch.zeros(nb, dtype=torch.float64)  # float32 would round lambda: replay must be exact
            box = torch.zeros(nb, 4, dtype=torch.long)
            for i, m in enumerate(self.mixes):
                p = m.perm if isinstance(m, CutMix) else m[0]
                perm[i, : len(p)] = p
                lam[i] = m.lam if isinstance(m, CutMix) else m[1]
                if isinstance(m, CutMix):
                    box[i] = m.box
            d.update(mix_perm=perm, mix_lam=lam, mix_box=box, mix_kind=torch.tensor([isinstance(self.mixes[0], CutMix)]))
        return d

    @classmethod
    def from_tensors(cls, d: dict, batch_size: int) -> "EpochPlan":
        order = d["order"].long()
        views = Views.from_dict(d)
        nb = (len(order) + batch_size - 1) // batch_size
        mixes: list = [None] * nb
        if "mix_perm" in d:
            cut = bool(d["mix_kind"][0])
            for i in range(nb):
                p = d["mix_perm"][i]
                p = p[p >= 0].long()
                lam = float(d["mix_lam"][i])
                mixes[i] = CutMix(p, d["mix_box"][i].long(), lam) if cut else (p, lam)
        return cls(order, views, mixes)


def epoch_plan(n: int, epoch: int, seed: int, vc: ViewConfig, resolution: int) -> EpochPlan:
    gen = make_generator(seed, "views", epoch)
    order = torch.randperm(n, generator=gen)
    views = sample_views(n, gen, (vc.min_scale, 1.0), flip=vc.flip)
    mixes = []
    for s in range(0, n, vc.batch_size):
        m = min(vc.batch_size, n - s)
        if vc.mix == "cutmix":
            mixes.append(sample_cutmix(m, resolution, gen))
        elif vc.mix == "mixup":
            mixes.append((torch.randperm(m, generator=gen), float(torch.rand(1, generator=gen))))
        elif vc.mix == "none":
            mixes.append(None)
        else:
            raise PrismError(f"mix {vc.mix!r}: expected cutmix, mixup or none")
    if vc.patch_shuffle > 1:  # drawn last: plans without PatchShuffle keep their random stream
        views.cols, views.rows = sample_patch_shuffle(n, vc.patch_shuffle, gen)
    if vc.rand_augment:  # drawn after everything else: plans without RandAugment keep their random stream
        views.ra_seeds = sample_rand_augment_seeds(n, gen)
    return EpochPlan(order, views, mixes)


def make_inputs(images_uint8: torch.Tensor, info: DatasetInfo, views: Views, mix, device,
                rand_augment: str = "", workers: int = 0) -> torch.Tensor:
    """The exact (normalised, augmented, mixed) batch a student and its teachers see. ``rand_augment``: the
    timm config string of the views' RandAugment seeds (DELT), applied to the uint8 images first, split over
    ``workers`` processes when > 1 (the same result)."""
    if views.ra_seeds is not None or rand_augment:
        images_uint8 = rand_augment_images(images_uint8, views.ra_seeds, rand_augment, workers)
    return apply_mix(apply_views(normalize(images_uint8.to(device), info), views), mix)


def apply_mix(x: torch.Tensor, mix) -> torch.Tensor:
    """The CutMix/Mixup of a batch of views (``None``: the batch itself)."""
    if isinstance(mix, CutMix):
        return mix.apply(x)
    if mix is not None:
        perm, lam = mix
        return lam * x + (1 - lam) * x[perm.to(x.device)]
    return x


def mix_partners(y: torch.Tensor, mix) -> tuple[torch.Tensor, float]:
    """The label (a class or a label vector) of each image's mixing partner, and the share of the image that stays
    its own."""
    if mix is None:
        return y, 1.0
    perm, lam = (mix.perm, mix.lam) if hasattr(mix, "perm") else mix
    return y[perm.to(y.device)], float(lam)
