"""relabel: FKD-style soft labels on replayable views, stored one file per epoch (or computed online).

For epoch e, ``epoch_plan`` draws from (seed, e) an image order, one RandomResizedCrop+flip view per
image and one CutMix/Mixup per batch. The teacher logits on exactly those views are stored together with
the view parameters, so the student (``validate``) replays identical inputs. Nothing is pickled and
PyTorch is not patched: a plain safetensors file per epoch and our own batch iterator.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import (check_finite_labels, check_sealed_file, clear_outputs, epoch_file, file_digest, find_teachers,
                         images_digest, label_bytes, load_distilled, load_labelers, locked_stage, pack_logits, reusable,
                         sealed_in, teacher_digests, with_distilled_dataset, write_manifest)
from ..core.augment import ViewConfig, default_view_batch, epoch_plan, make_inputs, rand_augment_transform
from ..core.config import FROM_DISTILLED, CommonConfig, config_hash, opt
from ..core.presets import DEFAULT_PROTOCOL, PROTOCOLS
from ..core.io import load_tensors, save_tensors
from ..core.labels import LabelOptions
from ..core.runtime import Heartbeat, Timer, progress, resolve_device
from ..core.log import get_logger

logger = get_logger("relabel")


@dataclass
class RelabelConfig(LabelOptions, CommonConfig):
    # --protocol NAME takes the fields a validate protocol shares with relabel (views, batch, teachers, epochs)
    PRESET_FAMILY: ClassVar[str] = "validate"
    PRESET_FIELD: ClassVar[str] = "protocol"
    PRESET_PARTIAL: ClassVar[bool] = True

    protocol: str = opt(DEFAULT_PROTOCOL, "a validate protocol whose relabel-side settings (batch size/rule, crop "
                                          "floor, mix, patch shuffle, RandAugment, teachers, ensemble, epochs) become "
                                          "the defaults; fields you set win. Give the protocol validate will train "
                                          "with: the default is validate's, so `relabel` then `validate --labels` "
                                          "trains the student `validate --teachers` trains online",
                        choices=PROTOCOLS.names(), hashed=False)
    dataset: str | None = opt(None, f"a name from `prismdd datasets`; {FROM_DISTILLED}")
    out: str = opt("runs/prism/labels", "output folder: one label file per epoch", hashed=False)
    distilled: str = opt("runs/prism", "a recover output folder", path=True)
    teachers: str = opt("runs/teachers", "a squeeze output folder", path=True)
    storage: str = opt("fp16", "fp16 | fp32 (fp32: online validation is bit-identical)", choices=("fp16", "fp32"))
    topk: int = opt(0, "keep only the top-k logits per view (0 = all)", minimum=0)
    force: bool = opt(False, "recompute label files that exist", hashed=False)


@locked_stage("relabel")
def relabel(cfg: RelabelConfig) -> Path:
    timer = Timer()
    device = resolve_device(cfg.device)
    ds = load_distilled(cfg.distilled)
    info = ds.info
    cfg = with_distilled_dataset(cfg, ds.manifest, cfg.distilled)
    # what an epoch's labels depend on: every setting but the epoch count (more epochs extend a folder),
    # and the distilled set's content (its config hash), not its path
    chash = config_hash(cfg, epochs=None, distilled=ds.manifest.get("config_hash"))
    primary = ds.manifest["config"].get("primary")
    labeler = load_labelers(cfg.teachers, cfg.label_teachers, primary, info, cfg.ensemble, cfg.primary_weight, device,
                            pool=ds.manifest.get("inputs", {}).get("bn_pool"))
    found = find_teachers(cfg.teachers)  # provenance: the pixels labelled and the teachers' weights
    inputs = {"distilled images": images_digest(ds.images, ds.targets),
              **teacher_digests({a: found[a] for a in labeler.names})}
    bs = cfg.batch_size or default_view_batch(len(ds), info.num_classes, cfg.batch_rule)
    vc = ViewConfig(bs, cfg.min_scale, cfg.mix, patch_shuffle=cfg.patch_shuffle, rand_augment=cfg.rand_augment)
    if cfg.rand_augment:
        rand_augment_transform(cfg.rand_augment)  # timm missing or a bad string: refused before any work
    out = Path(cfg.out)
    if cfg.force:  # nothing of the replaced labels survives (e.g. epochs beyond the new --epochs); cleared only
        # now that the set, the teachers and every option have been checked, so a failed call keeps the old labels
        clear_outputs(out, "epoch_*.safetensors")
    sealed = {} if cfg.force else sealed_in(out, "relabel")  # label files the finished folder sealed
    total_bytes = file_bytes = 0
    beat = Heartbeat("relabel", cfg.epochs, unit="epoch")  # a line a minute without a terminal (where the bar is silent)
    for epoch in progress(range(cfg.epochs), desc="relabel"):
        path = epoch_file(out, epoch)
        if reusable(path, chash, force=cfg.force, what="a label file", inputs=inputs) is not None:
            if path.name in sealed:  # reused from a finished folder: must be as written (an unfinished one seals none)
                check_sealed_file(out, path.name, sealed[path.name], stage="relabel")
            total_bytes += label_bytes(load_tensors(path))
            file_bytes += path.stat().st_size
            beat.first += 1  # found, not made: the time left is estimated from the epochs labelled here
            beat.step()
            continue
        plan = epoch_plan(len(ds), epoch, cfg.seed, vc, info.resolution)
        chunks = []
        for _, _, idx, views, mix in plan.batches(bs):
            chunks.append(labeler(make_inputs(ds.images[idx], info, views, mix, device, cfg.rand_augment,
                                               cfg.num_workers)).cpu())
        logits = torch.cat(chunks)
        check_finite_labels(logits, labeler.suspects, f"relabel epoch {epoch}")  # a NaN teacher stores nothing
        tensors = {**pack_logits(logits, cfg.storage, cfg.topk), **plan.to_tensors()}
        save_tensors(tensors, path, metadata={"config_hash": chash, "inputs": json.dumps(inputs)})
        total_bytes += label_bytes(tensors)
        file_bytes += path.stat().st_size
        beat.step()
    n_ie = len(ds) * cfg.epochs
    write_manifest(out, "relabel", cfg, inputs={"distilled": str(cfg.distilled), "dataset": info.to_dict(),
                                                "label_teachers": labeler.names,
                                                "distilled_config_hash": ds.manifest.get("config_hash"),
                                                "distilled_digest": inputs["distilled images"], "digests": inputs},
                   outputs={"epochs": cfg.epochs, "images": len(ds), "batch_size": bs, "label_bytes": total_bytes,
                            "bytes_per_image_epoch": round(total_bytes / max(1, n_ie), 2),
                            # every label file sealed: its readers refuse one changed since (``StoredLabels``)
                            "files": {epoch_file(out, e).name: file_digest(epoch_file(out, e))
                                      for e in range(cfg.epochs)},
                            "file_bytes": file_bytes,  # labels + the stored view parameters + headers
                            "file_bytes_per_image_epoch": round(file_bytes / max(1, n_ie), 2)},
                   wall_time=timer.elapsed, extra={"views": {"batch_size": bs, "min_scale": cfg.min_scale,
                                                             "mix": cfg.mix, "seed": cfg.seed,
                                                             # only when on: manifests of other runs unchanged
                                                             **({"patch_shuffle": cfg.patch_shuffle}
                                                                if cfg.patch_shuffle > 1 else {}),
                                                             **({"rand_augment": cfg.rand_augment}
                                                                if cfg.rand_augment else {})}})
    logger.info(f"[relabel] {cfg.epochs} epochs x {len(ds)} images, {total_bytes / 1e6:.2f} MB "
                f"({total_bytes / max(1, n_ie):.1f} B per image-epoch) -> {out}")
    return out
