"""Dataset registry: every dataset yields train/test splits of uint8 images plus a ``DatasetInfo``.

Images stay uint8 (N, C, H, W) until a batch reaches the device; ``normalize`` turns them into the
float tensors models see. Small datasets live in memory as one tensor (``TensorImages``), so batches are
sliced without a DataLoader; ImageNet-style folders load lazily (``FolderImages``).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import Registry
from .errors import PrismError
from .runtime import make_generator

DEBIAN_ROOT = Path("/usr/share/datasets")
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


class FolderImages(Dataset):
    """Lazily decoded image files (ImageFolder layout), resized and centre-cropped to ``resolution``."""

    def __init__(self, samples: list[tuple[str, int]], resolution: int, channels: int = 3):
        self.samples = samples
        self.targets = torch.tensor([s[1] for s in samples], dtype=torch.long)
        self.resolution = resolution
        self.channels = channels

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return load_image(self.samples[i][0], self.resolution, self.channels), self.targets[i]

    def get_images(self, idx) -> torch.Tensor:
        return torch.stack([self[int(i)][0] for i in torch.as_tensor(idx).reshape(-1)])


def load_image(path, resolution: int, channels: int = 3) -> torch.Tensor:
    """Decode one image file to uint8 (C, R, R); a clear error names an unreadable file."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            im = TF.center_crop(TF.resize(im, resolution), resolution)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for broken files
        raise PrismError(f"{path}: cannot decode image ({type(e).__name__}: {e}); remove or replace the file "
                         f"(`prismdd check-data` lists all bad files)") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


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


# ----------------------------------------------------------------------------- IDX files
def read_idx(path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise PrismError(f"{path}: cannot read IDX file ({e}); re-download or reinstall the dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise PrismError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise PrismError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise PrismError(f"{path}: truncated IDX header; re-download or reinstall the dataset")
    shape = struct.unpack(">" + "I" * ndim, raw[4: 4 + 4 * ndim])
    dtype = np.dtype(dtypes[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise PrismError(f"{path}: truncated IDX file ({len(body)} of {expected} data bytes); re-download it")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz); used by tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    return None


# ----------------------------------------------------------------------------- registry
@dataclass
class DatasetSpec:
    loader: Callable  # (root, download, resolution) -> (train, test, info)
    description: str
    available: Callable[[str | None], str | None]  # -> the source that would be used, or None
    how_to_get: str = ""


DATASETS: Registry[DatasetSpec] = Registry("dataset")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_candidates(name: str, root: str | None) -> list[Path]:
    cands = []
    if root:
        cands += [Path(root), Path(root) / name, Path(root) / name.replace("-", "_")]
    cands.append(DEBIAN_ROOT / name)
    return cands


def _idx_source(name: str, root: str | None) -> Path | None:
    for folder in _idx_candidates(name, root):
        if all(_find_idx(folder, stem) for pair in IDX_FILES.values() for stem in pair):
            return folder
    return None


def _make_idx_dataset(name: str, class_names: list[str], debian_pkg: str, tv_class: str):
    def load(root, download, resolution):
        folder = _idx_source(name, root)
        if folder is not None:
            splits = {}
            for split, (img_stem, lbl_stem) in IDX_FILES.items():
                imgs = read_idx(_find_idx(folder, img_stem))
                lbls = read_idx(_find_idx(folder, lbl_stem))
                if len(imgs) != len(lbls):
                    raise PrismError(f"{folder}: {split} images ({len(imgs)}) and labels ({len(lbls)}) differ")
                splits[split] = TensorImages(torch.from_numpy(imgs.copy()).unsqueeze(1),
                                             torch.from_numpy(lbls.astype(np.int64)))
            source = str(folder)
        elif download:
            import torchvision

            dl_root = root or os.path.join("data", name)
            cls = getattr(torchvision.datasets, tv_class)
            splits = {}
            for split in ("train", "test"):
                ds = cls(dl_root, train=split == "train", download=True)
                splits[split] = TensorImages(ds.data.unsqueeze(1).to(torch.uint8), ds.targets)
            source = f"torchvision download into {dl_root}"
        else:
            tried = ", ".join(str(p) for p in _idx_candidates(name, root))
            apt = f"`apt-get install {debian_pkg}` (Debian), or " if debian_pkg.startswith("dataset-") else ""
            raise PrismError(f"dataset {name!r} not found (looked for IDX files in: {tried}); get it with "
                             f"{apt}pass --data-root DIR, or --download")
        train, test = splits["train"], splits["test"]
        mean, std = channel_stats(train.images[:10000])
        info = DatasetInfo(name, class_names, 1, 28, mean, std, source)
        return train, test, info

    return load


DATASETS.register("fashion-mnist", DatasetSpec(
    _make_idx_dataset("fashion-mnist", FASHION_CLASSES, "dataset-fashion-mnist", "FashionMNIST"),
    "Zalando Fashion-MNIST, 10 classes, 28x28 grey, 60k/10k (the default)",
    lambda root: (str(p) if (p := _idx_source("fashion-mnist", root)) else None),
    "apt-get install dataset-fashion-mnist, or --download"))
DATASETS.register("mnist", DatasetSpec(
    _make_idx_dataset("mnist", [str(i) for i in range(10)], "<package providing MNIST IDX files>", "MNIST"),
    "MNIST digits, 10 classes, 28x28 grey, 60k/10k",
    lambda root: (str(p) if (p := _idx_source("mnist", root)) else None),
    "--data-root DIR with the IDX files, or --download"))


def _load_digits(root, download, resolution):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)  # (1797, 8, 8), values 0..16
    # fixed, stratified split: the same 1437/360 images on every machine
    tr, te = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=d.target)
    mk = lambda idx: TensorImages(torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(d.target[idx]))
    train, test = mk(tr), mk(te)
    mean, std = channel_stats(train.images)
    return train, test, DatasetInfo("digits", [str(i) for i in range(10)], 1, 8, mean, std, "scikit-learn")


DATASETS.register("digits", DatasetSpec(
    _load_digits, "scikit-learn 8x8 digits, 10 classes, 1437/360 (tiny: tests and smoke runs)",
    lambda root: "scikit-learn", "ships with scikit-learn"))


def _make_cifar(name: str, tv_class: str, mean, std):
    def load(root, download, resolution):
        import torchvision

        root = root or os.path.join("data", name)
        cls = getattr(torchvision.datasets, tv_class)
        try:
            splits = {s: cls(root, train=s == "train", download=download) for s in ("train", "test")}
        except RuntimeError:
            raise PrismError(f"dataset {name!r} not found in {root}; pass --data-root DIR holding torchvision's "
                             f"{tv_class} files, or --download (needs internet)") from None
        out = {s: TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
               for s, ds in splits.items()}
        info = DatasetInfo(name, list(splits["train"].classes), 3, 32, mean, std, root)
        return out["train"], out["test"], info

    def available(root):
        folder = Path(root or os.path.join("data", name))
        marker = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        return str(folder) if (folder / marker).exists() else None

    return load, available


for _name, _cls, _mean, _std, _desc in [
    ("cifar10", "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR-10, 10 classes, 32x32 RGB"),
    ("cifar100", "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR-100, 100 classes, 32x32 RGB"),
]:
    _load, _avail = _make_cifar(_name, _cls, _mean, _std)
    DATASETS.register(_name, DatasetSpec(_load, _desc + " (torchvision)", _avail, "--download (needs internet)"))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpeg", ".ppm", ".pgm")


def _scan_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    classes = classes or found
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        if c not in index:
            raise PrismError(f"{split_dir / c}: class folder not present in train/; class folders must match")
        for dirpath, _, files in os.walk(split_dir / c):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), index[c]))
    return samples, classes


