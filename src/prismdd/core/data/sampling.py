"""Sampling and batching: train subsets (``--subset``), per-class indices, the seeded random-real baseline, batches
without a DataLoader for in-memory splits, and the class-coverage refusal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import PrismError
from ..runtime import make_generator
from .base import DatasetInfo, TensorImages
from .decode import FolderImages


def spread_sample(split, n: int) -> torch.Tensor:
    idx = torch.linspace(0, len(split) - 1, min(n, len(split))).long()
    return split.get_images(idx)


def load_indices(path, n: int) -> torch.Tensor:
    p = Path(path)
    try:
        arr = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as e:
        raise PrismError(f"--subset {path}: cannot read indices ({e}); expected .npy or one integer per line") from None
    idx = torch.as_tensor(np.asarray(arr, dtype=np.int64))
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
        raise PrismError(f"--subset {path}: indices must be a flat list within [0, {n})")
    return idx


def subset_split(split, idx: torch.Tensor):
    if isinstance(split, TensorImages):
        return TensorImages(split.images[idx], split.targets[idx])
    return FolderImages([split.samples[i] for i in idx.tolist()], split.resolution, split.channels, split.crop,
                        split.workers)


def class_indices(targets: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class's samples in dataset order (one stable sort: linear-ish in N, not classes x N)."""
    targets = torch.as_tensor(targets).long()
    order = torch.sort(targets, stable=True).indices
    counts = torch.bincount(targets, minlength=num_classes)[:num_classes].tolist()
    return list(torch.split(order, counts)) if sum(counts) == len(order) else [
        torch.nonzero(targets == c).flatten() for c in range(num_classes)]


def random_real_indices(train, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` seeded random training indices per class, class by class: the random-real baseline's images.

    One definition shared by the student baseline (validate), the diversity reference (metrics) and the
    main job, so for one seed all three see exactly the same images.
    """
    gen = make_generator(seed, "random-real")
    idx = []
    for c, members in enumerate(class_indices(train.targets, num_classes)):
        if len(members) < ipc:
            raise PrismError(f"--ipc {ipc}: class {c} has only {len(members)} training images")
        idx.append(members[torch.randperm(len(members), generator=gen)[:ipc]])
    return torch.cat(idx)


def iterate_batches(split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                    num_workers: int = 0, drop_last: bool = False, indices: torch.Tensor | None = None):
    """Yield ``(uint8 images, targets)`` batches; in-memory splits are sliced directly (no DataLoader)."""
    idx = torch.arange(len(split)) if indices is None else torch.as_tensor(indices)
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=generator)]
    if isinstance(split, TensorImages):
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            b = idx[s: s + batch_size]
            if len(b):
                yield split.images[b], split.targets[b]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split, idx.tolist()), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, drop_last=drop_last)
    yield from loader


def check_class_coverage(info: DatasetInfo, train=None, test=None) -> None:
    """Refuse splits that would be trained or tested on silently: no test images at all (an empty val/), a
    class without training images (an empty class folder) or without test images (missing from val/)."""
    for split, name, where in ((train, "training", "an empty class folder"), (test, "test", "missing from val/")):
        if split is None:
            continue
        if len(split) == 0:
            raise PrismError(f"--dataset {info.name}: the {name} split has no images ({info.source}; an empty "
                             f"{'val' if name == 'test' else 'train'}/ folder?): add images")
        counts = torch.bincount(torch.as_tensor(split.targets).long(), minlength=info.num_classes)
        empty = [info.class_names[c] for c in range(info.num_classes) if counts[c] == 0]
        if empty:
            shown = ", ".join(map(repr, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise PrismError(f"--dataset {info.name}: class {shown} has no {name} images ({where}; {info.source}): "
                             f"add images or remove the class from both splits")
