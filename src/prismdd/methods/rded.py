"""RDED (Sun et al., CVPR 2024): distilled images stitched from the teacher's most "realistic" real crops.

No optimisation. Per class (LINs-lab/RDED ``synthesize/main.py:init_images`` and ``synthesize/utils.py``):

1. take ``rded_mipc`` random real training images of the class;
2. cut ``rded_num_crop`` square RandomResizedCrops (scale ``rded_crop_scale``, side ``resolution // f``) out of each;
3. zero-pad every crop (in normalised space) to the full resolution, centred, and score it with the primary
   teacher's cross-entropy on the class (low CE = "realistic");
4. keep each real image's best crop, rank the images by that CE and keep the ``ipc * f**2`` lowest;
5. stitch them f x f: patch k (row-major) of synthetic image m is the (k * ipc + m)-th ranked crop, resized
   (nearest) to its slot; when ``resolution % f`` leaves a remainder the first rows/columns are one pixel wider.

Every random draw of class c comes from ``make_generator(seed, "rded", c)``, so an image depends on (seed, class)
only: not on the batch it falls in, the resume point or the rank. Scoring forwards the crops of one class in
crop-major chunks of the class's image count (the reference's batches), independent of the recover batch.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import opt
from ..core.data import class_indices, normalize
from ..core.errors import PrismError
from ..core.runtime import make_generator
from .base import Options, PLUGINS, Plugin, options


# ----------------------------------------------------------------------------- the pieces (tested one by one)
def sample_box(gen: torch.Generator, height: int, width: int, scale=(0.08, 1.0), ratio=(1.0, 1.0),
               attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels: torchvision's ``RandomResizedCrop.get_params``, drawing from ``gen`` in the
    same order (area, log-ratio, then top and left), so the same seed gives the same box."""
    area = height * width
    lo, hi = torch.log(torch.tensor(ratio)).tolist()  # in float32, as torchvision
    for _ in range(attempts):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(lo, hi, generator=gen)).item()
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop torchvision takes
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: torch.Tensor, box, side: int) -> torch.Tensor:
    """Crop ``box`` (top, left, h, w) out of a float (C, H, W) image and resize it to side x side (bilinear,
    antialias: torchvision's ``resized_crop`` on tensors)."""
    top, left, h, w = box
    patch = image[None, :, top:top + h, left:left + w]
    return F.interpolate(patch, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]


