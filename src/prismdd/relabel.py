"""relabel: FKD-style soft labels on replayable views, stored one file per epoch (or computed online).

For epoch e, ``epoch_plan`` draws from (seed, e) an image order, one RandomResizedCrop+flip view per
image and one CutMix/Mixup per batch. The teacher logits on exactly those views are stored together with
the view parameters, so the student (``validate``) replays identical inputs. Nothing is pickled and
PyTorch is not patched: a plain safetensors file per epoch and our own batch iterator.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .augment import CutMix, Views, apply_views, sample_cutmix, sample_views
from .config import CommonConfig, comma_list
from .data import DatasetInfo, normalize
from .squeeze import find_teachers, load_teacher
from .utils import PrismError, Timer, atomic_path, make_generator, progress, read_json, resolve_device, write_manifest

ENSEMBLES = ("mean", "norm-matched", "weighted")


@dataclass
class ViewConfig:
    """What defines the views; shared by relabel and validate so both see the same inputs."""

    batch_size: int
    min_scale: float = 0.25  # seed Table 3: 0.25 was best on ImageNet-1K IPC 10
    mix: str = "cutmix"  # cutmix | mixup | none
    flip: bool = True


@dataclass
class EpochPlan:
    order: torch.Tensor  # (N,) image index at each position
    views: Views  # per position
    mixes: list  # per batch: CutMix, a Mixup tuple (perm, lam), or None

    def batches(self, batch_size: int):
        for b, s in enumerate(range(0, len(self.order), batch_size)):
            sl = slice(s, s + batch_size)
            yield b, sl, self.order[sl], Views(self.views.boxes[sl], self.views.flips[sl]), self.mixes[b]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        d = {"order": self.order, **self.views.to_dict()}
        if self.mixes and self.mixes[0] is not None:
            nb, bs = len(self.mixes), max(len(m.perm if isinstance(m, CutMix) else m[0]) for m in self.mixes)
            perm = torch.full((nb, bs), -1, dtype=torch.long)
            lam = torch.zeros(nb, dtype=torch.float64)  # float32 would round lambda: replay must be exact
            box = torch.zeros(nb, 4, dtype=torch.long)
            for i, m in enumerate(self.mixes):
                p = m.perm if isinstance(m, CutMix) else m[0]
                perm[i, : len(p)] = p
                lam[i] = m.lam if isinstance(m, CutMix) else m[1]
                if isinstance(m, CutMix):
                    box[i] = m.box
            d.update(mix_perm=perm, mix_lam=lam, mix_box=box, mix_kind=torch.tensor([isinstance(self.mixes[0], CutMix)]))
        return d

    @classmethod
    def from_tensors(cls, d: dict, batch_size: int) -> "EpochPlan":
        order = d["order"].long()
        views = Views.from_dict(d)
        nb = (len(order) + batch_size - 1) // batch_size
        mixes: list = [None] * nb
        if "mix_perm" in d:
            cut = bool(d["mix_kind"][0])
            for i in range(nb):
                p = d["mix_perm"][i]
                p = p[p >= 0].long()
                lam = float(d["mix_lam"][i])
                mixes[i] = CutMix(p, d["mix_box"][i].long(), lam) if cut else (p, lam)
        return cls(order, views, mixes)


def epoch_plan(n: int, epoch: int, seed: int, vc: ViewConfig, resolution: int) -> EpochPlan:
    gen = make_generator(seed, "views", epoch)
    order = torch.randperm(n, generator=gen)
    views = sample_views(n, gen, (vc.min_scale, 1.0), flip=vc.flip)
    mixes = []
    for s in range(0, n, vc.batch_size):
        m = min(vc.batch_size, n - s)
        if vc.mix == "cutmix":
            mixes.append(sample_cutmix(m, resolution, gen))
        elif vc.mix == "mixup":
            mixes.append((torch.randperm(m, generator=gen), float(torch.rand(1, generator=gen))))
        elif vc.mix == "none":
            mixes.append(None)
        else:
            raise PrismError(f"mix {vc.mix!r}: expected cutmix, mixup or none")
    return EpochPlan(order, views, mixes)


def make_inputs(images_uint8: torch.Tensor, info: DatasetInfo, views: Views, mix, device) -> torch.Tensor:
    """The exact (normalised, augmented, mixed) batch a student and its teachers see."""
    x = apply_views(normalize(images_uint8.to(device), info), views)
    if isinstance(mix, CutMix):
        x = mix.apply(x)
    elif mix is not None:
        perm, lam = mix
        x = lam * x + (1 - lam) * x[perm.to(device)]
    return x


def combine_logits(logits: list[torch.Tensor], how: str, primary_weight: float = 0.5) -> torch.Tensor:
    """Ensemble of teacher logits (B, K) each. norm-matched: every teacher rescaled to the mean per-sample
    L2 norm before averaging (the reference), so no teacher dominates by scale."""
    if len(logits) == 1:
        return logits[0]
    stack = torch.stack(logits)  # (T, B, K)
    if how == "mean":
        return stack.mean(0)
    if how == "norm-matched":
        norms = stack.norm(dim=2, keepdim=True).clamp_min(1e-12)  # (T, B, 1)
        return (stack / norms * norms.mean(0, keepdim=True)).mean(0)
    if how == "weighted":
        rest = (1 - primary_weight) / (len(logits) - 1)
        w = torch.tensor([primary_weight] + [rest] * (len(logits) - 1), device=stack.device).view(-1, 1, 1)
        return (stack * w).sum(0)
    raise PrismError(f"ensemble {how!r}: expected one of {', '.join(ENSEMBLES)}")


class SoftLabeler:
    """Teacher (ensemble) logits on given inputs; the same object serves relabel and online validation."""

    def __init__(self, teachers: list[nn.Module], names: list[str], ensemble: str = "mean", primary_weight: float = 0.5):
        self.teachers, self.names, self.ensemble, self.primary_weight = teachers, names, ensemble, primary_weight

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits([t(x).float() for t in self.teachers], self.ensemble, self.primary_weight)


def load_labelers(teachers_dir: str, archs: str | None, default_arch: str | None, info: DatasetInfo,
                  ensemble: str, primary_weight: float, device) -> SoftLabeler:
    found = find_teachers(teachers_dir)
    names = comma_list(archs) or [default_arch if default_arch in found else next(iter(found))]
    missing = [a for a in names if a not in found]
    if missing:
        raise PrismError(f"--label-teachers: no teacher {', '.join(missing)} in {teachers_dir} (found: {', '.join(found)})")
    models = [load_teacher(found[a], arch=a, dataset=info.name, class_names=info.class_names, device=device)[0]
              for a in names]
    return SoftLabeler(models, names, ensemble, primary_weight)


# ----------------------------------------------------------------------------- storage
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


@dataclass
class RelabelConfig(CommonConfig):
    out: str = "runs/prism/labels"
    distilled: str = "runs/prism"  # a recover output folder
    teachers: str = "runs/teachers"  # a squeeze output folder
    label_teachers: str | None = None  # comma list of teacher archs; default: the recover run's primary
    ensemble: str = "mean"  # mean | norm-matched (reference) | weighted
    primary_weight: float = 0.5  # weighted: share of the first teacher
    epochs: int = 300  # one view (and one label file) per epoch of student training
    batch_size: int | None = None  # None: 50 at IPC <= 10, else 100 (seed Table 1); validate must use the same
    min_scale: float = 0.25  # RandomResizedCrop floor of the views (seed Table 3)
    mix: str = "cutmix"  # cutmix | mixup | none
    storage: str = "fp16"  # fp16 | fp32 (fp32: online validation is bit-identical)
    topk: int = 0  # keep only the top-k logits per view (0 = all)
    force: bool = False

    def validate(self):
        if self.ensemble not in ENSEMBLES:
            raise PrismError(f"--ensemble {self.ensemble!r}: expected one of {', '.join(ENSEMBLES)}")
        if self.storage not in ("fp16", "fp32"):
            raise PrismError(f"--storage {self.storage!r}: expected fp16 or fp32")


def default_batch_size(n_images: int, num_classes: int) -> int:
    ipc = n_images / max(1, num_classes)
    return min(n_images, 50 if ipc <= 10 else 100)


def relabel(cfg: RelabelConfig) -> Path:
    from .recover import load_distilled

    timer = Timer()
    device = resolve_device(cfg.device)
    ds = load_distilled(cfg.distilled)
    info = ds.info
    primary = ds.manifest["config"].get("primary")
    labeler = load_labelers(cfg.teachers, cfg.label_teachers, primary, info, cfg.ensemble, cfg.primary_weight, device)
    bs = cfg.batch_size or default_batch_size(len(ds), info.num_classes)
    vc = ViewConfig(bs, cfg.min_scale, cfg.mix)
    out = Path(cfg.out)
    total_bytes = file_bytes = 0
    for epoch in progress(range(cfg.epochs), desc="relabel"):
        path = epoch_file(out, epoch)
        if path.exists() and not cfg.force:
            total_bytes += label_bytes(load_file(str(path)))
            file_bytes += path.stat().st_size
            continue
        plan = epoch_plan(len(ds), epoch, cfg.seed, vc, info.resolution)
        chunks = []
        for _, _, idx, views, mix in plan.batches(bs):
            chunks.append(labeler(make_inputs(ds.images[idx], info, views, mix, device)).cpu())
        tensors = {**pack_logits(torch.cat(chunks), cfg.storage, cfg.topk), **plan.to_tensors()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        total_bytes += label_bytes(tensors)
        file_bytes += path.stat().st_size
    n_ie = len(ds) * cfg.epochs
    write_manifest(out, "relabel", cfg, inputs={"distilled": str(cfg.distilled), "dataset": info.to_dict(),
                                                "label_teachers": labeler.names},
                   outputs={"epochs": cfg.epochs, "images": len(ds), "batch_size": bs, "label_bytes": total_bytes,
                            "bytes_per_image_epoch": round(total_bytes / max(1, n_ie), 2),
                            "file_bytes": file_bytes,  # labels + the stored view parameters + headers
                            "file_bytes_per_image_epoch": round(file_bytes / max(1, n_ie), 2)},
                   wall_time=timer.elapsed, extra={"views": {"batch_size": bs, "min_scale": cfg.min_scale,
                                                             "mix": cfg.mix, "seed": cfg.seed}})
    print(f"[relabel] {cfg.epochs} epochs x {len(ds)} images, {total_bytes / 1e6:.2f} MB "
          f"({total_bytes / max(1, n_ie):.1f} B per image-epoch) -> {out}")
    return out


LABEL_KEYS = ("logits", "values", "indices", "tail")  # what pack_logits writes; the rest of a file is its views


def label_bytes(d: dict[str, torch.Tensor]) -> int:
    """Bytes of the label tensors alone (view parameters excluded), for the storage comparison."""
    return sum(t.numel() * t.element_size() for k, t in d.items() if k in LABEL_KEYS)


class StoredLabels:
    """Reads a relabel folder epoch by epoch: the stored plan and the dense logits."""

    def __init__(self, folder, num_classes: int):
        self.folder = Path(folder)
        m = read_json(self.folder / "manifest.json") if (self.folder / "manifest.json").exists() else None
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
        d = load_file(str(epoch_file(self.folder, e)))
        return EpochPlan.from_tensors(d, self.views["batch_size"]), unpack_logits(d, self.num_classes)
