"""The ImageFolder dataset: the scan of ``train/`` and ``val/`` (hidden files, symlink checks), the survey of image
headers that decides size and channels and the notices about what decoding does, and the loader
(``load_imagefolder``) that decodes both splits into the cache."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PrismError
from ..log import say_once
from .base import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, TensorImages, channel_stats
from .cache import cache_key, decode_cache, files_digest, read_scan, write_scan
from .decode import (ALPHA_BACKGROUND, GREY_MODES, IMAGE_EXTENSIONS, PALETTE_MODES, FolderImages, crop_ratio,
                     exif_orientation, has_alpha)
from .sampling import spread_sample

INFER_SAMPLE = 2000  # image headers read to infer an ImageFolder's size and channels
MAX_INFERRED = 224  # photos larger than this are decoded at 224 px unless --resolution says otherwise


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


def scan_splits(root) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str], list[str]]:
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
    """``(resolution, channels, survey)`` of an ImageFolder from its image headers (see ``load_imagefolder``)."""
    survey = survey_images(paths, sample)
    if not survey.sides:
        raise PrismError(f"{Path(paths[0]).parent.parent}: no readable image among {min(len(paths), sample)} files; "
                         f"run `prismdd check-data --dataset imagefolder --data-root DIR`")
    common = max(survey.sides.items(), key=lambda kv: (kv[1], kv[0]))[0]
    colour = sum(n for m, n in survey.modes.items() if m not in GREY_MODES)
    return min(common, MAX_INFERRED), (3 if colour else 1), survey


def load_imagefolder(root, download, resolution, channels=None, eval_crop="auto", num_workers=0):
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
    train_samples, test_samples, classes, notes = scan_splits(root)
    # what the request resolves to (the inferred size/channels, the notices) is remembered per file list, so a
    # later load reads no image header; the decoded arrays are keyed by the resolved values, whoever asked for them
    digest, test_digest = files_digest(train_samples), files_digest(test_samples)
    scan_key = cache_key(digest, split="train", resolution=resolution, channels=channels, test=test_digest)
    scan = read_scan(scan_key)
    if scan is None:
        res, ch, survey = infer_geometry([p for p, _ in train_samples])
        res, ch = resolution or res, channels or ch
        size_note = None if resolution else survey.size_note()
        survey = survey + survey_images([p for p, _ in test_samples])  # content notes cover both splits
        scan = {"resolution": res, "channels": ch, "notes": [size_note] * bool(size_note) + survey.content_notes(ch)}
        write_scan(scan_key, scan)
    res, ch = scan["resolution"], scan["channels"]
    for note in notes + scan["notes"]:
        say_once(root, f"[data] imagefolder: {note}")
    key = cache_key(digest, split="train", resolution=res, channels=ch)
    crop = crop_ratio(eval_crop, res)
    train = decode_cache(FolderImages(train_samples, res, ch, workers=num_workers), key, num_workers,
                         "imagefolder train")
    test_key = cache_key(test_digest, split="test", resolution=res, channels=ch, crop=crop)
    test = decode_cache(FolderImages(test_samples, res, ch, crop, num_workers), test_key, num_workers,
                        "imagefolder test")
    if ch == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = channel_stats(spread_sample(train, 10000 if isinstance(train, TensorImages) else 500))
    info = DatasetInfo("imagefolder", classes, ch, res, mean, std, str(root))
    return train, test, info
