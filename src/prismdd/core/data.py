"""Dataset registry: every dataset yields train/test splits of uint8 images plus a ``DatasetInfo``.

Images stay uint8 (N, C, H, W) until a batch reaches the device; ``normalize`` turns them into the
float tensors models see. Small datasets live in memory as one tensor (``TensorImages``), so batches are
sliced without a DataLoader. ImageFolders (``imagefolder``) are decoded once into a memory-mapped uint8 cache
(``decode_cache``; ``CachedFolderImages`` is a ``TensorImages`` over it), so they behave like in-memory sets;
with the cache off they decode lazily (``FolderImages``).
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import mmap
import os
import shutil
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import Registry
from .errors import PrismError
from .io import atomic_path
from .runtime import make_generator, progress

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
    """Lazily decoded image files (ImageFolder layout), resized and centre-cropped to ``resolution``
    (``crop`` < 1: the shorter side goes to ``resolution / crop`` first, ImageNet's eval preprocessing).
    Used to fill the decoded cache, and directly when the cache is off (``PRISMDD_CACHE=off``)."""

    def __init__(self, samples: list[tuple[str, int]], resolution: int, channels: int = 3, crop: float = 1.0,
                 workers: int = 0):
        self.samples = samples
        self.targets = torch.tensor([s[1] for s in samples], dtype=torch.long)
        self.resolution = resolution
        self.channels = channels
        self.crop = crop
        self.workers = workers  # get_images decodes a batch with this many threads (PIL releases the GIL)

    def __len__(self):
        return len(self.samples)

    def load(self, i) -> torch.Tensor:
        return load_image(self.samples[i][0], self.resolution, self.channels, self.crop)

    def __getitem__(self, i):
        return self.load(i), self.targets[i]

    def get_images(self, idx) -> torch.Tensor:
        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1)]
        if self.workers > 1 and len(idx) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                return torch.stack(list(pool.map(self.load, idx)))
        return torch.stack([self.load(i) for i in idx])


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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
IMAGENET_CROP = 224 / 256  # "Resize 256 + CenterCrop 224": the crop keeps 87.5 % of the shorter side
EVAL_CROPS = ("auto", "none", "imagenet")
INFER_SAMPLE = 2000  # image headers read to infer an ImageFolder's size and channels
MAX_INFERRED = 224  # photos larger than this are decoded at 224 px unless --resolution says otherwise
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was held (1 = upright; phones store 6 or 8 sideways)
# Transparent pixels are composited on white before use. The RGB under a fully transparent pixel is whatever the
# writer left there (often black, sometimes garbage); dropping alpha, as a plain convert("RGB") does, shows it.
# White is how viewers and web pages show cut-outs (logos, product shots), so the network sees what a person sees.
ALPHA_BACKGROUND = 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
PALETTE_MODES = ("P", "PA")

_SAID: set[tuple[str, str]] = set()  # (dataset root or folder, text): notices already printed by this process


def say_once(key, text: str) -> None:
    """Print a notice about ``key`` (a dataset root, a folder) once per process: every stage of ``prismdd run`` loads
    the same data, and one notice said nine times reads as nine problems."""
    if (str(key), text) not in _SAID:
        _SAID.add((str(key), text))
        print(text)


def crop_ratio(eval_crop: str, resolution: int) -> float:
    """The test split's centre-crop ratio: 1.0 (shorter side resized to ``resolution``, centre crop) or
    224/256 (shorter side to ``resolution * 256 / 224``, then the centre crop: ImageNet's eval preprocessing).
    ``auto`` = imagenet at 224 px and above (ImageNet-sized images), none below (small images keep their edges)."""
    if eval_crop == "imagenet" or (eval_crop == "auto" and resolution >= 224):
        return IMAGENET_CROP
    return 1.0


def to_8bit(im):
    """A PIL image in any mode -> an 8-bit one ("L" or a colour mode), scaling deeper pixels correctly.

    16-bit images (modes I;16*, and I, which is how PIL opens some 16-bit files) span 0..65535 and are divided
    by 257 (65535 -> 255); float images (mode F) in [0, 1] are multiplied by 255, other float ranges are
    clipped to [0, 255]. A plain ``convert("L")`` clips instead, which turns a 16-bit image all white.
    """
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im).astype(np.float64))
        if arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    return im


def exif_orientation(im) -> int:
    """The EXIF orientation of an opened image (1 when it has none, or an unreadable EXIF block)."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still usable as stored
        return 1


def has_alpha(im) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info


def upright(im):
    """The image as a viewer shows it: turned by its EXIF orientation (a phone photo is stored sideways with a tag
    saying so; fed as stored, the network sees it on its side)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if 2 <= exif_orientation(im) <= 8 else im  # 1 or unknown: as stored


def flatten_alpha(im):
    """An image with transparency composited on ``ALPHA_BACKGROUND`` (RGB); other images unchanged."""
    from PIL import Image

    if not has_alpha(im):
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,)), rgba).convert("RGB")


def load_image(path, resolution: int, channels: int = 3, crop: float = 1.0) -> torch.Tensor:
    """Decode one image file to uint8 (C, R, R): turned upright by its EXIF orientation (``upright``), 8-bit
    conversion (``to_8bit``), transparency composited on white (``flatten_alpha``), the shorter side resized to
    ``resolution / crop``, then the centre R x R crop. The cache, per-batch decoding and check-data all decode
    here, so they agree. A clear error names an unreadable file."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as im:
            im = flatten_alpha(to_8bit(upright(im))).convert("RGB" if channels == 3 else "L")
            side = resolution if crop >= 1.0 else int(round(resolution / crop))
            if min(im.size) != side:
                im = TF.resize(im, side)
            im = TF.center_crop(im, resolution)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for broken files
        raise PrismError(f"{path}: cannot decode image ({type(e).__name__}: {e}); remove or replace the file "
                         f"(`prismdd check-data` lists all bad files)") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _and(items: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]])) if items else ""