def _imagefolder_splits(root: str | None) -> tuple[Path, Path]:
    if not root:
        raise PrismError("dataset 'imagefolder' needs --data-root DIR holding train/ and val/ (or test/) class folders")
    root_p = Path(root)
    train = root_p / "train"
    test = next((root_p / s for s in ("val", "test") if (root_p / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise PrismError(f"--data-root {root}: expected train/ and val/ (or test/) subfolders, one folder per class")
    return train, test


def _load_imagefolder(root, download, resolution):
    train_dir, test_dir = _imagefolder_splits(root)
    resolution = resolution or 224
    train_samples, classes = _scan_folder(train_dir)
    test_samples, _ = _scan_folder(test_dir, classes)
    if not train_samples:
        raise PrismError(f"{train_dir}: no image files found")
    info = DatasetInfo("imagefolder", classes, 3, resolution, IMAGENET_MEAN, IMAGENET_STD, str(root))
    return FolderImages(train_samples, resolution), FolderImages(test_samples, resolution), info


DATASETS.register("imagefolder", DatasetSpec(
    _load_imagefolder, "--data-root DIR with train/ and val/ class folders (ImageNet layout), RGB, --resolution (224)",
    lambda root: (root if root and Path(root, "train").is_dir() else None), "--data-root DIR"))


def list_datasets(root: str | None = None) -> list[dict]:
    return [{"name": n, "description": s.description, "available": s.available(root), "how_to_get": s.how_to_get}
            for n, s in DATASETS.items()]


def load_dataset(name: str, root: str | None = None, download: bool = False, resolution: int | None = None):
    """Return ``(train, test, info)`` for a registered dataset."""
    spec = DATASETS.get(name)
    train, test, info = spec.loader(root, download, resolution)
    if resolution and resolution != info.resolution and isinstance(train, TensorImages):
        train, test = (_resize_split(s, resolution) for s in (train, test))
        info.resolution = resolution
    return train, test, info


def load_splits(cfg) -> tuple:
    """``load_dataset`` for a stage config: honours ``resolution`` and ``subset`` (a file of train indices)."""
    train, test, info = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.resolution)
    if cfg.subset:
        idx = load_indices(cfg.subset, len(train))
        train = subset_split(train, idx)
        info.source += f" (subset {cfg.subset}: {len(idx)} train images)"
    return train, test, info


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
    return FolderImages([split.samples[i] for i in idx.tolist()], split.resolution, split.channels)


def _resize_split(split: TensorImages, resolution: int) -> TensorImages:
    x = torch.nn.functional.interpolate(split.images.float(), size=resolution, mode="bilinear", antialias=True)
    return TensorImages(x.round().clamp(0, 255).to(torch.uint8), split.targets)


def class_indices(targets: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class's samples in dataset order."""
    return [torch.nonzero(targets == c).flatten() for c in range(num_classes)]


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


def check_data(name: str, root: str | None = None, resolution: int | None = None) -> dict:
    """Decode every file of a dataset; returns counts and the list of unreadable files."""
    train, test, info = load_dataset(name, root, False, resolution)
    bad = []
    for split in (train, test):
        if isinstance(split, FolderImages):
            for path, _ in split.samples:
                try:
                    load_image(path, split.resolution, split.channels)
                except PrismError as e:
                    bad.append(str(e))
    return {"dataset": name, "train": len(train), "test": len(test), "classes": info.num_classes, "bad_files": bad}


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
