"""What every part of the data package shares: ``DatasetInfo``, the in-memory split ``TensorImages`` (uint8
(N, C, H, W) until a batch reaches the device), normalisation to the float tensors models see."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DatasetInfo:
    name: str
    class_names: list[str]
    channels: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""  # where the files were found (recorded in manifests)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        return d


class TensorImages(Dataset):
    """An in-memory split: ``images`` uint8 (N, C, H, W), ``targets`` int64 (N,)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4, images.shape
        self.images = images
        self.targets = targets.long()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]

    def get_images(self, idx) -> torch.Tensor:
        return self.images[idx]


def normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float, normalised with the dataset's mean/std."""
    mean, std = _stats(info, x.device)
    return (x.float() / 255.0 - mean) / std


def denormalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean, std = _stats(info, x.device)
    return x * std + mean


def pixel_bounds(info: DatasetInfo, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid pixel range [0, 1] expressed in normalised space, shape (1, C, 1, 1) each."""
    mean, std = _stats(info, device)
    return (0 - mean) / std, (1 - mean) / std


def _stats(info, device):
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    return mean, std


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255.0
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())