def _hidden(name: str) -> bool:
    """Names starting with '.': macOS's '._x.png' AppleDouble companions (metadata, not images), .DS_Store,
    .ipynb_checkpoints, .git. Never images of the set."""
    return name.startswith(".")


def _scan_folder(split_dir: Path, classes: list[str] | None = None,
                 hidden: Counter | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of one split; hidden entries are skipped and counted into ``hidden`` (image files
    under "files", folders under "folders")."""
    hidden = Counter() if hidden is None else hidden
    found = []
    for p in sorted(split_dir.iterdir()):
        if p.is_dir():
            if _hidden(p.name):
                hidden["folders"] += 1
            else:
                found.append(p.name)
    classes = classes or found
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        if c not in index:
            raise PrismError(f"{split_dir / c}: class folder not present in train/; class folders must match")
        _check_link(split_dir / c, split_dir)
        for dirpath, dirs, files in os.walk(split_dir / c, followlinks=True):
            hidden["folders"] += sum(map(_hidden, dirs))
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for d in dirs:  # followed only once checked: a loop would never end, a link out would mix in other images
                _check_link(Path(dirpath) / d, split_dir)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    if _hidden(f):
                        hidden["files"] += 1
                    else:
                        samples.append((os.path.join(dirpath, f), index[c]))
    return samples, classes


def _check_link(folder: Path, split_dir: Path) -> None:
    """Refuse a symlinked folder of an ImageFolder that loops (points at the data root, the split or a folder above
    the link) or points outside the data root: a class folder linked to the root put every val/ image into
    training as that class, without a word."""
    if not folder.is_symlink():
        return
    root = split_dir.parent.resolve()
    target = folder.resolve()
    if target == folder.parent.resolve() or target in folder.parent.resolve().parents or target in (
            root, split_dir.resolve()):
        raise PrismError(f"{folder}: a symlink loop (it points at {target}, a folder that holds it); remove the link "
                         f"or make it a folder of its own images")
    if root not in target.parents:
        raise PrismError(f"{folder}: a symlink to {target}, outside the data root {root}; copy those images into "
                         f"the folder, or pass a --data-root that holds them")


def _scan_splits(root) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str], list[str]]:
    """``(train samples, test samples, classes, notes)`` of an ImageFolder: the one scan the loader and check-data
    share. Refused here, before anything is decoded or trained: fewer than 2 classes (a one-class "classifier"
    scores 100 % whatever it learns) and a train/ without images."""
    train_dir, test_dir = _imagefolder_splits(root)
    hidden: Counter = Counter()
    train, classes = _scan_folder(train_dir, hidden=hidden)
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise PrismError(f"--data-root {root}: train/ has {len(classes)} class folder{'s' * (len(classes) != 1)} "
                         f"({found}); classification needs at least 2 classes: add one sub-folder per class to "
                         f"train/ and val/")
    test, _ = _scan_folder(test_dir, classes, hidden)
    if not train:
        raise PrismError(f"{train_dir}: no image files found")
    notes = []
    parts = [f"{n} hidden {what[:-1] if n == 1 else what}" for what in ("files", "folders") if (n := hidden[what])]
    if parts:
        notes.append(f"skipped {_and(parts)} (names starting with '.', e.g. macOS '._' companions): "
                     f"not images of the set")
    return train, test, classes, notes


def _imagefolder_splits(root: str | None) -> tuple[Path, Path]:
    if not root:
        raise PrismError("dataset 'imagefolder' needs --data-root DIR holding train/ and val/ (or test/) class folders")
    root_p = Path(root)
    train = root_p / "train"
    test = next((root_p / s for s in ("val", "test") if (root_p / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise PrismError(f"--data-root {root}: expected train/ and val/ (or test/) subfolders, one folder per class")
    return train, test


@dataclass
class Survey:
    """What image headers say about a set of files (``survey_images``; check-data counts every file): shorter
    sides, PIL modes, EXIF-turned and transparent images. ``sampled``: a spread subset was read, not every file."""

    read: int = 0
    sampled: bool = False
    sides: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    turned: int = 0
    alpha: int = 0

    def add(self, im) -> None:
        self.read += 1
        self.sides[min(im.size)] += 1
        self.modes[im.mode] += 1
        self.turned += 2 <= exif_orientation(im) <= 8
        self.alpha += has_alpha(im)

    def __add__(self, other: "Survey") -> "Survey":
        return Survey(self.read + other.read, self.sampled or other.sampled, self.sides + other.sides,
                      self.modes + other.modes, self.turned + other.turned, self.alpha + other.alpha)

    @property
    def of(self) -> str:
        return f"{self.read} sampled" if self.sampled else f"{self.read} images"

    def kinds(self) -> Counter:
        """Images per kind: greyscale, palette (colours looked up in a table), colour."""
        out: Counter = Counter()
        for mode, n in self.modes.items():
            out["greyscale" if mode in GREY_MODES else "palette" if mode in PALETTE_MODES else "colour"] += n
        return out

    def size_note(self) -> str | None:
        """The resolution an ImageFolder gets without --resolution, said when it is not every image's own."""
        common, count = max(self.sides.items(), key=lambda kv: (kv[1], kv[0]))
        if len(self.sides) > 1:
            other = self.read - count
            what = (f"images of different sizes (shorter side {min(self.sides)}-{max(self.sides)} px; {other} of the "
                    f"{self.of} {'differs' if other == 1 else 'differ'} from {common} px)")
        elif common > MAX_INFERRED:
            what = f"images of {common} px (shorter side)"
        else:
            return None
        why = "ImageNet's convention for larger photos" if common > MAX_INFERRED else "the most common size"
        return f"{what}: all resized to {min(common, MAX_INFERRED)} px, {why}; pass --resolution N to choose"

    def content_notes(self, channels: int) -> list[str]:
        """What decoding does beyond resizing, in plain words: EXIF turns, transparency, mixed colour kinds."""
        notes = []
        if self.turned:
            notes.append(f"{self.turned} of the {self.of} carry an EXIF orientation (camera held sideways): turned "
                         f"upright before use, as a photo viewer shows them")
        if self.alpha:
            notes.append(f"{self.alpha} of the {self.of} have transparency: composited on white "
                         f"({ALPHA_BACKGROUND}) before use")
        counts = self.kinds()
        kinds = {k: counts[k] for k in ("greyscale", "colour", "palette") if counts[k]}
        if len(kinds) > 1:
            mixed = _and([f"{n} {k}" for k, n in kinds.items()])
            how = ({"greyscale": "greyscale copied into all 3 channels", "palette": "palette colours looked up"}
                   if channels == 3 else {"colour": "colour by its luma", "palette": "palette colours by their luma"})
            into = "RGB" if channels == 3 else "greyscale"
            notes.append(f"mixed image kinds ({mixed} of the {self.of}): all converted to {into} "
                         f"({', '.join(how[k] for k in kinds if k in how)})")
        return notes


def survey_images(paths: list[str], sample: int = INFER_SAMPLE) -> Survey:
    """Read up to ``sample`` image headers, evenly spread over ``paths`` (no pixel is decoded)."""
    from PIL import Image

    pick = paths if len(paths) <= sample else [paths[int(i)] for i in np.linspace(0, len(paths) - 1, sample)]
    survey = Survey(sampled=len(pick) < len(paths))
    for p in pick:
        try:
            with Image.open(p) as im:
                survey.add(im)
        except Exception:  # noqa: BLE001 - unreadable files are reported when decoded (check-data lists them)
            continue
    return survey


def infer_geometry(paths: list[str], sample: int = INFER_SAMPLE) -> tuple[int, int, Survey]:
    """``(resolution, channels, survey)`` of an ImageFolder from its image headers (see ``_load_imagefolder``)."""
    survey = survey_images(paths, sample)
    if not survey.sides:
        raise PrismError(f"{Path(paths[0]).parent.parent}: no readable image among {min(len(paths), sample)} files; "
                         f"run `prismdd check-data --dataset imagefolder --data-root DIR`")
    common = max(survey.sides.items(), key=lambda kv: (kv[1], kv[0]))[0]
    colour = sum(n for m, n in survey.modes.items() if m not in GREY_MODES)
    return min(common, MAX_INFERRED), (3 if colour else 1), survey


class CachedFolderImages(TensorImages):
    """An ImageFolder split decoded once into a uint8 memory-mapped array (``decode_cache``): sliced like an
    in-memory split; ``samples`` still names each image's file."""

    def __init__(self, images, targets, samples, resolution: int, channels: int, cache: Path):
        super().__init__(images, targets)
        self.samples, self.resolution, self.channels, self.cache = samples, resolution, channels, cache


def cache_root() -> Path | None:
    """Where decoded ImageFolders are kept: ``$PRISMDD_CACHE``, else ``$XDG_CACHE_HOME/prismdd`` or
    ``~/.cache/prismdd``; ``PRISMDD_CACHE=off`` (or 0/none) decodes every batch from the files instead."""
    env = os.environ.get("PRISMDD_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false", "no"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prismdd"


class _Decode(Dataset):
    """Cache building: one image per item, errors returned (not raised) so every worker reports its files."""

    def __init__(self, split: FolderImages):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            return self.split.load(i), ""
        except PrismError as e:
            return torch.zeros(self.split.channels, self.split.resolution, self.split.resolution, dtype=torch.uint8), str(e)


def files_digest(samples: list[tuple[str, int]]) -> str:
    """What a decoded cache depends on in the files: each path, label, size and modification time."""
    h = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# bump when the decoded layout or the decoding changes: older caches are then ignored (2: EXIF orientation applied,
# transparency composited on white, per-chunk checksums in meta.json)
CACHE_VERSION = 2
CHECK_CHUNK = 64 << 20  # bytes per checksum of images.u8: chunks are hashed in parallel and a change is located
_VERIFIED: set[tuple] = set()  # (images.u8, inode, mtime): caches whose checksums this process has verified


def _cache_key(digest: str, **settings) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, "files": digest, **settings},
                                     sort_keys=True).encode()).hexdigest()[:24]


