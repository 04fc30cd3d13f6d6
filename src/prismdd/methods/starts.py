"""Where recovered images start: real training images (the first k of a class, a seeded random choice, the ones the
primary teacher finds easiest or medium, DELT's alternation around the median), f x f mosaics of shrunk real images,
seeded noise, or another recover run's images (``--init-from``).
Each function takes the RecoverConfig as ``cfg``. Shared by the engine and the plug-ins (FRePo starts
from random real images too); split out of ``stages/recover.py`` so the stage reads as the engine and its loop.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import DistilledSet, load_distilled
from ..core.data import DatasetInfo, centre_crop, class_indices, crop_ratio, normalize
from ..core.errors import PrismError
from ..core.runtime import make_generator
from ..core.training import example_scores


def choose_starts(cfg, train, info: DatasetInfo, primary: nn.Module, device) -> list[torch.Tensor]:
    """Per class, the ``ipc * init_tiles**2`` real training indices the images start from, in use order.

    Drawn once, before any batch, from (seed, 'init-select'), so every rank and every resume sees the same
    starts. low-loss keeps the candidates the primary teacher finds easiest (RDED's "realistic" crops);
    mid-loss the ones around the median (neither trivial nor mislabelled-looking).
    """
    need = cfg.ipc * cfg.init_tiles ** 2
    gen = make_generator(cfg.seed, "init-select")
    starts = []
    for c, members in enumerate(class_indices(train.targets, info.num_classes)):
        if need > len(members):
            raise PrismError(f"--ipc {cfg.ipc} x --init-tiles {cfg.init_tiles}^2: class {info.class_names[c]!r} has "
                             f"only {len(members)} training images; lower them or use --init noise")
        if cfg.init_select == "first":
            starts.append(members[:need])
            continue
        if cfg.init_select == "delt-medium":
            starts.append(members[delt_medium(_true_class_prob(primary, train, members, c, info, device), need,
                                              info.class_names[c])])
            continue
        perm = members[torch.randperm(len(members), generator=gen)]
        if cfg.init_select == "random":
            starts.append(perm[:need])
            continue
        cand = perm[:max(need, cfg.init_candidates)]
        # the per-example scores the privacy audit also uses: one definition of "the teacher's loss on an image"
        loss = example_scores(primary, train.get_images(cand), torch.full((len(cand),), c), info, device)["loss"]
        order = torch.from_numpy(np.argsort(loss, kind="stable"))
        first = 0 if cfg.init_select == "low-loss" else max(0, (len(order) - need) // 2)
        starts.append(cand[order[first:first + need]])
    return starts


def _true_class_prob(primary: nn.Module, train, members, c: int, info: DatasetInfo, device) -> np.ndarray:
    """The primary's softmax probability of class ``c`` on every given training image (DELT's ranking score)."""
    return example_scores(primary, train.get_images(members), torch.full((len(members),), c), info, device)["confidence"]


def delt_medium(prob: np.ndarray, need: int, class_name: str = "") -> torch.Tensor:
    """DELT's ``store_medium`` (data_selection.py): rank the class's images by true-class probability (ascending),
    start at position ceil(n / 2) and alternate: mid, mid + 1, mid - 1, mid + 2, mid - 2, ...; image k of the
    class is the k-th pick. Returns positions into ``prob``."""
    order = np.argsort(prob, kind="stable")
    mid = math.ceil(len(order) / 2)
    picks, sign = [], -1
    for i in range(need):
        j = mid + int(sign * (i + 1) / 2)
        sign = -sign
        if not 0 <= j < len(order):
            raise PrismError(f"--init-select delt-medium: class {class_name!r} has {len(order)} training images, too few "
                             f"for {need} medium picks; lower --ipc or use --init-select first")
        picks.append(int(order[j]))
    return torch.tensor(picks, dtype=torch.long)


def tile(images: torch.Tensor, f: int) -> torch.Tensor:
    """(n * f*f, C, H, W) -> (n, C, H, W): each group of f*f images shrunk (area) into an f x f mosaic."""
    if f == 1:
        return images
    n, c, h, w = images.shape
    ys = [round(i * h / f) for i in range(f + 1)]
    xs = [round(i * w / f) for i in range(f + 1)]
    out = images.new_empty(n // (f * f), c, h, w)
    groups = images.view(n // (f * f), f * f, c, h, w)
    for i in range(f):
        for j in range(f):
            out[:, :, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = F.interpolate(
                groups[:, i * f + j], size=(ys[i + 1] - ys[i], xs[j + 1] - xs[j]), mode="area")
    return out


def start_indices(cfg, units, starts) -> list[list[int]]:
    t = cfg.init_tiles ** 2
    return [starts[c][k * t:(k + 1) * t].tolist() for c, k in units]


def initial_images(cfg, b: int, units, train, info: DatasetInfo, start: list[list[int]] | None
                   ) -> torch.Tensor:
    """The batch's starting images: its real starts (``start_indices``), tiled, or seeded noise. Real starts get
    the test split's preprocessing (``--eval-crop``): at 224 px that is the PRISM code's Resize 256 + CenterCrop
    224 of its training images (``recover/data_synthesis.py:379-383``); below 224 px, none."""
    if start is not None:
        images = train.get_images(torch.tensor(start).flatten())
        crop = crop_ratio(cfg.eval_crop, info.resolution)
        if crop < 1.0:
            images = centre_crop(images, crop)
        return tile(normalize(images, info), cfg.init_tiles)
    gen = make_generator(cfg.seed, "noise-init", b)
    return torch.randn(len(units), info.channels, info.resolution, info.resolution, generator=gen)


def init_source(cfg, info: DatasetInfo) -> DistilledSet:
    """The distilled set ``--init-from`` names, checked against this run's dataset, size and channels."""
    source = load_distilled(cfg.init_from)
    si = source.info
    if (si.name, si.resolution, si.channels) != (info.name, info.resolution, info.channels):
        raise PrismError(f"--init-from {cfg.init_from}: its images are {si.name} at {si.resolution} px, "
                         f"{si.channels} channel(s); this run is {info.name} at {info.resolution} px, {info.channels}: "
                         f"give a recover folder of the same dataset and size")
    missing = sorted(set(range(info.num_classes)) - set(source.targets.tolist()))
    if missing:
        raise PrismError(f"--init-from {cfg.init_from}: no image of class {info.class_names[missing[0]]!r} "
                         f"({len(missing)} classes missing); give a complete recover folder")
    return source


def images_from(cfg, units, source: DistilledSet, info: DatasetInfo) -> tuple[torch.Tensor, list[int]]:
    """EDC's start (recover.py's ``random_img_sample`` + RandomHorizontalFlip): per unit (c, k) one image of class c
    from ``source`` and a flip, drawn from (seed, "init-from", c, k), so the start does not depend on the batch,
    the resume point or the rank. Returns the normalised images and the source positions taken."""
    members = class_indices(source.targets, info.num_classes)
    picks, images = [], []
    for c, k in units:
        gen = make_generator(cfg.seed, "init-from", c, k)
        i = int(members[c][int(torch.randint(len(members[c]), (1,), generator=gen))])
        img = source.images[i]
        if bool(torch.rand(1, generator=gen) < 0.5):
            img = img.flip(-1)
        picks.append(i)
        images.append(img)
    return normalize(torch.stack(images), info), picks
