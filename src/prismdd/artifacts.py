"""What stages leave on disk, in one place: each file format has one writer and one reader here.

- every output folder: ``config.yaml`` + ``manifest.json`` (``write_manifest``/``read_manifest``) and the
  one resume guard (``reusable``) that decides whether finished work may be reused;
- model cards (teachers and students): ``model.safetensors`` + ``card.json`` (``save_model``/``load_model``,
  ``find_teachers``);
- a distilled set: ``images/<class>/<class>_<ipc>.png`` + ``records/batch_*.json`` (``image_path``,
  ``save_image``, ``load_distilled``); its manifest seals each PNG with a digest (``seal_distilled``), checked
  by every reader and by a re-run of recover (``check_finished_images``);
- soft labels: ``epoch_NNNN.safetensors`` (``pack_logits``/``StoredLabels``);
- a student evaluation: ``accuracy.json`` (``ACCURACY_FILE``); diversity metrics: ``metrics.json``;
- plug-in tensors reused while their header matches (``settings_header``/``load_if_header``): real-data statistics
  beside a teacher (``save_layer_stats``: G-VBSM's ``gvbsm_stats.safetensors``, EDC's ``edc_stats_seed<seed>``) and
  D4M's prototypes in a recover folder (``save_prototypes``).

Stages import this module and ``core``, never each other.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import os
import platform
import socket
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from .core.augment import EpochPlan
from .core.config import comma_list, config_hash, config_to_dict, save_config
from .core.data import DatasetInfo, TensorImages, denormalize, say_once
from .core.errors import PrismError
from .core.io import (atomic_path, load_tensors, pid_alive, read_json, remove_orphans, save_tensors, tensors_metadata,
                      torch_load, write_json)
from .core.models import BN_FREE_ARCHS, model_from_spec
from .core.runtime import torch_threads
from .core.training import SoftLabeler

MANIFEST = "manifest.json"
CARD = "card.json"
WEIGHTS = "model.safetensors"
ACCURACY_FILE = "accuracy.json"  # validate: the student's test accuracy (final epoch) and its protocol
INPUTS_FILE = "inputs.json"  # digests of what a folder's finished work was made from (``guard_inputs``)
LOCK_FILE = ".prismdd.lock"  # the one writer of a folder: its PID, host and stage (``output_lock``)
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
        "threads": torch.get_num_threads(),  # what the wall time was measured with (--threads resolved)
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


def reusable(path, expected_hash: str, *, force: bool = False, what: str = "an output",
             inputs: dict | None = None) -> dict | None:
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
    if inputs is not None:  # ``inputs``: {name: digest} it must have been made from (files without them: older)
        recorded = record.get("inputs")
        if isinstance(recorded, str):  # a safetensors header holds text
            recorded = json.loads(recorded)
        if recorded:
            check_inputs(recorded, inputs, f"{path}: {what}")
    return record


# ----------------------------------------------------------------------------- provenance
_DIGESTS: dict[tuple, str] = {}


def file_digest(path) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time within a process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def teacher_digests(folders: dict) -> dict[str, str]:
    """``{"teacher <arch>": sha256 of its model.safetensors}``: retraining a teacher in place changes it."""
    return {f"teacher {a}": file_digest(Path(f) / WEIGHTS) for a, f in sorted(folders.items())}


def images_digest(images: torch.Tensor, targets: torch.Tensor) -> str:
    """sha256 of a set's pixels (uint8) and classes, in their order: what soft labels and students depend on."""
    h = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(targets.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_inputs(recorded: dict, current: dict, what: str) -> None:
    """Refuse, naming the first input that differs, when ``current`` digests are not the ``recorded`` ones."""
    for name in sorted(set(recorded) | set(current)):
        was, now = recorded.get(name), current.get(name)
        if was == now:
            continue
        if was is None:
            change = f"{name} is new (not among the inputs it was made from)"
        elif now is None:
            change = f"{name} is no longer among the inputs"
        else:
            change = f"{name} changed since (sha256 {str(was)[:12]} then, {str(now)[:12]} now)"
        raise PrismError(f"{what} was made from other inputs: {change}; use --force to redo it, or another --out")


def guard_inputs(folder, inputs: dict, *, force: bool = False) -> None:
    """The run-level provenance of a folder whose work is resumed piece by piece: ``inputs.json`` records the
    digests of what the work was made from; a resume with other inputs (e.g. teachers retrained in place
    between a kill and the re-run) is refused, ``--force`` starts the record anew."""
    path = Path(folder) / INPUTS_FILE
    if path.exists() and not force:
        check_inputs(read_json(path), inputs, f"--out {folder}: its finished work")
    if force or not path.exists() or read_json(path) != inputs:
        write_json(path, inputs)


def clear_outputs(folder, *patterns: str) -> None:
    """``--force``: delete what the run replaces (files matching ``patterns`` and the old manifest), so that
    nothing from the previous run (e.g. images of a larger IPC) survives under the new manifest."""
    folder = Path(folder)
    for pattern in (*patterns, MANIFEST, INPUTS_FILE):
        for p in folder.glob(pattern):
            if p.is_file():
                p.unlink()


# ----------------------------------------------------------------------------- one writer per folder
_HELD: dict[str, int] = {}  # folders this process holds the lock of (re-entrant: the pipeline nests stages)


def _lock_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or empty: written by no finished acquire (ours is written before it is linked)


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: cannot be checked from here
    return pid_alive(int(owner.get("pid", -1)))


@contextmanager
def output_lock(folder, stage: str, option: str = "--out"):
    """Hold ``folder`` as its one writer for the block: a second prismdd process writing there gets one line
    naming the first (PID, stage, start time); a lock left by a process that no longer runs (kill -9, power
    loss) is taken over. Leftover temporary files of dead writers are removed once the lock is held."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PrismError(f"{option} {folder}: is a file, not a folder; pass a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # serialises acquisitions (and stale take-overs) of this folder
        owner = _lock_owner(lock)
        if owner is not None:
            if owner and _owner_alive(owner):
                raise PrismError(f"{option} {folder}: in use by prismdd {owner.get('stage')} (pid {owner.get('pid')} "
                                 f"on {owner.get('host')}, since {owner.get('started')}); wait for it to finish or "
                                 f"pass another {option} (if no such process runs, delete {lock})")
            print(f"[{stage}] taking over the lock of a process that no longer runs "
                  f"(pid {owner.get('pid', '?')}, {owner.get('stage', '?')}) in {folder}", file=sys.stderr)
            lock.unlink(missing_ok=True)
        with atomic_path(lock) as tmp:
            tmp.write_text(json.dumps(me) + "\n")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _HELD[key] = 1
    try:
        remove_orphans(folder)
        yield folder
    finally:
        _HELD.pop(key, None)
        if (_lock_owner(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def locked_stage(stage: str):
    """Decorator of a stage function ``fn(cfg)``: holds ``cfg.out`` (``output_lock``) for the stage's life,
    released on any exit. Under torchrun only rank 0 takes it (the ranks of one job share the folder). Every rank
    runs with ``cfg.threads`` torch threads when given (``torch_threads``; None: as the caller set them)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            if int(os.environ.get("RANK", "0")) != 0:
                with torch_threads(getattr(cfg, "threads", None)):
                    return fn(cfg, *args, **kwargs)
            made = _missing_folders(Path(cfg.out))
            try:
                with output_lock(cfg.out, stage), torch_threads(getattr(cfg, "threads", None)):
                    return fn(cfg, *args, **kwargs)
            except BaseException:
                # a call that failed its checks leaves no empty folder behind; anything written stays
                for folder in made:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                raise
        return run
    return wrap


def _missing_folders(path: Path) -> list[Path]:
    """The folders a stage creates for ``path``, deepest first (none when it exists)."""
    made = []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


# ----------------------------------------------------------------------------- finite checks
def check_finite_state(state: dict, what: str, fix: str) -> None:
    """Refuse weights or BN running statistics that hold NaN or inf, naming the first such tensor."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise PrismError(f"{what}: {name} holds {bad} NaN/inf values of {t.numel()}; {fix}")


def check_finite_labels(logits: torch.Tensor, teachers: list[str], where) -> None:
    """Soft labels are checked before they are stored: a NaN teacher must not become a silent label file."""
    bad = ~torch.isfinite(logits)
    if bad.any():
        rows = int(bad.any(dim=1).sum())
        raise PrismError(f"{where}: teacher {', '.join(teachers)} gave NaN/inf logits on {rows} of {len(logits)} "
                         f"views; check that teacher (retrain it with `prismdd squeeze --force`) or pick "
                         f"another with --label-teachers")


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
        # the weights' sha256 as written: squeeze checks it before it counts a teacher as finished
        WEIGHTS_DIGEST: file_digest(folder / WEIGHTS),
    }
    save_config(cfg, folder / "config.yaml")
    write_json(folder / CARD, card)


WEIGHTS_DIGEST = "weights_sha256"  # in card.json: the sha256 of model.safetensors as save_model wrote it


def weights_problem(folder, card: dict) -> str | None:
    """What is wrong with a finished model folder's weights, or None: missing, unreadable, or other bytes than
    the card recorded (cards of an older prismdd record none: loadable is then enough)."""
    path = Path(folder) / WEIGHTS
    if not path.exists():
        return "is missing"
    try:
        tensors_metadata(path)
        load_tensors(path)
    except PrismError:
        return "cannot be read (damaged or cut off)"
    was = card.get(WEIGHTS_DIGEST)
    now = file_digest(path)
    if was is not None and now != was:
        return f"changed since squeeze wrote it (sha256 {was[:12]} then, {now[:12]} now)"
    return None


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
    state = load_tensors(folder / WEIGHTS)
    check_finite_state(state, f"{folder / WEIGHTS} ({card['arch']})",
                       "its training diverged or the file is damaged; retrain it with `prismdd squeeze --force`")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes or names differ from what card.json describes
        raise PrismError(f"{folder / WEIGHTS}: cannot load into the architecture card.json describes "
                         f"({str(e).splitlines()[0]}); retrain it with `prismdd squeeze --force`") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


load_teacher = load_model  # the name most callers know it by


# ----------------------------------------------------------------------------- stored plug-in tensors
def settings_header(fmt: str, settings: dict, **digests: str) -> dict[str, str]:
    """The header a stored tensor file must carry to be reused: its format, the digests of what it was made
    from and the ``settings`` that shape it, all as text (safetensors headers hold strings)."""
    return {"format": fmt, **digests, **{k: json.dumps(v, sort_keys=True) for k, v in sorted(settings.items())}}


def load_if_header(path, header: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` when its header equals ``header``; None when there is no file or it was made from
    other inputs or settings (the caller recomputes and overwrites it). A damaged file is refused (one line)."""
    path = Path(path)
    if not path.exists() or tensors_metadata(path) != header:
        return None
    return load_tensors(path)


# ----------------------------------------------------------------------------- real-data layer statistics
LAYER_STATS_FILE = "gvbsm_stats.safetensors"  # beside a teacher's model.safetensors (G-VBSM's conv statistics)
LAYER_STATS_FORMAT = "prismdd-layer-stats/1"


def layer_stats_path(teacher_folder, name: str = LAYER_STATS_FILE) -> Path:
    """A teacher's stored real-data statistics: ``name`` is G-VBSM's file by default (EDC: ``edc_stats_file``)."""
    return Path(teacher_folder) / name


def layer_stats_header(teacher_folder, settings: dict) -> dict[str, str]:
    """The header a statistics file must carry to be reused: its format, the sha256 of the teacher's weights
    it was computed with (``file_digest``) and the ``settings`` (dataset, images, seed, ...), all as text."""
    return settings_header(LAYER_STATS_FORMAT, settings, teacher_digest=file_digest(Path(teacher_folder) / WEIGHTS))


def load_layer_stats(teacher_folder, settings: dict, name: str = LAYER_STATS_FILE) -> dict[str, torch.Tensor] | None:
    """The stored statistics of a teacher when the file's header matches the teacher's CURRENT weights and
    ``settings``; None when there is no file or it was made from other weights (teacher retrained in place)
    or other settings: the caller recomputes and overwrites it. A damaged file is refused (one line)."""
    return load_if_header(layer_stats_path(teacher_folder, name), layer_stats_header(teacher_folder, settings))


def save_layer_stats(teacher_folder, stats: dict[str, torch.Tensor], settings: dict,
                     name: str = LAYER_STATS_FILE) -> Path:
    """Write a teacher's statistics atomically (safetensors, header from ``layer_stats_header``)."""
    path = layer_stats_path(teacher_folder, name)
    remove_orphans(path.parent, depth=0)  # a run killed while writing here left its temporary copy (no lock here)
    save_tensors(stats, path, metadata=layer_stats_header(teacher_folder, settings))
    return path


def edc_stats_file(seed: int) -> str:
    """EDC's statistics file beside a teacher: one per recover seed (its real-data pass is drawn from the seed)."""
    return f"edc_stats_seed{int(seed)}.safetensors"


# ----------------------------------------------------------------------------- D4M prototypes
D4M_PROTOTYPES_FILE = "d4m_prototypes.safetensors"  # in a recover output folder: the per-class k-means centres
D4M_PROTOTYPES_FORMAT = "prismdd-d4m-prototypes/1"


def load_prototypes(out, settings: dict, model_digest: str) -> dict[str, torch.Tensor] | None:
    """A recover folder's stored D4M prototypes when they were made from the same diffusion model (``model_digest``)
    and ``settings``; None otherwise (recompute and overwrite)."""
    return load_if_header(Path(out) / D4M_PROTOTYPES_FILE,
                          settings_header(D4M_PROTOTYPES_FORMAT, settings, model_digest=model_digest))


def save_prototypes(out, tensors: dict[str, torch.Tensor], settings: dict, model_digest: str) -> Path:
    """Write D4M's prototypes atomically into the recover folder (header: format, model digest, settings)."""
    path = Path(out) / D4M_PROTOTYPES_FILE
    save_tensors(tensors, path, metadata=settings_header(D4M_PROTOTYPES_FORMAT, settings, model_digest=model_digest))
    return path


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


REFERENCE_LABEL_TEACHERS = 4  # PRISM's relabel_r18.sh --candidate-number 4 (generate_soft_label_r18.py:137)


def label_teacher_names(found: dict, archs: str | None, primary: str | None, pool: list[str] | None) -> list[str]:
    """The soft-label teachers a ``--label-teachers`` value names. Besides architectures it takes two words:
    ``primary`` (the distilled set's primary; the zoo's first for a baseline) and ``pool`` (the recover run's BN
    pool, plus any BN-free teacher of the folder, e.g. AlexNet, which PRISM labels with although it cannot be a BN
    teacher; for a baseline, every teacher of the folder). Nothing given: the primary alone."""
    first = primary if primary in found else next(iter(found))
    names: list[str] = []
    for a in comma_list(archs) or ["primary"]:
        if a == "primary":
            names.append(first)
        elif a == "pool":
            recorded = [t for t in pool if t in found] if pool else list(found)
            names += recorded + [t for t in found if t in BN_FREE_ARCHS]
        else:
            names.append(a)
    return list(dict.fromkeys(names))  # each teacher once, in the order named


def load_labelers(teachers_dir: str, archs: str | None, default_arch: str | None, info: DatasetInfo,
                  ensemble: str, primary_weight: float, device, pool: list[str] | None = None) -> SoftLabeler:
    """The soft-label teacher(s) of relabel and online validation (``label_teacher_names``)."""
    found = find_teachers(teachers_dir)
    names = label_teacher_names(found, archs, default_arch, pool)
    missing = [a for a in names if a not in found]
    if missing:
        raise PrismError(f"--label-teachers: no teacher {', '.join(missing)} in {teachers_dir} (found: {', '.join(found)})")
    if "pool" in comma_list(archs) and len(names) < REFERENCE_LABEL_TEACHERS:
        print(f"[labels] soft labels from {len(names)} teacher(s) ({', '.join(names)}); PRISM labels with "
              f"{REFERENCE_LABEL_TEACHERS} (its primary, mobilenet_v2, alexnet, shufflenet_v2_x0_5): train more into "
              f"{teachers_dir} to match")
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
    """Refuse a distilled PNG whose bytes are not those its manifest entry sealed (entries of an older prismdd
    carry no digest and pass)."""
    was = entry.get(IMAGE_DIGEST)
    if was is None:
        return
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


SEALED_FILES = "files"  # a recover manifest's outputs: {file name: sha256} of the method's files (``seal_files``)


def seal_files(out, names) -> dict[str, str]:
    """``{name: sha256}`` of the files a method wrote beside the images (FRePo's ``learned_labels.safetensors`` and
    ``frepo_state.safetensors``): without a digest, labels shifted by one class trained a student to chance with
    exit status 0."""
    return {n: file_digest(Path(out) / n) for n in names if (Path(out) / n).exists()}


def check_sealed_file(folder, name: str, was: str | None, stage: str = "recover") -> None:
    """Refuse a sealed file of a ``stage`` folder (recover, relabel) whose bytes are not those its manifest
    recorded."""
    if was is None:
        return  # a folder of an older prismdd: nothing recorded
    path = Path(folder) / name
    now = file_digest(path)
    if now != was:
        raise PrismError(f"{path}: changed since {stage} wrote it (sha256 {was[:12]} then, {now[:12]} now); delete it "
                         f"and re-run the {stage} command to make it again, or re-run it with --force to redo the "
                         f"{'set' if stage == 'recover' else 'labels'}")


def sealed_in(folder, stage: str) -> dict[str, str]:
    """``{name: sha256}`` a finished ``stage`` folder's manifest sealed (none: no manifest, another stage, older)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    m = read_json(path)
    return dict((m.get("outputs") or {}).get(SEALED_FILES) or {}) if m.get("stage") == stage else {}


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
    if sealed is not None and sealed != _set_digest(entries):
        raise PrismError(f"{folder / MANIFEST}: its image list was edited since recover wrote it; re-run the recover "
                         f"command with --force to redo the set")
    if sealed is None and m.get("stage") == "recover":
        say_once(folder, f"[data] {folder}: made by an older prismdd, its images carry no digests: a change to them "
                         f"cannot be noticed (recover --force records them)")
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
        out = {"values": v.to(dtype).contiguous(), "indices": i.to(idx_dtype).contiguous(),
               "tail": tail.to(dtype).contiguous()}
    else:
        out = {"logits": logits.to(dtype).contiguous()}
    for k, t in out.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PrismError(f"soft labels: {k} is not finite after conversion to {storage} (logits up to "
                             f"{float(logits.abs().max()):.3g}); use --storage fp32")
    return out


def unpack_logits(d: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    if "logits" in d:
        return d["logits"].float()
    v, i = d["values"].float(), d["indices"].long()
    # classes outside the top-k get the stored mean of the left-out logits (files without it: the smallest
    # stored logit); an approximation whose accuracy cost the storage benchmark measures
    fill = d["tail"].float() if "tail" in d else v.min(dim=1, keepdim=True).values
    out = fill.expand(-1, num_classes).clone()
    return out.scatter_(1, i, v)


def consumed_digests(data=None, labels: "StoredLabels | None" = None, teachers_dir=None,
                     teacher_names=()) -> dict[str, str]:
    """What a student depends on beyond its config: the distilled pixels, the stored labels (their config
    hash and recorded inputs), the online label teachers' weights."""
    out = {}
    if isinstance(data, DistilledSet):
        out["distilled images"] = images_digest(data.images, data.targets)
    if labels is not None:
        m = labels.manifest
        blob = json.dumps([m.get("config_hash"), (m.get("inputs") or {}).get("digests")], sort_keys=True)
        out["labels"] = hashlib.sha256(blob.encode()).hexdigest()
    if teachers_dir and teacher_names:
        found = find_teachers(teachers_dir)
        out.update(teacher_digests({a: found[a] for a in teacher_names}))
    return out


def epoch_file(folder, epoch: int) -> Path:
    return Path(folder) / f"epoch_{epoch:04d}.safetensors"


def label_bytes(d: dict[str, torch.Tensor]) -> int:
    """Bytes of the label tensors alone (view parameters excluded), for the storage comparison."""
    return sum(t.numel() * t.element_size() for k, t in d.items() if k in LABEL_KEYS)


class StoredLabels:
    """Reads a relabel folder epoch by epoch: the stored plan and the dense logits."""

    def __init__(self, folder, num_classes: int):
        self.folder = Path(folder)
        m = self.manifest = read_manifest(self.folder, "relabel", option="--labels")
        self.views = m["views"]
        self.epochs = m["outputs"]["epochs"]
        self.num_classes = num_classes

    def check_source(self, now: str | None, distilled) -> None:
        """Refuse labels made for other pixels than those of digest ``now`` (another distilled set, or its images
        before a ``recover --force`` rewrote them): relabel records the digest of the pixels it labelled."""
        recorded = (self.manifest.get("inputs") or {}).get("distilled_digest")
        if recorded is None or now is None:
            return  # labels of an older prismdd (no digest), or a source that is not a distilled set
        if now != recorded:
            raise PrismError(f"--labels {self.folder}: made for other images than --distilled {distilled} holds "
                             f"(sha256 {recorded[:12]} then, {now[:12]} now: another set, or recover re-ran); "
                             f"relabel it: prismdd relabel --distilled {distilled} --out {self.folder} --force")

    def epoch(self, e: int) -> tuple[EpochPlan, torch.Tensor]:
        if e >= self.epochs:
            raise PrismError(f"--labels {self.folder}: holds {self.epochs} epochs, validation asks for epoch {e + 1}; "
                             f"relabel with --epochs >= the student's epochs")
        path = epoch_file(self.folder, e)
        # sealed by relabel's manifest: a label file changed since (other logits, same header) is refused
        check_sealed_file(self.folder, path.name, ((self.manifest.get("outputs") or {}).get(SEALED_FILES) or {}).get(
            path.name), stage="relabel")
        d = load_tensors(path)
        return EpochPlan.from_tensors(d, self.views["batch_size"]), unpack_logits(d, self.num_classes)


# ----------------------------------------------------------------------------- learned labels (FRePo)
LEARNED_LABELS = "learned_labels.safetensors"  # in a recover folder: one label vector per image, learned with it


def centred_onehot(y: torch.Tensor, num_classes: int, scaled: bool = False) -> torch.Tensor:
    """FRePo's label vectors: one-hot minus 1/C (1 - 1/C on the class, -1/C elsewhere); ``scaled``: divided by
    sqrt(C / 10), the reference's learned-label start (frepo.py:75-79; 1 for 10 classes). Also the regression
    target of ``validate --loss mse`` for images without learned labels."""
    out = torch.nn.functional.one_hot(y.long(), num_classes).float() - 1.0 / num_classes
    return out / (num_classes / 10) ** 0.5 if scaled else out


def has_learned_labels(folder) -> bool:
    """Whether a finished folder holds learned labels. A FRePo set whose labels file was deleted is refused: read
    as a set without them, its images were trained on one-hot labels and reported as the FRePo result."""
    folder = Path(folder)
    path = folder / LEARNED_LABELS
    if not (folder / MANIFEST).exists():
        return False
    m = read_json(folder / MANIFEST)
    made = m.get("stage") == "recover" and (LEARNED_LABELS in ((m.get("outputs") or {}).get(SEALED_FILES) or {})
                                            or (m.get("config") or {}).get("plugin") == "frepo")
    if made and not path.exists():
        raise PrismError(f"{path}: missing: {folder} is a FRePo set and its learned labels were deleted; re-run the "
                         f"recover command that made it (it makes them again), or re-run it with --force")
    return path.exists()


def read_learned_labels(folder, ds: DistilledSet) -> torch.Tensor:
    """The (N, C) learned labels of a recover folder, in ``ds``'s image order (class, then IPC index), checked
    against the digest its manifest sealed and against the images it holds."""
    path = Path(folder) / LEARNED_LABELS
    if not path.exists():
        raise PrismError(f"{path}: missing; re-run the recover command that made {folder} to make it again")
    sealed = (read_manifest(folder).get("outputs") or {}).get(SEALED_FILES) or {}
    check_sealed_file(folder, LEARNED_LABELS, sealed.get(LEARNED_LABELS))
    d = load_tensors(path)
    labels, cls, k = d["labels"].float(), d["class"].long(), d["ipc_index"].long()
    order = sorted(range(len(cls)), key=lambda i: (int(cls[i]), int(k[i])))
    labels, cls = labels[order], cls[order]
    if len(cls) != len(ds) or not torch.equal(cls, ds.targets.long()) or labels.shape[1] != ds.info.num_classes:
        raise PrismError(f"{path}: labels for {len(cls)} images do not match the {len(ds)} images of {folder}; "
                         f"re-run recover with --force")
    if not torch.isfinite(labels).all():
        raise PrismError(f"{path}: the learned labels are not finite; re-run recover with --force")
    return labels
