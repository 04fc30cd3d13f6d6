"""Manifests and provenance: ``config.yaml`` + ``manifest.json`` of every output folder, the one resume guard
(``reusable``), digests of what work was made from (``guard_inputs``, ``file_digest``), headers of reusable tensor
files (``settings_header``) and the seals of the files a method writes (``seal_files``)."""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torchvision

from ..core.config import config_hash, config_to_dict, save_config
from ..core.errors import PrismError
from ..core.io import load_tensors, read_json, tensors_metadata, torch_load, write_json


MANIFEST = "manifest.json"
CARD = "card.json"
WEIGHTS = "model.safetensors"
ACCURACY_FILE = "accuracy.json"  # validate: the student's test accuracy (final epoch) and its protocol
INPUTS_FILE = "inputs.json"  # digests of what a folder's finished work was made from (``guard_inputs``)
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


SEALED_FILES = "files"  # a recover manifest's outputs: {file name: sha256} of the method's files (``seal_files``)


def seal_files(out, names) -> dict[str, str]:
    """``{name: sha256}`` of the files a method wrote beside the images (FRePo's ``learned_labels.safetensors`` and
    ``frepo_state.safetensors``): without a digest, labels shifted by one class trained a student to chance with
    exit status 0."""
    return {n: file_digest(Path(out) / n) for n in names if (Path(out) / n).exists()}


def check_sealed_file(folder, name: str, was: str | None, stage: str = "recover") -> None:
    """Refuse a sealed file of a ``stage`` folder (recover, relabel, score) whose bytes are not those its manifest
    recorded (``was``), or that its manifest does not seal (``was`` None)."""
    path = Path(folder) / name
    if was is None:
        raise PrismError(f"{path}: {folder}'s manifest records no digest of it, so a change to it cannot be noticed; "
                         f"re-run the {stage} command with --force")
    now = file_digest(path)
    if now != was:
        raise PrismError(f"{path}: changed since {stage} wrote it (sha256 {was[:12]} then, {now[:12]} now); delete it "
                         f"and re-run the {stage} command to make it again, or re-run it with --force to redo the "
                         f"{'set' if stage == 'recover' else 'labels'}")


def sealed_in(folder, stage: str) -> dict[str, str]:
    """``{name: sha256}`` a finished ``stage`` folder's manifest sealed (none: no manifest yet, or another stage)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    m = read_json(path)
    return dict((m.get("outputs") or {}).get(SEALED_FILES) or {}) if m.get("stage") == stage else {}
