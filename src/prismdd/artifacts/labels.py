"""Stored soft labels: ``epoch_NNNN.safetensors`` of a relabel folder (``pack_logits``/``StoredLabels``), their
finite check, and the digests a student's labels depend on (``consumed_digests``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..core.augment import EpochPlan
from ..core.errors import PrismError
from ..core.io import load_tensors
from .cards import find_teachers
from .distilled import DistilledSet
from .manifest import SEALED_FILES, check_sealed_file, images_digest, read_manifest, teacher_digests


def check_finite_labels(logits: torch.Tensor, teachers: list[str], where) -> None:
    """Soft labels are checked before they are stored: a NaN teacher must not become a silent label file."""
    bad = ~torch.isfinite(logits)
    if bad.any():
        rows = int(bad.any(dim=1).sum())
        raise PrismError(f"{where}: teacher {', '.join(teachers)} gave NaN/inf logits on {rows} of {len(logits)} "
                         f"views; check that teacher (retrain it with `prismdd squeeze --force`) or pick "
                         f"another with --label-teachers")


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
        if now is None:
            return  # a source that is not a distilled set
        if recorded is None:
            raise PrismError(f"--labels {self.folder}: its manifest records no distilled_digest, so labels made for "
                             f"other images cannot be told apart; relabel it: prismdd relabel --distilled {distilled} "
                             f"--out {self.folder} --force")
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
