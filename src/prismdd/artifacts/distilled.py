"""Distilled sets: ``images/<class>/<class>_<ipc>.png`` + ``records/batch_*.json`` (``image_path``, ``save_image``,
``load_distilled``), sealed with a digest per PNG (``seal_distilled``, ``check_finished_images``), and centred one-hot
label vectors (``centred_onehot``). Label vectors a method writes beside its images (FRePo's learned labels) are the
method's own file, read through ``methods.labels.LABEL_SOURCES``."""
from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.data import DatasetInfo, TensorImages, denormalize
from ..core.errors import PrismError
from ..core.io import atomic_path, read_json
from .manifest import MANIFEST, SEALED_FILES, check_sealed_file, read_manifest


# ----------------------------------------------------------------------------- distilled sets
def class_dirname(c: int) -> str:
    return f"{c:03d}"  # zero-padded index: ImageFolder's sorted order is the class order


def image_path(out, c: int, k: int) -> Path:
    return Path(out) / "images" / class_dirname(c) / f"{class_dirname(c)}_{k:03d}.png"


def record_path(out, b: int) -> Path:
    """One finished recovery batch: its units, teachers, losses and real starts (written last)."""
    return Path(out) / "records" / f"batch_{b:05d}.json"


def save_image(path: Path, x: torch.Tensor, info: DatasetInfo) -> None:
    """Normalised (C, H, W) -> 8-bit PNG (lossless), written atomically."""
    arr = (denormalize(x[None].float().cpu(), info)[0].clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _ordered(images: dict) -> list[dict]:
    """A distilled manifest's image entries in the set's order: class, then IPC index."""
    return sorted(images.values(), key=lambda e: (e["class"], e["ipc_index"]))


class DistilledSet(TensorImages):
    """A recovered set as an in-memory dataset (uint8 images, class targets) with its provenance."""

    def __init__(self, images, targets, info: DatasetInfo, manifest: dict, folder: Path):
        super().__init__(images, targets)
        self.info, self.manifest, self.folder = info, manifest, folder

    @property
    def start_indices(self) -> list:
        """Per image (class, then IPC order): the real training indices it started from, or None (noise)."""
        entries = _ordered(self.manifest["outputs"]["images"])
        return [e.get("start_indices") for e in entries]


def with_distilled_dataset(cfg, manifest: dict, folder):
    """The one rule for stages that read a distilled folder (relabel, validate, metrics): the dataset and data
    root are the folder's own (its manifest says which), so ``--dataset`` may be left out; a ``--dataset``
    that names another dataset is refused rather than silently mixed."""
    made = manifest.get("config") or {}
    name = made.get("dataset") or manifest["inputs"]["dataset"]["name"]
    if cfg.dataset is not None and cfg.dataset != name:
        raise PrismError(f"--dataset {cfg.dataset}: {folder} was distilled from {name!r}; drop --dataset or pass "
                         f"--dataset {name}")
    return dataclasses.replace(cfg, dataset=name, data_root=cfg.data_root or made.get("data_root"),
                               resolution=cfg.resolution or made.get("resolution"),
                               channels=cfg.channels or made.get("channels"),
                               eval_crop=made.get("eval_crop", "auto") if cfg.eval_crop == "auto" else cfg.eval_crop)


IMAGE_DIGEST = "sha256"  # a recover manifest's image entry: sha256 of the PNG's bytes as recover wrote them
SET_DIGEST = "images_sha256"  # a recover manifest's outputs: digest of every entry's class, index, file and sha256


def _set_digest(entries: list[dict]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e['class']}\t{e['ipc_index']}\t{e['file']}\t{e.get(IMAGE_DIGEST)}\n".encode())
    return h.hexdigest()


def seal_distilled(out, images: dict) -> str:
    """Record in each manifest entry of ``images`` the sha256 of its PNG as written (in place) and return the
    whole set's digest (``SET_DIGEST``). Without them a PNG edited or zeroed after recover is labelled and trained on,
    and a re-run of recover finds the folder finished and keeps it."""
    for e in images.values():
        e[IMAGE_DIGEST] = hashlib.sha256((Path(out) / e["file"]).read_bytes()).hexdigest()
    return _set_digest(_ordered(images))


def _check_image(path: Path, entry: dict, data: bytes) -> None:
    """Refuse a distilled PNG whose bytes are not those its manifest entry sealed, or whose entry seals none."""
    was = entry.get(IMAGE_DIGEST)
    if was is None:
        raise PrismError(f"{path}: its manifest entry records no {IMAGE_DIGEST}, so a change to it cannot be noticed; "
                         f"re-run the recover command with --force to redo the set")
    now = hashlib.sha256(data).hexdigest()
    if now != was:
        raise PrismError(f"{path}: changed since recover wrote it (sha256 {was[:12]} then, {now[:12]} now); delete it "
                         f"and re-run the recover command to make it again, or re-run it with --force to redo the set")


def check_finished_images(folder) -> None:
    """For a re-run of recover: every image a finished manifest in ``folder`` lists and that is still on disk must
    be the one recover wrote (a missing one is simply made again; a changed one would be kept and passed on); the
    same for the method's sealed files (``seal_files``: FRePo's learned labels and state)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return
    m = read_json(path)
    if m.get("stage") != "recover":
        return
    for e in _ordered(m.get("outputs", {}).get("images", {})):
        p = Path(folder) / e["file"]
        if p.exists():
            _check_image(p, e, p.read_bytes())
    for name, was in (m.get("outputs", {}).get(SEALED_FILES) or {}).items():
        if (Path(folder) / name).exists():
            check_sealed_file(folder, name, was)


def load_distilled(folder) -> DistilledSet:
    """A recover folder as a ``DistilledSet``: the one reader of relabel, validate, metrics and ``--init-from``, so
    every one of them refuses a PNG changed since recover sealed it, and a manifest whose image list was edited."""
    folder = Path(folder)
    m = read_manifest(folder, ("recover", "random-real"), option="--distilled")
    info = DatasetInfo(**{k: v for k, v in m["inputs"]["dataset"].items() if k != "num_classes"})
    entries = _ordered(m["outputs"]["images"])
    imgs = []
    for e in entries:
        path = folder / e["file"]
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("L" if info.channels == 1 else "RGB"), dtype=np.uint8)
        except Exception as err:
            raise PrismError(f"{path}: cannot read distilled image ({err}); re-run recover to rewrite it") from None
        _check_image(path, e, data)
        t = torch.from_numpy(arr.copy())
        imgs.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1))
    sealed = m["outputs"].get(SET_DIGEST)
    if sealed != _set_digest(entries):
        raise PrismError(f"{folder / MANIFEST}: its image list was edited since recover wrote it (or it records no "
                         f"{SET_DIGEST}); re-run the recover command with --force to redo the set")
    targets = torch.tensor([e["class"] for e in entries])
    return DistilledSet(torch.stack(imgs), targets, info, m, folder)


# ----------------------------------------------------------------------------- label vectors
def centred_onehot(y: torch.Tensor, num_classes: int, scaled: bool = False) -> torch.Tensor:
    """FRePo's label vectors: one-hot minus 1/C (1 - 1/C on the class, -1/C elsewhere); ``scaled``: divided by
    sqrt(C / 10), the reference's learned-label start (frepo.py:75-79; 1 for 10 classes). Also the regression
    target of ``validate --loss mse`` for images without learned labels."""
    out = torch.nn.functional.one_hot(y.long(), num_classes).float() - 1.0 / num_classes
    return out / (num_classes / 10) ** 0.5 if scaled else out
