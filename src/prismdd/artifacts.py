"""What stages leave on disk, in one place: each file format has one writer and one reader here.

- every output folder: ``config.yaml`` + ``manifest.json`` (``write_manifest``/``read_manifest``) and the
  one resume guard (``reusable``) that decides whether finished work may be reused;
- model cards (teachers and students): ``model.safetensors`` + ``card.json`` (``save_model``/``load_model``,
  ``find_teachers``);
- a distilled set: ``images/<class>/<class>_<ipc>.png`` + ``records/batch_*.json`` (``image_path``,
  ``save_image``, ``load_distilled``);
- soft labels: ``epoch_NNNN.safetensors`` (``pack_logits``/``StoredLabels``);
- a student evaluation: ``accuracy.json`` (``ACCURACY_FILE``); diversity metrics: ``metrics.json``.

Stages import this module and ``core``, never each other.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from .core.augment import EpochPlan
from .core.config import comma_list, config_hash, config_to_dict, save_config
from .core.data import DatasetInfo, TensorImages, denormalize
from .core.errors import PrismError
from .core.io import atomic_path, load_tensors, read_json, save_tensors, tensors_metadata, torch_load, write_json
from .core.models import model_from_spec
from .core.training import SoftLabeler

MANIFEST = "manifest.json"
CARD = "card.json"
WEIGHTS = "model.safetensors"
ACCURACY_FILE = "accuracy.json"  # validate: the student's test accuracy (final epoch) and its protocol
METRICS_FILE = "metrics.json"  # metrics: diversity of distilled sets under an observer network


# ----------------------------------------------------------------------------- manifests and reuse
def versions() -> dict:
    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    for dist in ("prismdd", "timm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["platform"] = platform.platform()
    return out


def write_manifest(out_dir, stage: str, config, *, inputs: dict | None = None, outputs: dict | None = None,
                   wall_time: float | None = None, extra: dict | None = None) -> dict:
    """Write ``config.yaml`` (resolved) and ``manifest.json`` into a stage's output folder."""
    out_dir = Path(out_dir)
    save_config(config, out_dir / "config.yaml")
    manifest = {
        "stage": stage,
        "config": config_to_dict(config),
        "config_hash": config_hash(config),
        "seed": getattr(config, "seed", None),
        "inputs": inputs or {},
        "outputs": outputs or {},
        "versions": versions(),
        "wall_time_s": None if wall_time is None else round(wall_time, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    if extra:
        manifest.update(extra)
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(folder, stage: str | None = None, option: str | None = None) -> dict:
    """The manifest of a finished stage folder; ``stage`` (one name or several) is what the caller expects."""
    path = Path(folder) / MANIFEST
    where = f"{option} {folder}" if option else str(path)
    if not path.exists():
        hint = f" (run `prismdd {stage if isinstance(stage, str) else stage[0]}` first)" if stage else ""
        raise PrismError(f"{where}: no manifest.json; not the output of a finished prismdd stage{hint}")
    m = read_json(path)
    wanted = (stage,) if isinstance(stage, str) else tuple(stage or ())
    if wanted and m.get("stage") not in wanted:
        raise PrismError(f"{where}: expected the output of {' or '.join(wanted)}, found {m.get('stage')!r}")
    return m


def reusable(path, expected_hash: str, *, force: bool = False, what: str = "an output") -> dict | None:
    """The resume guard every stage uses before reusing finished (or half-finished) work.

    ``path``: a JSON record, a ``.pt`` checkpoint or a ``.safetensors`` file (hash in its header) that
    carries the ``config_hash`` it was made with.
    Returns the record when it exists and matches (reuse it), None when it does not exist or ``force`` is
    set (make it anew), and refuses with one line when it was made with other settings: mixing the two
    silently is the one outcome that must never happen.
    """
    path = Path(path)
    if force or not path.exists():
        return None
    if path.suffix == ".safetensors":
        record = tensors_metadata(path)
    else:
        record = torch_load(path) if path.suffix == ".pt" else read_json(path)
    found = record.get("config_hash") if isinstance(record, dict) else None
    if found != expected_hash:
        raise PrismError(f"{path}: {what} made with other settings; use --force to redo it, or another --out")
    return record


# ----------------------------------------------------------------------------- model cards
def save_model(folder, model: nn.Module, info: DatasetInfo, cfg, ev: dict, wall: float, chash: str) -> None:
    """A trained network (teacher or student): weights, ``card.json`` (written last: it marks the model
    finished) and the config that made it."""
    folder = Path(folder)
    save_tensors(model.state_dict(), folder / WEIGHTS)
    card = {
        "arch": model.prismdd_spec["arch"],
        "spec": model.prismdd_spec,
        "dataset": info.name,
        "class_names": info.class_names,
        "mean": list(info.mean), "std": list(info.std),
        "epochs": getattr(cfg, "epochs", None),
        "test_top1": round(ev["top1"], 3),
        "test_top5": round(ev["top5"], 3),
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "wall_time_s": round(wall, 2),
        "config_hash": chash,
    }
    save_config(cfg, folder / "config.yaml")
    write_json(folder / CARD, card)


def load_model(path, *, arch: str | None = None, dataset: str | None = None,
               class_names: list[str] | None = None, resolution: int | None = None,
               device="cpu") -> tuple[nn.Module, dict]:
    """Load a model folder (or its ``model.safetensors``) frozen in eval mode, checking what the caller expects."""
    folder = Path(path)
    if folder.name == WEIGHTS:
        folder = folder.parent
    if not (folder / CARD).exists():
        raise PrismError(f"{folder}: no card.json; not a finished teacher (train it with `prismdd squeeze`)")
    card = read_json(folder / CARD)
    if "spec" not in card or "arch" not in card:
        raise PrismError(f"{folder / CARD}: no model spec; retrain it with `prismdd squeeze --force`")
    if arch is not None and card["arch"] != arch:
        raise PrismError(f"{folder}: teacher is {card['arch']!r}, expected {arch!r}")
    if dataset is not None and card["dataset"] != dataset:
        raise PrismError(f"{folder}: teacher was trained on {card['dataset']!r}, expected {dataset!r}")
    if class_names is not None and list(card["class_names"]) != list(class_names):
        raise PrismError(f"{folder}: teacher classes differ from the dataset's ({len(card['class_names'])} vs "
                         f"{len(class_names)} classes, or another order)")
    if resolution is not None and card["spec"].get("resolution") != resolution:
        raise PrismError(f"{folder}: trained at {card['spec'].get('resolution')} px, the images are {resolution} px; "
                         f"pass --resolution {card['spec'].get('resolution')} or use teachers of this resolution")
    model = model_from_spec(card["spec"])
    try:
        model.load_state_dict(load_tensors(folder / WEIGHTS))
    except RuntimeError as e:  # shapes or names differ from what card.json describes
        raise PrismError(f"{folder / WEIGHTS}: cannot load into the architecture card.json describes "
                         f"({str(e).splitlines()[0]}); retrain it with `prismdd squeeze --force`") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


load_teacher = load_model  # the name most callers know it by


def find_teachers(folder) -> dict[str, Path]:
    """``{arch: teacher folder}`` for every finished teacher under a squeeze output folder."""
    folder = Path(folder)
    if (folder / CARD).exists():
        return {read_json(folder / CARD)["arch"]: folder}
    found = {read_json(card)["arch"]: card.parent for card in sorted(folder.glob(f"*/{CARD}"))}
    if not found:
        raise PrismError(f"--teachers {folder}: no finished teachers found (expected <arch>/card.json); "
                         f"train them with `prismdd squeeze --out {folder}`")
    return found


def find_one_teacher(path, option: str) -> Path:
    """The folder of the single teacher ``option`` points at (a teacher folder or a zoo of one)."""
    folder = Path(path)
    if not folder.exists():
        raise PrismError(f"{option} {path}: folder not found; train it with `prismdd squeeze --arch <arch> "
                         f"--out {path}`")
    found = find_teachers(folder)
    if len(found) > 1:
        raise PrismError(f"{option} {path}: holds several teachers ({', '.join(found)}); pass one of their "
                         f"folders, e.g. {option} {next(iter(found.values()))}")
    return next(iter(found.values()))


def load_labelers(teachers_dir: str, archs: str | None, default_arch: str | None, info: DatasetInfo,
                  ensemble: str, primary_weight: float, device) -> SoftLabeler:
    """The soft-label teacher(s) of relabel and online validation: ``archs`` (comma list), else the
    distilled set's primary, else the zoo's first teacher."""
    found = find_teachers(teachers_dir)
    names = comma_list(archs) or [default_arch if default_arch in found else next(iter(found))]
    missing = [a for a in names if a not in found]
    if missing:
        raise PrismError(f"--label-teachers: no teacher {', '.join(missing)} in {teachers_dir} (found: {', '.join(found)})")
    models = [load_model(found[a], arch=a, dataset=info.name, class_names=info.class_names,
                         resolution=info.resolution, device=device)[0] for a in names]
    return SoftLabeler(models, names, ensemble, primary_weight)


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


class DistilledSet(TensorImages):
    """A recovered set as an in-memory dataset (uint8 images, class targets) with its provenance."""

    def __init__(self, images, targets, info: DatasetInfo, manifest: dict, folder: Path):
        super().__init__(images, targets)
        self.info, self.manifest, self.folder = info, manifest, folder

    @property
    def start_indices(self) -> list:
        """Per image (class, then IPC order): the real training indices it started from, or None (noise)."""
        entries = sorted(self.manifest["outputs"]["images"].values(), key=lambda e: (e["class"], e["ipc_index"]))
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
                               resolution=cfg.resolution or made.get("resolution"))


def load_distilled(folder) -> DistilledSet:
    folder = Path(folder)
    m = read_manifest(folder, ("recover", "random-real"), option="--distilled")
    info = DatasetInfo(**{k: v for k, v in m["inputs"]["dataset"].items() if k != "num_classes"})
    entries = sorted(m["outputs"]["images"].values(), key=lambda e: (e["class"], e["ipc_index"]))
    imgs = []
    for e in entries:
        path = folder / e["file"]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if info.channels == 1 else "RGB"), dtype=np.uint8)
        except Exception as err:
            raise PrismError(f"{path}: cannot read distilled image ({err}); re-run recover to rewrite it") from None
        t = torch.from_numpy(arr.copy())
        imgs.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1))
    targets = torch.tensor([e["class"] for e in entries])
    return DistilledSet(torch.stack(imgs), targets, info, m, folder)


