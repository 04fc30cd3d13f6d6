"""Dataset registry: every dataset yields train/test splits of uint8 images plus a ``DatasetInfo``.

The built-in loaders (IDX files: MNIST, Fashion-MNIST; scikit-learn digits; torchvision CIFAR; ImageFolder), the
options ``load_dataset`` applies on top (resolution, channels, eval crop), ``load_splits`` for a stage config and
``check_data``. Small datasets live in memory as one tensor (``TensorImages``), so batches are sliced without a
DataLoader. ImageFolders are decoded once into a memory-mapped uint8 cache (``cache.decode_cache``), so they behave
like in-memory sets; with the cache off they decode lazily (``FolderImages``).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PrismError
from ..registry import Registry
from .base import DatasetInfo, TensorImages, channel_stats
from .decode import EVAL_CROPS, SIXTEEN_BIT_MODES, centre_crop, crop_ratio, load_image
from .imagefolder import Survey, infer_geometry, load_imagefolder, scan_splits
from .sampling import load_indices, spread_sample, subset_split

DEBIAN_ROOT = Path("/usr/share/datasets")


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
    loader: Callable  # (root, download, resolution[, channels, eval_crop, num_workers]) -> (train, test, info)
    description: str
    available: Callable[[str | None], str | None]  # -> the source that would be used, or None
    how_to_get: str = ""
    options: bool = False  # the loader takes channels=, eval_crop=, num_workers= itself (else load_dataset applies them)


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


DATASETS.register("imagefolder", DatasetSpec(
    load_imagefolder, "--data-root DIR with train/ and val/ class folders (ImageNet layout); size (most common, "
                       "at most 224 px) and channels inferred from the images (--resolution/--channels override); "
                       "decoded once into a cache",
    lambda root: (root if root and Path(root, "train").is_dir() else None), "--data-root DIR", options=True))


def list_datasets(root: str | None = None) -> list[dict]:
    return [{"name": n, "description": s.description, "available": s.available(root), "how_to_get": s.how_to_get}
            for n, s in DATASETS.items()]


def load_dataset(name: str, root: str | None = None, download: bool = False, resolution: int | None = None,
                 channels: int | None = None, eval_crop: str = "auto", num_workers: int = 0):
    """Return ``(train, test, info)`` for a registered dataset.

    ``resolution``/``channels`` override the dataset's own (in-memory sets are resized with antialiasing;
    grey -> RGB repeats the channel, RGB -> grey takes the luma); ``eval_crop`` picks the test split's
    preprocessing (``crop_ratio``); ``num_workers`` decodes file-backed sets in parallel.
    """
    spec = DATASETS.get(name)
    if eval_crop not in EVAL_CROPS:
        raise PrismError(f"--eval-crop {eval_crop!r}: expected one of {', '.join(EVAL_CROPS)}")
    if spec.options:
        return spec.loader(root, download, resolution, channels=channels, eval_crop=eval_crop,
                           num_workers=num_workers)
    train, test, info = spec.loader(root, download, resolution)
    if not isinstance(train, TensorImages):
        return train, test, info
    if channels and channels != info.channels:
        train, test = (_convert_channels(s, channels) for s in (train, test))
        info.channels = channels
        info.mean, info.std = channel_stats(spread_sample(train, 10000))
    if resolution and resolution != info.resolution:
        train, test = (_resize_split(s, resolution) for s in (train, test))
        info.resolution = resolution
    if crop_ratio(eval_crop, info.resolution) < 1.0:
        test = _centre_crop_split(test, crop_ratio(eval_crop, info.resolution))
    return train, test, info


def load_splits(cfg) -> tuple:
    """``load_dataset`` for a stage config: honours ``resolution``, ``channels``, ``eval_crop``, ``num_workers``
    and ``subset`` (a file of train indices)."""
    train, test, info = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.resolution,
                                     getattr(cfg, "channels", None), getattr(cfg, "eval_crop", "auto"),
                                     getattr(cfg, "num_workers", 0))
    if cfg.subset:
        idx = load_indices(cfg.subset, len(train))
        train = subset_split(train, idx)
        info.source += f" (subset {cfg.subset}: {len(idx)} train images)"
    return train, test, info


def _convert_channels(split: TensorImages, channels: int) -> TensorImages:
    x = split.images
    if channels == 3:
        return TensorImages(x.expand(-1, 3, -1, -1).contiguous(), split.targets)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return TensorImages((x.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8), split.targets)


def _centre_crop_split(split: TensorImages, crop: float) -> TensorImages:
    return TensorImages(centre_crop(split.images, crop), split.targets)


def _resize_split(split: TensorImages, resolution: int) -> TensorImages:
    x = torch.nn.functional.interpolate(split.images.float(), size=resolution, mode="bilinear", antialias=True)
    return TensorImages(x.round().clamp(0, 255).to(torch.uint8), split.targets)


def check_data(name: str, root: str | None = None, resolution: int | None = None,
               channels: int | None = None) -> dict:
    """Decode every file of a dataset; returns counts, the size and channels used, the list of unreadable
    files and notes (mixed sizes, EXIF-turned and transparent images, mixed colour kinds, hidden files skipped,
    16-bit or float images and how they were scaled, images that decode flat), counted over every file."""
    if DATASETS.get(name).loader is not load_imagefolder:
        train, test, info = load_dataset(name, root, False, resolution, channels)
        return {"dataset": name, "train": len(train), "test": len(test), "classes": info.num_classes,
                "resolution": info.resolution, "channels": info.channels, "bad_files": [], "notes": []}
    from PIL import Image

    train, test, classes, notes = scan_splits(root)
    res, ch, sizes = infer_geometry([p for p, _ in train])  # the loader's rule, so both report the same geometry
    res, ch = resolution or res, channels or ch
    survey = Survey()  # every file this time, not a sample
    bad, flat = [], []
    for path, _ in train + test:
        try:
            x = load_image(path, res, ch)
        except PrismError as e:
            bad.append(str(e))
            continue
        with Image.open(path) as im:
            survey.add(im)
        if int(x.max()) == int(x.min()):
            flat.append(path)
    modes = survey.modes
    size_note = None if resolution else sizes.size_note()
    notes = [size_note] * bool(size_note) + notes + survey.content_notes(ch)
    deep = sum(modes[m] for m in SIXTEEN_BIT_MODES)
    if deep:
        notes.append(f"{deep} 16-bit images ({', '.join(m for m in SIXTEEN_BIT_MODES if modes[m])}): scaled to 8 bit "
                     f"(divided by 257)")
    if modes["F"]:
        notes.append(f"{modes['F']} float images (F): values in [0, 1] scaled by 255, other ranges clipped to 0-255")
    if flat:
        notes.append(f"{len(flat)} images decode to one flat value (first: {flat[0]}); check their content and "
                     f"bit depth")
    return {"dataset": name, "train": len(train), "test": len(test), "classes": len(classes), "resolution": res,
            "channels": ch, "modes": dict(modes), "exif_turned": survey.turned, "transparent": survey.alpha,
            "bad_files": bad, "notes": notes}
