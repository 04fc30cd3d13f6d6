"""Per-example scores of a training split: what the selection methods (herding, k-center, forgetting, EL2N, CCS,
BPS) choose real images by. One writer (the ``score`` stage), one reader (``load_scores``).

A score folder holds ``scores.safetensors`` and the stage's ``manifest.json`` (which seals the file's sha256 and
records the dataset, the models, the seeds and the settings). Its tensors, every per-example axis in training-set
order (index i is ``train.targets[i]``):

- ``targets``   int64   (N,)       the class of each example (checked against the split the reader loads)
- ``embedding`` float32 (N, D)     kind ``embedding``: a model's penultimate features of the un-augmented image
- ``entropy``   float32 (N,)       kind ``entropy``: predictive entropy (nats) of that model's softmax on the
                                   un-augmented image
- ``correct``   uint8   (R, E, N)  kind ``dynamics``: 1 where run r's prediction on example i, in its training pass
                                   of epoch e, was the label (forgetting events are read off this)
- ``margin``    float32 (R, E, N)  kind ``dynamics``: that pass's assigned logit minus the largest other logit (AUM
                                   is its mean over epochs)
- ``el2n``      float32 (R, N)     kind ``dynamics``: ||softmax - onehot||_2 of run r's model after its EL2N epoch,
                                   on the un-augmented image

The header (safetensors metadata) holds ``format``, ``kinds`` (comma list) and, from the score stage, ``settings``
(JSON: per kind, what made it), so a re-run that adds a kind checks the kinds it keeps against the file itself, even
when it was killed before the manifest was written; the manifest records the rest (seeds, versions, the seal).
Computed once per (dataset, model, seed), reused by every method and IPC.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import json

import torch

from ..core.errors import PrismError
from ..core.io import load_tensors, save_tensors, tensors_metadata
from .manifest import MANIFEST, check_sealed_file, read_manifest, sealed_in

SCORES_FILE = "scores.safetensors"
SCORES_FORMAT = "prismdd-scores-1"
# kind -> the tensors it brings (besides ``targets``, always present)
SCORE_KINDS: dict[str, tuple[str, ...]] = {
    "embedding": ("embedding",),
    "entropy": ("entropy",),
    "dynamics": ("correct", "margin", "el2n"),
}


@dataclass
class Scores:
    """A score folder's tensors (None where its kind was not computed) and its manifest."""

    folder: Path
    targets: torch.Tensor
    embedding: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    el2n: torch.Tensor | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return [k for k, names in SCORE_KINDS.items() if all(getattr(self, n) is not None for n in names)]


def check_kinds(kinds: Iterable[str], option: str = "--kinds") -> list[str]:
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in SCORE_KINDS]
    if unknown:
        raise PrismError(f"{option}: unknown score kind {', '.join(unknown)}; expected some of "
                         f"{', '.join(SCORE_KINDS)}")
    return kinds


def _check_shapes(t: dict[str, torch.Tensor], where) -> None:
    n = t["targets"].shape[0]
    for name, v in t.items():
        if name in ("targets", "entropy") and v.shape != (n,):
            raise PrismError(f"{where}: {name} has shape {tuple(v.shape)}, expected ({n},)")
        if name == "embedding" and (v.ndim != 2 or v.shape[0] != n):
            raise PrismError(f"{where}: embedding has shape {tuple(v.shape)}, expected ({n}, D)")
        if name in ("correct", "margin") and (v.ndim != 3 or v.shape[2] != n):
            raise PrismError(f"{where}: {name} has shape {tuple(v.shape)}, expected (runs, epochs, {n})")
        if name == "el2n" and (v.ndim != 2 or v.shape[1] != n):
            raise PrismError(f"{where}: el2n has shape {tuple(v.shape)}, expected (runs, {n})")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise PrismError(f"{where}: {name} holds NaN or inf values; re-run `prismdd score` with --force")


def save_scores(folder, tensors: dict[str, torch.Tensor], settings: dict[str, dict] | None = None) -> Path:
    """Write ``scores.safetensors`` (atomically) from ``targets`` plus the tensors of whole kinds; returns its path.
    ``settings``: ``{kind: what made it}`` (JSON-able), kept in the header (``score_settings`` reads it back)."""
    if "targets" not in tensors:
        raise ValueError("save_scores: targets are required")
    kinds = [k for k, names in SCORE_KINDS.items() if all(n in tensors for n in names)]
    known = {"targets", *(n for k in kinds for n in SCORE_KINDS[k])}
    stray = sorted(set(tensors) - known)
    if stray:
        raise ValueError(f"save_scores: {', '.join(stray)} belong to no complete kind")
    path = Path(folder) / SCORES_FILE
    _check_shapes(tensors, path)
    dtypes = {"targets": torch.int64, "correct": torch.uint8}
    tensors = {k: v.to(dtypes.get(k, torch.float32)) for k, v in tensors.items()}
    meta = {"format": SCORES_FORMAT, "kinds": ",".join(kinds)}
    if settings is not None:
        meta["settings"] = json.dumps({k: settings[k] for k in kinds if k in settings}, sort_keys=True)
    save_tensors(tensors, path, metadata=meta)
    return path


def score_settings(folder) -> dict[str, dict]:
    """``{kind: settings}`` the header of ``folder``'s score file records (empty: none recorded, or no file)."""
    path = Path(folder) / SCORES_FILE
    if not path.exists():
        return {}
    text = tensors_metadata(path).get("settings")
    try:
        return json.loads(text) if text else {}
    except ValueError:
        raise PrismError(f"{path}: its header's settings are not JSON; re-run `prismdd score` with --force") from None


def load_scores(folder, need: Iterable[str] = (), *, targets: torch.Tensor | None = None,
                option: str = "--scores") -> Scores:
    """The scores in ``folder``; refused in one line (naming ``option`` and the fix) when the folder is not a
    finished score stage, its file changed since it was written, a ``need``-ed kind is missing, or its targets are
    not those of the split the caller loaded (``targets``: the scores were made on another dataset or subset)."""
    folder = Path(folder)
    need = check_kinds(need)
    path = folder / SCORES_FILE
    fix = f"make it with `prismdd score --kinds {','.join(need) or 'embedding'} --out {folder}`"
    if not (folder / MANIFEST).exists() or not path.exists():
        raise PrismError(f"{option} {folder}: no finished score folder ({SCORES_FILE} and {MANIFEST}); {fix}")
    manifest = read_manifest(folder, "score", option)
    check_sealed_file(folder, SCORES_FILE, sealed_in(folder, "score").get(SCORES_FILE), stage="score")
    meta = tensors_metadata(path)
    if meta.get("format") != SCORES_FORMAT:
        raise PrismError(f"{path}: format {meta.get('format')!r}, expected {SCORES_FORMAT!r}; {fix} --force")
    have = [k for k in meta.get("kinds", "").split(",") if k]
    missing = [k for k in need if k not in have]
    if missing:
        raise PrismError(f"{option} {folder}: holds {', '.join(have) or 'no'} scores, this needs "
                         f"{', '.join(missing)}; add them with `prismdd score --kinds {','.join(have + missing)} "
                         f"--out {folder}` (what is there is kept)")
    t = load_tensors(path)
    _check_shapes(t, path)
    if targets is not None and not torch.equal(t["targets"], targets.to(torch.int64).cpu()):
        raise PrismError(f"{option} {folder}: its {len(t['targets'])} labels are not those of this training split "
                         f"({len(targets)} images); the scores were made on other data: {fix} for this dataset")
    return Scores(folder=folder, manifest=manifest, **t)