def _chunk_digests(path: Path, nbytes: int, chunk: int | None = None) -> list[str]:
    """sha256 of each ``chunk``-byte piece (default ``CHECK_CHUNK``) of a file, read through one shared read-only
    mapping and hashed by up to 4 threads (hashlib releases the GIL). RELIABILITY.md states what it costs
    (``benchmarks/cache_check.py``)."""
    chunk = chunk or CHECK_CHUNK
    with open(path, "rb") as f, mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ) as mm, memoryview(mm) as mv:
        def one(start: int) -> str:
            with mv[start: start + chunk] as piece:  # released before the mapping closes
                return hashlib.sha256(piece).hexdigest()

        starts = range(0, nbytes, chunk)
        if len(starts) == 1:
            return [one(0)]
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1, len(starts))) as pool:
            return list(pool.map(one, starts))


def _cache_problem(folder: Path, shape) -> str | None:
    """Why the decoded cache in ``folder`` may not be used, ``""`` when there is none yet, None when it is sound:
    ``meta.json`` parses and describes ``shape``, ``images.u8`` has exactly that many bytes, and (once per process
    and file version) every chunk's checksum matches, so changed bytes are never trained on."""
    if not folder.exists():
        return ""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:  # ValueError: garbled JSON or bytes that are not UTF-8
        return f"meta.json cannot be read: {type(e).__name__}"
    if not isinstance(meta, dict) or meta.get("shape") != list(shape):
        return f"meta.json does not describe {shape[0]} images of {list(shape[1:])}"
    nbytes = int(np.prod(shape))
    sums, chunk = meta.get("sha256"), meta.get("chunk_bytes")
    if not isinstance(chunk, int) or chunk < 1 or not isinstance(sums, list) or len(sums) != -(-nbytes // chunk):
        return "meta.json holds no checksums"
    data = folder / "images.u8"
    try:
        st = data.stat()
    except OSError:
        return "images.u8 is missing"
    if st.st_size != nbytes:
        return f"images.u8 holds {st.st_size} bytes, {nbytes} expected"
    stamp = (str(data.resolve()), st.st_ino, st.st_mtime_ns)
    if stamp not in _VERIFIED:
        bad = sum(a != b for a, b in zip(sums, _chunk_digests(data, nbytes, chunk)))
        if bad:
            return f"images.u8 changed since it was decoded: {bad} of {len(sums)} checksummed chunks differ"
        _VERIFIED.add(stamp)
    return None


def _discard(folder: Path) -> None:
    """Remove a damaged cache and the half-written copies of killed builders (the caller holds the key's lock, so
    no live process is writing them). Renamed first: a process that mapped the old file keeps reading its inode."""
    for p in [folder, *folder.parent.glob(f"{folder.name}.tmp-*"), *folder.parent.glob(f"{folder.name}.old-*")]:
        if p.exists():
            gone = p.with_name(f"{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)


def decode_cache(split: FolderImages, key: str, num_workers: int = 0, what: str = "images"):
    """``split`` decoded once into ``<cache_root>/imagefolder/<key>/images.u8`` (uint8 N x C x R x R, memory-mapped
    read-only-shared: pages are loaded as touched and shared between processes), written atomically under a lock
    so parallel ranks decode it once. A cache that fails ``_cache_problem`` (truncated, garbled metadata, changed
    bytes) is decoded again with a one-line notice. Returns a ``CachedFolderImages``, or ``split`` itself when
    caching is off or the disk lacks room (a one-line notice says so)."""
    root = cache_root()
    if root is None or len(split) == 0:
        return split
    folder = root / "imagefolder" / key
    shape = (len(split), split.channels, split.resolution, split.resolution)
    nbytes = int(np.prod(shape))
    if _cache_problem(folder, shape) is not None:
        (root / "imagefolder").mkdir(parents=True, exist_ok=True)
        with open(root / "imagefolder" / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process decoding the same folder: wait, then reuse its work
            problem = _cache_problem(folder, shape)  # asked again: that process may have built or repaired it
            if problem is not None:
                if problem:
                    print(f"[data] {what}: the decoded cache {folder} is damaged ({problem}); decoding it again")
                _discard(folder)
                free = shutil.disk_usage(root).free
                if free < nbytes * 1.05 + (1 << 30):
                    print(f"[data] {what}: decoded cache needs {nbytes / 1e9:.1f} GB, {root} has {free / 1e9:.1f} GB "
                          f"free; decoding from the files every epoch instead (set PRISMDD_CACHE=DIR elsewhere)")
                    return split
                _write_cache(split, folder, shape, num_workers, what)
    arr = np.memmap(folder / "images.u8", dtype=np.uint8, mode="c", shape=shape)  # copy-on-write: never written back
    return CachedFolderImages(torch.from_numpy(arr), split.targets, split.samples, split.resolution, split.channels,
                              folder)


def _write_cache(split: FolderImages, folder: Path, shape, num_workers: int, what: str) -> None:
    t0 = time.perf_counter()
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arr = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=shape)
    workers = num_workers or (min(8, os.cpu_count() or 1) if len(split) > 2000 else 0)
    loader = torch.utils.data.DataLoader(_Decode(split), batch_size=64, num_workers=workers)
    errors, pos = [], 0
    try:
        for x, err in progress(loader, desc=f"decode {what}", total=len(loader)):
            arr[pos: pos + len(x)] = x.numpy()
            errors += [e for e in err if e]
            pos += len(x)
    except BaseException:  # interrupted: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        more = f" (and {len(errors) - 1} more: `prismdd check-data` lists them)" if len(errors) > 1 else ""
        raise PrismError(errors[0] + more)
    arr.flush()
    del arr
    nbytes = int(np.prod(shape))
    t1 = time.perf_counter()
    sums = _chunk_digests(tmp / "images.u8", nbytes)  # read back from the page cache: what was written is sealed
    meta = {"shape": list(shape), "files": len(split), "source": str(Path(split.samples[0][0]).parents[1]),
            "decode_seconds": round(t1 - t0, 2), "checksum_seconds": round(time.perf_counter() - t1, 3),
            "workers": workers, "chunk_bytes": CHECK_CHUNK, "sha256": sums}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: a folder with it is complete
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first (no lock on this file system): keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        st = (folder / "images.u8").stat()
        _VERIFIED.add((str((folder / "images.u8").resolve()), st.st_ino, st.st_mtime_ns))  # sealed just now
    print(f"[data] {what}: decoded {len(split)} images once into {folder} ({nbytes / 1e6:.1f} MB, "
          f"{meta['decode_seconds']:.1f}s); every later load reuses it")


def _load_imagefolder(root, download, resolution, channels=None, eval_crop="auto", num_workers=0):
    """ImageFolder (``train/`` and ``val/`` or ``test/``, one sub-folder per class).

    The rule for size and channels, unless ``--resolution`` / ``--channels`` say otherwise: the resolution is
    the most common shorter side among the training images (up to 2,000 headers read, evenly spread; a mixed
    set gets a one-line notice), capped at 224 px (larger photos, e.g. ImageNet's, get ImageNet's 224 with a
    notice), and the images are 1-channel when every one read is greyscale (L, 1, 16-bit or float), else RGB. Each
    image is turned upright by its EXIF orientation, transparency is composited on white, and its shorter side is
    resized to the resolution and the centre square kept;
    the test split can use ImageNet's "Resize 256 + CenterCrop 224" instead (``--eval-crop``; ``auto``: at
    224 px and above). Normalisation: ImageNet's mean/std for RGB (what pretrained torchvision teachers
    expect), the training images' own for grey. Both splits are decoded once into a memory-mapped cache
    (``cache_root``) that every stage and epoch reuses. What the loader decides for the user (sizes, EXIF turns,
    transparency, mixed colour kinds, hidden files skipped) is said once per process (``say_once``).
    """
    train_samples, test_samples, classes, notes = _scan_splits(root)
    # what the request resolves to (the inferred size/channels, the notices) is remembered per file list, so a
    # later load reads no image header; the decoded arrays are keyed by the resolved values, whoever asked for them
    digest, test_digest = files_digest(train_samples), files_digest(test_samples)
    scan_key = _cache_key(digest, split="train", resolution=resolution, channels=channels, test=test_digest)
    scan = _read_scan(scan_key)
    if scan is None:
        res, ch, survey = infer_geometry([p for p, _ in train_samples])
        res, ch = resolution or res, channels or ch
        size_note = None if resolution else survey.size_note()
        survey = survey + survey_images([p for p, _ in test_samples])  # content notes cover both splits
        scan = {"resolution": res, "channels": ch, "notes": [size_note] * bool(size_note) + survey.content_notes(ch)}
        _write_scan(scan_key, scan)
    res, ch = scan["resolution"], scan["channels"]
    for note in notes + scan["notes"]:
        say_once(root, f"[data] imagefolder: {note}")
    key = _cache_key(digest, split="train", resolution=res, channels=ch)
    crop = crop_ratio(eval_crop, res)
    train = decode_cache(FolderImages(train_samples, res, ch, workers=num_workers), key, num_workers,
                         "imagefolder train")
    test_key = _cache_key(test_digest, split="test", resolution=res, channels=ch, crop=crop)
    test = decode_cache(FolderImages(test_samples, res, ch, crop, num_workers), test_key, num_workers,
                        "imagefolder test")
    if ch == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = channel_stats(_spread_sample(train, 10000 if isinstance(train, TensorImages) else 500))
    info = DatasetInfo("imagefolder", classes, ch, res, mean, std, str(root))
    return train, test, info


def _read_scan(key: str) -> dict | None:
    """A remembered header scan, or None (none yet, or unreadable: the scan is simply made again)."""
    root = cache_root()
    path = root / "imagefolder" / f"{key}.scan.json" if root else None
    try:
        scan = json.loads(path.read_text()) if path and path.exists() else None
    except (OSError, ValueError):
        return None
    return scan if isinstance(scan, dict) and {"resolution", "channels", "notes"} <= scan.keys() else None


def _write_scan(key: str, scan: dict) -> None:
    root = cache_root()
    if root is None:
        return
    try:
        with atomic_path(root / "imagefolder" / f"{key}.scan.json") as tmp:
            tmp.write_text(json.dumps(scan))
    except OSError:  # a read-only cache only costs the header scan next time
        pass


def _spread_sample(split, n: int) -> torch.Tensor:
    idx = torch.linspace(0, len(split) - 1, min(n, len(split))).long()
    return split.get_images(idx)


DATASETS.register("imagefolder", DatasetSpec(
    _load_imagefolder, "--data-root DIR with train/ and val/ class folders (ImageNet layout); size (most common, "
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
        info.mean, info.std = channel_stats(_spread_sample(train, 10000))
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


def _convert_channels(split: TensorImages, channels: int) -> TensorImages:
    x = split.images
    if channels == 3:
        return TensorImages(x.expand(-1, 3, -1, -1).contiguous(), split.targets)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return TensorImages((x.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8), split.targets)


def centre_crop(images: torch.Tensor, crop: float) -> torch.Tensor:
    """uint8 (N, C, S, S) images resized to ``S / crop`` and their centre ``S`` kept: the in-memory twin of
    ``load_image``'s crop (crop 224/256 = ImageNet's "Resize 256 + CenterCrop 224" on an S = 224 image)."""
    side = images.shape[-1]
    big = int(round(side / crop))
    x = torch.nn.functional.interpolate(images.float(), size=big, mode="bilinear", antialias=True)
    o = (big - side) // 2
    return x[..., o: o + side, o: o + side].round().clamp(0, 255).to(torch.uint8)


def _centre_crop_split(split: TensorImages, crop: float) -> TensorImages:
    return TensorImages(centre_crop(split.images, crop), split.targets)


def _resize_split(split: TensorImages, resolution: int) -> TensorImages:
    x = torch.nn.functional.interpolate(split.images.float(), size=resolution, mode="bilinear", antialias=True)
    return TensorImages(x.round().clamp(0, 255).to(torch.uint8), split.targets)


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


def check_data(name: str, root: str | None = None, resolution: int | None = None,
               channels: int | None = None) -> dict:
    """Decode every file of a dataset; returns counts, the size and channels used, the list of unreadable
    files and notes (mixed sizes, EXIF-turned and transparent images, mixed colour kinds, hidden files skipped,
    16-bit or float images and how they were scaled, images that decode flat), counted over every file."""
    if DATASETS.get(name).loader is not _load_imagefolder:
        train, test, info = load_dataset(name, root, False, resolution, channels)
        return {"dataset": name, "train": len(train), "test": len(test), "classes": info.num_classes,
                "resolution": info.resolution, "channels": info.channels, "bad_files": [], "notes": []}
    from PIL import Image

    train, test, classes, notes = _scan_splits(root)
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