def pad_centre(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (B, C, s, s) to (B, C, size, size), the extra row/column (odd padding) at the bottom/right."""
    dv, dh = size - x.shape[-2], size - x.shape[-1]
    return F.pad(x, (dh // 2, dh - dh // 2, dv // 2, dv - dv // 2))


@torch.no_grad()
def crop_losses(model: nn.Module, patches: torch.Tensor, label: int, size: int) -> torch.Tensor:
    """CE of the true class for every crop. ``patches``: (images, crops, C, s, s) normalised. Forwarded
    crop-major, one chunk per crop index (the reference's ``batched_forward`` with batch = images).
    Returns (images, crops)."""
    n, m = patches.shape[:2]
    out = torch.empty(n, m)
    for j in range(m):
        logits = model(pad_centre(patches[:, j], size)).float()
        out[:, j] = -F.log_softmax(logits, 1)[:, label].cpu()
    return out


def select_crops(ce: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image positions, crop index of each), ``n`` of them, best first: each image's lowest-CE crop (the first
    on ties), images ranked by it ascending (stable). ``ce``: (images, crops)."""
    if n > ce.shape[0]:
        raise PrismError(f"rded: {n} crops needed but only {ce.shape[0]} real images were scored")
    crop = ce.argmin(1)
    best = ce.gather(1, crop[:, None])[:, 0]
    order = torch.argsort(best, stable=True)[:n]
    return order, crop[order]


def slots(size: int, f: int) -> list[tuple[int, int]]:
    """(offset, length) of the f slots along one side: size // f each, the first size % f one pixel longer."""
    base, extra = divmod(size, f)
    lengths = [base + (1 if i < extra else 0) for i in range(f)]
    offsets = [sum(lengths[:i]) for i in range(f)]
    return list(zip(offsets, lengths))


def stitch(patches: torch.Tensor, size: int, f: int) -> torch.Tensor:
    """(f*f*n, C, s, s) ranked patches -> (n, C, size, size): slot k = (row k // f, column k % f) of image m holds
    patch k * n + m, resized (nearest) to the slot."""
    per = patches.shape[0] // (f * f)
    out = patches.new_zeros(per, patches.shape[1], size, size)
    grid = slots(size, f)
    for k in range(f * f):
        (top, h), (left, w) = grid[k // f], grid[k % f]
        out[:, :, top:top + h, left:left + w] = F.interpolate(patches[k * per:(k + 1) * per], size=(h, w),
                                                              mode="nearest")
    return out


# ----------------------------------------------------------------------------- the plug-in
@options("rded", kind="plugin")
class RDEDOptions(Options):
    """RDED's settings (``--method rded``): which real crops are scored and how they are stitched."""

    rded_mipc: int = opt(300, "rded: random real images per class whose crops are scored (RDED scripts: --mipc 300; "
                              "a class with fewer gives all it has)", minimum=1)
    rded_num_crop: int = opt(5, "rded: RandomResizedCrops scored per real image; its best is kept (--num-crop 5)",
                             minimum=1)
    rded_factor: int = opt(2, "rded: f, each image stitched from f x f crops of side resolution // f (--factor: 2 for "
                              "ImageNet subsets, 1 for CIFAR and Tiny-ImageNet)", minimum=1)
    rded_crop_scale: tuple[float, float] = opt((0.08, 1.0), "rded: RandomResizedCrop area range of the scored crops "
                                                            "(square)")

    @staticmethod
    def check(cfg) -> None:
        if not 0 < cfg.rded_crop_scale[0] <= cfg.rded_crop_scale[1] <= 1:
            raise PrismError(f"--rded-crop-scale {cfg.rded_crop_scale}: expected 0 < low <= high <= 1")


@PLUGINS.register("rded")
class RDED(Plugin):
    name = "rded"
    engine_optimises = False  # stitched real patches

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        # option checks here, not in prepare: recover --force clears the folder between the two
        if cfg.rded_factor > info.resolution:
            raise PrismError(f"--rded-factor {cfg.rded_factor}: larger than the {info.resolution}-pixel images; "
                             f"use at most {info.resolution}")
        if cfg.init == "real":  # the engine's starts would be recorded as this image's provenance
            raise PrismError("--init real: rded takes its real images itself; use --init noise (the rded preset's)")

    def prepare(self, out: Path, rank: int = 0) -> dict:
        cfg = self.cfg
        f = cfg.rded_factor
        # a private copy: recovery's BN hooks go onto the shared teachers after prepare and would run on every
        # scoring forward
        self.scorer = copy.deepcopy(self.teachers[cfg.primary].model).eval()
        self.members = class_indices(self.train.targets, self.info.num_classes)
        self.cache: dict[int, tuple[torch.Tensor, list[list[dict]]]] = {}
        return {"scorer": cfg.primary, "mipc": cfg.rded_mipc, "num_crop": cfg.rded_num_crop, "factor": f,
                "crop_scale": list(cfg.rded_crop_scale), "patch_side": self.info.resolution // f}

    def make_class(self, c: int) -> tuple[torch.Tensor, list[list[dict]]]:
        """The ``ipc`` stitched images of class ``c`` (normalised, CPU) and, per image, its patches' provenance:
        training index, crop box (top, left, height, width in pixels of the split's images) and CE."""
        cfg, info = self.cfg, self.info
        f, size = cfg.rded_factor, info.resolution
        side = size // f
        need = cfg.ipc * f * f
        gen = make_generator(cfg.seed, "rded", c)
        members = self.members[c]
        taken = members[torch.randperm(len(members), generator=gen)[:cfg.rded_mipc]]
        if need > len(taken):
            raise PrismError(f"--ipc {cfg.ipc} x --rded-factor {f}^2: class {info.class_names[c]!r} gives only "
                             f"{len(taken)} real images (--rded-mipc {cfg.rded_mipc}); lower --ipc or --rded-factor")
        images = self.train.get_images(taken).to(self.device).float() / 255.0
        boxes = [[sample_box(gen, images.shape[-2], images.shape[-1], cfg.rded_crop_scale)
                  for _ in range(cfg.rded_num_crop)] for _ in range(len(taken))]  # per image, its crops in turn
        patches = torch.stack([torch.stack([crop_resize(img, box, side) for box in row])
                               for img, row in zip(images, boxes)])
        patches = normalize(patches.flatten(0, 1) * 255.0, info).view_as(patches)
        ce = crop_losses(self.scorer, patches, c, size)
        order, crop = select_crops(ce, need)
        chosen = patches[order.to(self.device), crop.to(self.device)]
        stitched = stitch(chosen, size, f).cpu()
        ranks = [[k * cfg.ipc + m for k in range(f * f)] for m in range(cfg.ipc)]  # image m's slots
        prov = [[{"index": int(taken[order[r]]), "box": list(boxes[order[r]][crop[r]]),
                  "ce": round(float(ce[order[r], crop[r]]), 6)} for r in row] for row in ranks]
        return stitched, prov

    def synthesize(self, b, units, x0):
        classes = sorted({c for c, _ in units})
        self.cache = {c: v for c, v in self.cache.items() if c in classes}  # a class may span two batches
        for c in classes:
            if c not in self.cache:
                self.cache[c] = self.make_class(c)
        images = torch.stack([self.cache[c][0][k] for c, k in units])
        patches = [self.cache[c][1][k] for c, k in units]
        return images, {"start_indices": [[p["index"] for p in ps] for ps in patches], "rded_patches": patches}