# ----------------------------------------------------------------------------- soft labels
LABEL_KEYS = ("logits", "values", "indices", "tail")  # what pack_logits writes; the rest of a file is its views


def pack_logits(logits: torch.Tensor, storage: str, topk: int) -> dict[str, torch.Tensor]:
    dtype = torch.float16 if storage == "fp16" else torch.float32
    if topk and topk < logits.shape[1]:
        v, i = logits.topk(topk, dim=1)
        idx_dtype = torch.int16 if logits.shape[1] < 32768 else torch.int32
        # the mean of the logits left out (one number per view): filling them with it instead of the k-th
        # value cut the reconstruction error 4-50x and kept 4 accuracy points at top-2 (BENCHMARKS.md)
        tail = (logits.sum(1, keepdim=True) - v.sum(1, keepdim=True)) / (logits.shape[1] - topk)
        return {"values": v.to(dtype).contiguous(), "indices": i.to(idx_dtype).contiguous(),
                "tail": tail.to(dtype).contiguous()}
    return {"logits": logits.to(dtype).contiguous()}


def unpack_logits(d: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    if "logits" in d:
        return d["logits"].float()
    v, i = d["values"].float(), d["indices"].long()
    # classes outside the top-k get the stored mean of the left-out logits (files without it: the smallest
    # stored logit); an approximation whose accuracy cost the storage benchmark measures
    fill = d["tail"].float() if "tail" in d else v.min(dim=1, keepdim=True).values
    out = fill.expand(-1, num_classes).clone()
    return out.scatter_(1, i, v)


def epoch_file(folder, epoch: int) -> Path:
    return Path(folder) / f"epoch_{epoch:04d}.safetensors"


def label_bytes(d: dict[str, torch.Tensor]) -> int:
    """Bytes of the label tensors alone (view parameters excluded), for the storage comparison."""
    return sum(t.numel() * t.element_size() for k, t in d.items() if k in LABEL_KEYS)


class StoredLabels:
    """Reads a relabel folder epoch by epoch: the stored plan and the dense logits."""

    def __init__(self, folder, num_classes: int):
        self.folder = Path(folder)
        m = read_json(self.folder / MANIFEST) if (self.folder / MANIFEST).exists() else None
        if m is None or m.get("stage") != "relabel":
            raise PrismError(f"--labels {folder}: not a finished relabel output (no relabel manifest.json)")
        self.manifest = m
        self.views = m["views"]
        self.epochs = m["outputs"]["epochs"]
        self.num_classes = num_classes

    def epoch(self, e: int) -> tuple[EpochPlan, torch.Tensor]:
        if e >= self.epochs:
            raise PrismError(f"--labels {self.folder}: holds {self.epochs} epochs, validation asks for epoch {e + 1}; "
                             f"relabel with --epochs >= the student's epochs")
        d = load_tensors(epoch_file(self.folder, e))
        return EpochPlan.from_tensors(d, self.views["batch_size"]), unpack_logits(d, self.num_classes)
