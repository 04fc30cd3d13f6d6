"""validate: train a fresh student on distilled images (+ soft labels) and test it on real data.

Size: about 560 lines: the options of every student protocol (``ValidateConfig``), the data sources, the student
loss, the loop of one student and the stage with its baselines and DD-Ranking scores. The training loop is
``core.training.fit`` and the label options ``core.labels``; what stays is one stage's logic, kept together so a
protocol's rules read in one place.

The FINAL epoch's accuracy is the result; the best epoch is reported separately and marked as such.
Soft labels come from a relabel folder (``--labels``, replaying its stored views) or are computed online
from teachers (``--teachers``) on the very same views. Baselines: ``--random-real`` (a seeded random real
subset with the same IPC) and ``--full`` (the whole training set), under the same protocol.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import (ACCURACY_FILE, StoredLabels, centred_onehot, check_finite_labels, consumed_digests,
                         epoch_file, file_digest, guard_inputs, load_distilled, load_if_header, load_labelers,
                         locked_stage, read_manifest, reusable, save_model, settings_header, with_distilled_dataset,
                         write_manifest)
from ..core import distributed as dist
from ..core.augment import (ViewConfig, apply_mix, default_view_batch, epoch_plan, make_inputs,
                             mix_partners, rand_augment_transform)
from ..core.config import (DEFAULT_DATASET, FROM_DISTILLED, CommonConfig, build_config, comma_list, config_hash,
                           opt)
from ..core.data import DatasetInfo, TensorImages, check_class_coverage, load_splits, random_real_indices
from ..core.errors import PrismError
from ..core.io import JsonlLog, save_tensors, write_json
from ..core.labels import LabelOptions
from ..core.models import create_model
from ..core.presets import DEFAULT_PROTOCOL, PROTOCOLS
from ..core.regimes import regime_of
from ..core.runtime import Timer
from ..core.scores import missing_line, score_row
from ..core.training import (DECAY_EXEMPT, OPTIMIZERS, SCHEDULES, decay_groups, evaluate, fit, fixed_soft_labels,
                             fixed_soft_logits, half_sse, make_optimizer)
from ..core.log import get_logger, say_once
from ..methods import LabelSource, label_source, sources_text

logger = get_logger("validate")


@dataclass
class ValidateConfig(LabelOptions, CommonConfig):
    PRESET_FAMILY: ClassVar[str] = "validate"
    PRESET_FIELD: ClassVar[str] = "protocol"

    dataset: str | None = opt(None, f"a name from `prismdd datasets`; {FROM_DISTILLED}; else {DEFAULT_DATASET}")
    out: str = opt("runs/prism/eval", "output folder: accuracy.json and one folder per student", hashed=False)
    protocol: str = opt(DEFAULT_PROTOCOL, "a student-training preset; fields you set win", choices=PROTOCOLS.names())
    distilled: str | None = opt(None, "a recover output folder (its dataset, data root and resolution are used)",
                                path=True)
    labels: str | None = opt(None, "a relabel output folder (stored soft labels), or a recover folder with learned "
                                   "labels (FRePo: with --loss mse)", path=True)
    teachers: str | None = opt(None, "a squeeze folder: soft labels computed online (no storage)", path=True)
    random_real: bool = opt(False, "baseline: a seeded random real subset with --ipc images per class")
    full: bool = opt(False, "baseline: the whole real training set")
    ipc: int = opt(10, "images per class of --random-real", minimum=1)
    student: str = opt("convnet", "one architecture or a comma list")
    student_width: float = opt(1.0, "width multiplier of the student", minimum=0.01)
    seeds: str = opt("0", "comma list: one student per seed, reported as mean +- std")
    optimizer: str = opt("adamw", "adamw | sgd | adam", choices=OPTIMIZERS)
    nesterov: bool = opt(True, "sgd: Nesterov momentum (the hard-label regime's reference uses plain momentum)")
    lr: float = opt(0.001, "peak learning rate", minimum=0.0)
    weight_decay: float = opt(0.01, "weight decay", minimum=0.0)
    decay_exempt: str = opt("1d", "which parameters take no weight decay: 1d (every reference's get_parameters: "
                                  "biases and BatchNorm's scale/shift, i.e. all but conv/linear kernels) | none "
                                  "(every parameter decays)", choices=DECAY_EXEMPT)
    grad_accum: int = opt(1, "gradient accumulation: each batch runs as this many equal forward/backward passes "
                             "before one optimiser step, so train-mode BatchNorm sees batch/N images (PRISM's and "
                             "SRe2L's scripts: 2); the loss average is unchanged", minimum=1)
    schedule: str = opt("decayed_cosine", "decayed_cosine (PRISM's code: drop to 0.125 at 5/6, then linear to 0) | "
                                          "cosine | half_cosine (1 -> 0.5: RDED, DELT; EDC's "
                                          "intent) | half_linear (1 -> 0.5 straight: what EDC's code runs) | linear | "
                                          "warmup_cosine (FRePo)", choices=SCHEDULES)
    loss: str = opt("mse+ce", "mse+ce (PRISM) | kl | ce (hard labels) | mse (FRePo: regress label vectors, the "
                              "learned labels of --labels, else centred one-hot)", choices=("mse+ce", "kl", "ce", "mse"))
    gamma: float = opt(0.1, "mse+ce: weight of the hard-label CE", minimum=0.0)
    lr_every: str = opt("step", "epoch: the LR changes once per epoch (the reference code's LambdaLR) | step: "
                                "every step (a smoother curve)", choices=("step", "epoch"))
    mix_ce: str = opt("own", "mse+ce under CutMix/Mixup: own (PRISM's code: CE on each image's own, unmixed hard "
                             "label) | mixed (CE mixed by lambda with the partner's label)", choices=("own", "mixed"))
    temperature: float = opt(4.0, "kl: softmax temperature (also the temperature of --fixed-labels)", minimum=0.0)
    fixed_labels: bool = opt(False, "fixed soft labels (the soft regime, --protocol soft): the --teachers label each "
                                    "UN-augmented image once (softmax of logits / --temperature, stored as "
                                    "fixed_labels.safetensors beside the students) and every view keeps its image's "
                                    "label; needs --loss kl")
    kl_t2: bool = opt(True, "kl: multiply the KL by T^2 (Hinton); off = SRe2L's train_FKD.py (plain batchmean KL)")
    ema_eval: float = opt(0.0, "EDC: EMA decay of the student's parameters, updated every step; evaluation and the "
                               "saved student use the EMA parameters (live BN buffers); 0 = off",
                          minimum=0.0)
    augment: bool = opt(True, "off: every image whole, unflipped and unmixed each epoch (the no-augmentation student of "
                              "DD-Ranking's ARS); overrides --min-scale, --mix, --patch-shuffle, --rand-augment")
    scores: bool = opt(False, "DD-Ranking's LRS and ARS for --distilled (with --teachers): also trains the set with "
                              "hard labels (no augmentation) and without augmentation, and random real of the same IPC "
                              "with and without, in <out>/scores/; LRS also needs --full-top1", hashed=False)
    full_top1: float | None = opt(None, "LRS's full-data hard-label top-1 (%), a stated reference such as prismdd "
                                        "run's full row; without it LRS says it is missing", minimum=0.0, hashed=False)
    bn_double_update: bool = opt(False, "RDED/DELT's code: before each step the student also forwards the unmixed "
                                        "views in train mode without gradient (for its training accuracy), so "
                                        "BatchNorm's running statistics move twice per step")
    steps_per_epoch: int | None = opt(None, "cap on steps per epoch (None: every image once; for --full)", minimum=1)
    warmup: float = opt(0.0, "fraction of training with a linear LR warm-up (FRePo: 500 steps)", minimum=0.0)
    eval_every: int = opt(50, "epochs between test evaluations (the final epoch is always evaluated)", minimum=1,
                          hashed=False)
    force: bool = opt(False, "retrain students that are already finished", hashed=False)

    def check(self):
        sources = sum(bool(x) for x in (self.distilled, self.random_real, self.full))
        if sources != 1:
            raise PrismError("validate: give exactly one of --distilled DIR, --random-real, --full")
        if self.loss not in ("ce", "mse") and not (self.labels or self.teachers):
            raise PrismError(f"--loss {self.loss} needs soft labels: pass --labels DIR (from relabel) or "
                             f"--teachers DIR (online), or use --loss ce")
        try:
            [int(s) for s in comma_list(self.seeds)]
        except ValueError:
            raise PrismError(f"--seeds {self.seeds!r}: expected a comma list of integers, e.g. 0,1,2") from None
        if not comma_list(self.seeds):
            raise PrismError("--seeds: give at least one seed")
        if self.batch_size is not None:
            check_grad_accum(self.grad_accum, self.batch_size, "--batch-size")
        if self.full_top1 is not None and self.full_top1 <= 1:
            raise PrismError(f"--full-top1 {self.full_top1}: a top-1 in percent is expected, and this reads as "
                             f"{self.full_top1} %; a fraction such as 0.9 is 90 %: multiply it by 100 "
                             f"(--full-top1 {round(self.full_top1 * 100, 4):g})")
        if self.full_top1 is not None and self.full_top1 > 100:
            raise PrismError(f"--full-top1 {self.full_top1}: a top-1 in percent, at most 100")
        if self.scores and not (self.distilled and self.teachers and not self.labels):
            raise PrismError("--scores: give --distilled DIR and --teachers DIR (online labels: the random-real and "
                             "no-augmentation students cannot replay stored --labels)")
        if self.fixed_labels and (self.loss != "kl" or not self.teachers or self.labels):
            raise PrismError("--fixed-labels: one soft label per image needs --loss kl and --teachers DIR (not stored "
                             "--labels, which belong to augmented views); --protocol soft sets both but --teachers")
        if self.ema_eval >= 1:
            raise PrismError(f"--ema-eval {self.ema_eval}: an EMA decay must be below 1 (EDC uses 0.99); 0 = off")

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in comma_list(self.seeds)]


def stored_label_settings(cfg: ValidateConfig, stored: StoredLabels) -> dict:
    """How stored labels were made (the relabel folder's own teachers, ensemble and weight): the student trains on
    those, so its record must name them, not the protocol's online settings (a relabel for another protocol, or with
    ``--label-teachers primary --ensemble mean``, labels with the primary alone, by mean, while the prism protocol's
    record said primary,pool and norm-matched). Relabel's default protocol is validate's, so the defaults agree; a
    difference is said once, with the fix. The config is left as given: its hash names the student's folder and
    ``prismdd run`` reuses a stage by it."""
    made = stored.manifest.get("config") or {}
    names = (stored.manifest.get("inputs") or {}).get("label_teachers") or []
    theirs = (made.get("label_teachers") or "primary", made.get("ensemble", "mean"))
    ours = (cfg.label_teachers or "primary", cfg.ensemble)
    weighted = "weighted" in (theirs[1], ours[1])
    if theirs != ours or (weighted and made.get("primary_weight") != cfg.primary_weight):
        say_once(("labels", str(cfg.labels)),
                 f"[validate] note: the labels in {cfg.labels} were made by teachers {','.join(names) or theirs[0]} "
                 f"with ensemble {theirs[1]}; --protocol {cfg.protocol} labels with {ours[0]} and {ours[1]}; the "
                 f"student trains on the stored labels and its record says so (for the protocol's labels: prismdd "
                 f"relabel --protocol {cfg.protocol} --distilled {cfg.distilled} --out {cfg.labels} --force)",
                 logger="validate")
    return {"label_teachers": names or [theirs[0]], "ensemble": theirs[1],
            "primary_weight": made.get("primary_weight") if theirs[1] == "weighted" else None}


def check_grad_accum(k: int, batch_size: int, source: str) -> None:
    """--grad-accum k splits every batch into k equal parts of at least 2 images (train-mode BatchNorm over one
    image normalises it by itself); ``source``: what set the batch (an option, the automatic rule, the labels)."""
    if k > 1 and (batch_size % k or batch_size // k < 2):
        why = (f"does not split into {k} equal parts" if batch_size % k else
               f"would run as {k} passes of {batch_size // k} image through train-mode BatchNorm")
        raise PrismError(f"--grad-accum {k}: the batch of {batch_size} images ({source}) {why}; pick a divisor of "
                         f"{batch_size} that leaves at least 2 images per part, or set --batch-size")


def view_config(cfg: ValidateConfig, batch_size: int) -> ViewConfig:
    """The student's views. Without augmentation: a crop of scale 1 is the whole image (no aspect ratio but 1 fits
    an area of 1, so the sampler falls back to the full box), no flip, no mix."""
    if not cfg.augment:
        return ViewConfig(batch_size, 1.0, "none", flip=False)
    return ViewConfig(batch_size, cfg.min_scale, cfg.mix, patch_shuffle=cfg.patch_shuffle,
                      rand_augment=cfg.rand_augment)


def validate_config(protocol: str = DEFAULT_PROTOCOL, **overrides) -> ValidateConfig:
    """API twin of the CLI: defaults < the protocol's preset < overrides."""
    return build_config(ValidateConfig, dict(overrides, protocol=protocol))


# ----------------------------------------------------------------------------- data sources
def training_images(cfg: ValidateConfig, train, info: DatasetInfo) -> tuple[TensorImages, dict]:
    if cfg.distilled:
        ds = load_distilled(cfg.distilled)
        if ds.info.name != info.name:
            raise PrismError(f"--distilled {cfg.distilled}: made from {ds.info.name!r}, but --dataset is {info.name!r}")
        return ds, {"source": "distilled", "folder": cfg.distilled, "primary": ds.manifest["config"].get("primary"),
                    "bn_pool": ds.manifest.get("inputs", {}).get("bn_pool"), "config_hash": ds.manifest.get("config_hash")}
    if cfg.random_real:
        idx = random_real_indices(train, info.num_classes, cfg.ipc, cfg.seed)
        return TensorImages(train.get_images(idx), train.targets[idx]), {"source": "random-real", "ipc": cfg.ipc,
                                                                         "indices": idx.tolist()}
    return train, {"source": "full"}  # file-backed splits decode each batch's images as they are needed


def from_distilled(cfg: ValidateConfig) -> ValidateConfig:
    """A distilled set names its dataset, data root and resolution; the baselines default to fashion-mnist."""
    if not cfg.distilled:
        return cfg if cfg.dataset is not None else dataclasses.replace(cfg, dataset=DEFAULT_DATASET)
    return with_distilled_dataset(cfg, read_manifest(cfg.distilled, ("recover", "random-real"), "--distilled"),
                                  cfg.distilled)


# DD-Ranking's students beside the protocol's (validate --scores, run --scores, the quality benchmark): the set with
# hard labels, trained without augmentation as DD-Ranking trains it (use_aug_for_hard=False), and without augmentation
HARD_LABELS = {"loss": "ce", "augment": False, "teachers": None, "label_teachers": None}
NO_AUGMENTATION = {"augment": False}


def _scores(cfg: ValidateConfig, top1: float, ipc: int, labellers: list[str] | None) -> dict:
    """DD-Ranking's LRS and ARS for the distilled set whose protocol student scored ``top1``: four more students,
    each a validate of its own in ``<out>/scores/<name>`` (finished ones are reused), random real labelled by the
    very teachers that labelled the set."""
    def student(name: str, **kw) -> float:
        sub = dataclasses.replace(cfg, scores=False, full_top1=None, out=str(Path(cfg.out) / "scores" / name), **kw)
        return validate(sub)["top1"]

    same = ",".join(labellers) if labellers else cfg.label_teachers
    acc = {"syn_soft": top1, "syn_aug": top1, "full_hard": cfg.full_top1,
           "syn_hard": student("hard-labels", **HARD_LABELS), "syn_noaug": student("no-augmentation", **NO_AUGMENTATION)}
    acc["random_soft"] = acc["random_aug"] = student("random-real", distilled=None, random_real=True, ipc=ipc,
                                                     label_teachers=same)
    acc["random_noaug"] = student("random-real-no-augmentation", distilled=None, random_real=True, ipc=ipc,
                                  label_teachers=same, **NO_AUGMENTATION)
    out = score_row(acc)
    for key in ("lrs", "ars"):
        e = out[key]
        logger.info(f"[validate] {key.upper()} " + (f"{100 * e['score']:.2f} (x100)" if e["score"] is not None else
                                                    missing_line(e)))
    return out


# ----------------------------------------------------------------------------- losses
def student_loss(cfg: ValidateConfig, out: torch.Tensor, soft: torch.Tensor | None, y: torch.Tensor,
                 y2: torch.Tensor, lam: float) -> dict:
    """ce: hard labels, mixed by lambda under CutMix/Mixup. mse+ce: MSE(student, soft logits) + gamma * CE,
    the CE on each image's own label (``mix_ce='own'``, PRISM's ``mse_gt``) or lambda-mixed (``'mixed'``).
    kl: KL(soft || student) at temperature T, batch mean, times T^2 unless ``kl_t2`` is off."""
    mixed = F.cross_entropy(out, y) if lam == 1.0 else lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y2)
    if cfg.loss == "ce":
        return {"ce": mixed, "total": mixed}
    if cfg.loss == "mse":  # FRePo's eval: ``soft`` is the (mixed) label vector; half the SSE, mean over the batch
        mse = half_sse(out, soft)
        return {"mse": mse, "total": mse}
    if cfg.loss == "mse+ce":
        ce = F.cross_entropy(out, y) if cfg.mix_ce == "own" else mixed
        mse = F.mse_loss(out, soft)
        return {"mse": mse, "ce": ce, "total": mse + cfg.gamma * ce}
    t = cfg.temperature
    if cfg.fixed_labels:  # ``soft``: the images' fixed label distributions (already at T), mixed as the images were
        kl = F.kl_div(F.log_softmax(out / t, 1), soft, reduction="batchmean")
        kl = kl * t * t if cfg.kl_t2 else kl
        return {"kl": kl, "total": kl}
    kl = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(soft / t, 1), reduction="batchmean", log_target=True)
    kl = kl * t * t if cfg.kl_t2 else kl
    return {"kl": kl, "total": kl}


# ----------------------------------------------------------------------------- one student
def train_student(cfg: ValidateConfig, arch: str, seed: int, data: TensorImages, test, info: DatasetInfo,
                  labels, ctx, folder: Path) -> dict:
    """Train one student (resumable per epoch); returns its result dict."""
    device = ctx.device
    chash = config_hash(cfg, student=arch, seeds=str(seed))
    result = reusable(folder / "result.json", chash, force=cfg.force, what="a student")
    if result is not None:
        return result
    resume = reusable(folder / "checkpoint.pt", chash, force=cfg.force, what="an unfinished student")
    torch.manual_seed(seed)
    model = create_model(arch, info.num_classes, info.channels, info.resolution, cfg.student_width).to(device)
    optimizer = make_optimizer(cfg.optimizer, decay_groups(model, cfg.weight_decay, cfg.decay_exempt), cfg.lr,
                               cfg.weight_decay, nesterov=cfg.nesterov)
    ddp = ctx.world_size > 1
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    bs = labels["batch_size"]
    vc = view_config(cfg, bs)
    steps = math.ceil(len(data) / bs)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)

    def batches(epoch):
        if labels["stored"] is not None:
            plan, soft_all = labels["stored"].epoch(epoch)
        else:
            # every random stream of a student (order, views, CutMix/Mixup, and its init above) comes from ITS
            # seed, so --seeds 0,1,2 measures the whole protocol's spread; stored labels replay their own views
            plan, soft_all = epoch_plan(len(data), epoch, seed, vc, info.resolution), None
        for _, sl, idx, views, mix in plan.batches(bs):
            yield sl, idx, views, mix, soft_all

    def loss_fn(batch):
        sl, idx, views, mix, soft_all = batch
        x = make_inputs(data.get_images(idx), info, views, None, device, vc.rand_augment, cfg.num_workers)
        if cfg.bn_double_update:  # RDED validation/main.py:213 (DELT :226): student(images) before the mixed pass
            with torch.no_grad():
                net(x[ctx.rank::ctx.world_size] if ddp else x)
        x = apply_mix(x, mix)
        y = data.targets[idx].to(device)
        if soft_all is not None:
            soft = soft_all[sl].to(device)
        elif labels["vectors"] is not None:  # label vectors of the images, mixed as the images were
            vec = labels["vectors"][idx].to(device)
            soft = _mix_vectors(vec, mix)
        elif labels["online"] is not None and cfg.loss != "ce":
            soft = labels["online"](x)
        else:
            soft = None
        y2, lam = mix_partners(y, mix)
        if ddp:  # each rank trains on its share of the (already mixed) batch; DDP averages the gradients
            part = slice(ctx.rank, None, ctx.world_size)
            x, y, y2 = x[part], y[part], y2[part]
            soft = soft[part] if soft is not None else None
        if cfg.grad_accum == 1:
            return student_loss(cfg, net(x), soft, y, y2, lam)
        return _micro_batches(cfg, net, x, soft, y, y2, lam)

    run = fit(model, optimizer, batches, loss_fn, epochs=cfg.epochs, steps_per_epoch=steps, lr=cfg.lr,
              schedule=cfg.schedule, warmup=cfg.warmup, lr_every=cfg.lr_every,
              evaluate_fn=lambda: evaluate(model, test, info, device, num_workers=cfg.num_workers),
              eval_every=cfg.eval_every, checkpoint=folder / "checkpoint.pt", config_hash=chash, resume=resume,
              log=JsonlLog(folder / "log.jsonl"), desc=f"validate {arch} seed {seed}", is_main=ctx.rank == 0,
              ema_decay=cfg.ema_eval)
    curve, final = run["curve"], run["final"]
    best = max(curve, key=lambda c: c["top1"])
    result = {"student": arch, "seed": seed, "top1": final["top1"], "top5": final["top5"],
              "best_top1": best["top1"], "best_epoch": best["epoch"], "curve": curve,
              "seconds": round(run["seconds"], 2), "config_hash": chash}
    if ctx.rank == 0:
        save_model(folder, model, info, cfg, final, run["seconds"], chash)
        write_json(folder / "result.json", result)
        (folder / "checkpoint.pt").unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------- the stage
@locked_stage("validate")
def validate(cfg: ValidateConfig) -> dict:
    timer = Timer()
    ctx = dist.init(cfg.device)
    cfg = from_distilled(cfg)
    own = label_source(cfg.distilled, loss=cfg.loss) if cfg.distilled and not cfg.labels else None
    if own is not None:  # label vectors the set's method learned with it, and a loss that trains on them
        logger.info(f"[validate] --loss {cfg.loss}: training on the {own.what} of {cfg.distilled}")
        cfg = dataclasses.replace(cfg, labels=cfg.distilled)  # the same student as with --labels given
    if cfg.rand_augment:
        rand_augment_transform(cfg.rand_augment)  # timm missing or a bad string: refused before any work
    train, test, info = load_splits(cfg)
    check_class_coverage(info, test=test)  # an empty val/ or a class missing from it: refused now, not after an epoch
    data, source = training_images(cfg, train, info)
    stored = online = made_by = None
    bs = cfg.batch_size or default_view_batch(len(data), info.num_classes, cfg.batch_rule)
    vc = view_config(cfg, bs)  # what the students' views are, for the record below
    vectors = None
    # label vectors a method wrote beside its images (FRePo's learned labels), found through the registry
    held = label_source(cfg.labels) if cfg.labels else None
    if held is not None and cfg.loss != held.loss:
        raise PrismError(f"--labels {cfg.labels}: holds {held.what} ({held.file}); they train with --loss "
                         f"{held.loss} (or --protocol {held.protocol})")
    if cfg.loss == "mse":
        vectors = _label_vectors(cfg, data, info, held)
    elif cfg.labels:
        stored = StoredLabels(cfg.labels, info.num_classes)
        v = stored.views
        if cfg.batch_size and cfg.batch_size != v["batch_size"]:
            raise PrismError(f"--batch-size {cfg.batch_size}: the labels in {cfg.labels} were made for batch size "
                             f"{v['batch_size']}; drop --batch-size or relabel")
        bs = v["batch_size"]
        made_by = stored_label_settings(cfg, stored)
        if cfg.rand_augment != v.get("rand_augment", ""):  # the seeds are stored, the string must agree
            raise PrismError(f"--rand-augment {cfg.rand_augment!r}: the labels in {cfg.labels} were made with "
                             f"{v.get('rand_augment', '')!r}; relabel with the same --rand-augment (or relabel "
                             f"--protocol {cfg.protocol})")
        # checked here, before a student trains: the first missing epoch would otherwise stop it there, hours in
        missing = [e + 1 for e in range(min(cfg.epochs, stored.epochs)) if not epoch_file(cfg.labels, e).exists()]
        if cfg.epochs > stored.epochs or missing:
            held = f"hold {stored.epochs} epochs" + (f" and lack the files of epochs {missing[:5]}" if missing else "")
            # their own config.yaml: the same settings, so the folder is extended rather than refused as other labels
            raise PrismError(f"--epochs {cfg.epochs}: the labels in {cfg.labels} {held}; extend them with prismdd "
                             f"relabel --config {Path(cfg.labels) / 'config.yaml'} --epochs {cfg.epochs}, or train "
                             f"fewer epochs; nothing was trained")
        if not cfg.augment:
            raise PrismError(f"--no-augment: the labels in {cfg.labels} belong to their stored augmented views; "
                             f"label online with --teachers DIR instead")
    elif cfg.teachers and cfg.loss not in ("ce", "mse"):
        online = load_labelers(cfg.teachers, cfg.label_teachers, source.get("primary"), info, cfg.ensemble,
                               cfg.primary_weight, ctx.device, pool=source.get("bn_pool"))
    # the batch the accumulation splits, whatever set it: checked before anything is written
    check_grad_accum(cfg.grad_accum, bs, "--batch-size" if cfg.batch_size else
                     f"the batch size of the labels in {cfg.labels}" if stored is not None else
                     f"--batch-rule {cfg.batch_rule}'s size for {len(data)} images")
    if cfg.full_top1 is not None and cfg.full_top1 <= 100 / info.num_classes:
        raise PrismError(f"--full-top1 {cfg.full_top1}: at or below chance ({100 / info.num_classes:.2f} % for "
                         f"{info.num_classes} classes); pass the full-data student's top-1 in percent")
    digests = consumed_digests(data, stored, cfg.teachers, online.names if online else ())
    if vectors is not None and held is not None:  # a student made from other label vectors is not reused
        digests[held.what] = held.digest(cfg.labels)
    if stored is not None:  # labels made for another set (or before recover re-ran): refused
        stored.check_source(digests.get("distilled images"), cfg.distilled)
    check_students(cfg, info)  # a student that cannot take these images fails now, before anything is written
    if ctx.rank == 0:  # finished students made from other images, labels or teachers are not reused
        guard_inputs(cfg.out, digests, force=cfg.force)
    fixed = None
    if cfg.fixed_labels:  # computed once for every student and seed of this call, then never again
        vectors, fixed = _fixed_labels(cfg, data, info, online, digests, ctx)
    labels = {"stored": stored, "online": None if fixed else online, "batch_size": bs, "vectors": vectors}
    if stored is not None and (cfg.mix, cfg.min_scale, cfg.patch_shuffle) != (
            stored.views["mix"], stored.views["min_scale"], stored.views.get("patch_shuffle", 0)):
        # the stored labels belong to their views: replaying them is the only consistent choice
        logger.info(f"[validate] using the stored views (mix={stored.views['mix']}, "
                    f"min_scale={stored.views['min_scale']}, patch_shuffle={stored.views.get('patch_shuffle', 0)}) "
                    f"from {cfg.labels}")
    out = Path(cfg.out)
    seeds = cfg.seed_list
    students = comma_list(cfg.student)
    per_student = {}
    for arch in students:
        results = [train_student(cfg, arch, s, data, test, info, labels, ctx, out / f"{arch}_seed{s}") for s in seeds]
        t1 = np.array([r["top1"] for r in results])
        t5 = np.array([r["top5"] for r in results])
        per_student[arch] = {
            "top1": round(float(t1.mean()), 3), "top1_std": round(float(t1.std(ddof=1)) if len(t1) > 1 else 0.0, 3),
            "top5": round(float(t5.mean()), 3), "top5_std": round(float(t5.std(ddof=1)) if len(t5) > 1 else 0.0, 3),
            "best_top1": round(float(np.mean([r["best_top1"] for r in results])), 3),
            "seeds": seeds, "runs": results,
            "curve": _mean_curve([r["curve"] for r in results]),
        }
        if ctx.rank == 0:
            r = per_student[arch]
            # one run has no spread: "+- 0.00" would read as a measured zero
            spread = f" +- {r['top1_std']:.2f}% over seeds {seeds}" if len(seeds) > 1 else f"% (one run, seed {seeds[0]})"
            logger.info(f"[validate] {arch}: final-epoch top-1 {r['top1']:.2f}{spread}; "
                        f"best epoch {r['best_top1']:.2f}% (marked best, not the result)")
    first = per_student[students[0]]
    label_src = ("stored:" + str(cfg.labels)) if stored else (("online:" + ",".join(online.names)) if online else
                                                              "hard labels")
    if vectors is not None and fixed is None:
        label_src = f"learned:{cfg.labels}" if cfg.labels else "centred one-hot"
    if fixed is not None:
        label_src = f"fixed:{','.join(online.names)} (T={cfg.temperature:g}, {cfg.ensemble})"
    protocol = {"protocol": cfg.protocol, "regime": regime_of(cfg.loss, cfg.fixed_labels, bool(stored or online)),
                "loss": cfg.loss, "gamma": cfg.gamma if cfg.loss == "mse+ce" else None,
                "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                "decay_exempt": cfg.decay_exempt, "grad_accum": cfg.grad_accum, "schedule": cfg.schedule,
                "lr_every": cfg.lr_every,
                "epochs": cfg.epochs, "batch_size": bs,
                "mix": stored.views["mix"] if stored else vc.mix, "soft_labels": label_src,
                # how the soft labels were made: the relabel folder's own teachers and ensemble for stored labels
                "label_teachers": (made_by["label_teachers"] if stored else online.names if online else None),
                "ensemble": made_by["ensemble"] if stored else cfg.ensemble if online else None,
                "min_scale": stored.views["min_scale"] if stored else vc.min_scale,
                "patch_shuffle": stored.views.get("patch_shuffle", 0) if stored else vc.patch_shuffle,
                "rand_augment": vc.rand_augment, "flip": vc.flip,
                "ema_eval": cfg.ema_eval, "bn_double_update": cfg.bn_double_update,
                "student_width": cfg.student_width, "result": "final epoch", "test_set": f"{info.name} test ({len(test)})"}
    if fixed is not None:
        protocol["fixed_labels"] = fixed
    accuracy = {"top1": first["top1"], "top5": first["top5"], "top1_std": first["top1_std"],
                "best_top1": first["best_top1"], "curve": first["curve"], "protocol": protocol,
                "seeds": seeds, "students": per_student, "source": {k: v for k, v in source.items() if k != "indices"},
                "images": len(data)}
    if cfg.scores:
        accuracy["scores"] = _scores(cfg, accuracy["top1"], len(data) // info.num_classes,
                                     online.names if online else None)
    if ctx.rank == 0:
        write_json(out / ACCURACY_FILE, accuracy)
        write_manifest(out, "validate", cfg, inputs={"dataset": info.to_dict(), "source": source, "digests": digests,
                                                     **({"labels_made_by": made_by} if made_by else {})},
                       outputs={"accuracy": ACCURACY_FILE, "top1": accuracy["top1"]}, wall_time=timer.elapsed)
    dist.barrier(ctx)
    return accuracy


FIXED_LABELS = "fixed_labels.safetensors"
FIXED_FORMAT = "prismdd-fixed-labels/1"


def _fixed_labels(cfg: ValidateConfig, data, info: DatasetInfo, labeler, digests: dict, ctx) -> tuple[torch.Tensor, dict]:
    """The soft regime's labels: one distribution per image, softmax(teacher logits / T) on the un-augmented image,
    stored in ``<out>/fixed_labels.safetensors`` with the teachers' and images' digests, the ensemble rule and T in
    its header; a later call with the same inputs reads it instead of running the teachers again."""
    settings = {"teachers": labeler.names, "ensemble": cfg.ensemble, "primary_weight": cfg.primary_weight,
                "temperature": cfg.temperature, "images": len(data), "view": "un-augmented (whole, unflipped)"}
    header = settings_header(FIXED_FORMAT, settings, inputs=json.dumps(digests, sort_keys=True),
                             targets=hashlib.sha256(data.targets.numpy().tobytes()).hexdigest())
    path = Path(cfg.out) / FIXED_LABELS
    stored = load_if_header(path, header)
    if stored is None:
        logits = fixed_soft_logits(labeler, data, info, ctx.device)
        check_finite_labels(logits, labeler.suspects, path)
        stored = {"logits": logits, "probs": fixed_soft_labels(logits, cfg.temperature)}
        if ctx.rank == 0:
            save_tensors(stored, path, header)
        logger.info(f"[validate] fixed soft labels of {len(data)} images by {', '.join(labeler.names)} "
                    f"(T={cfg.temperature:g}) -> {path}")
    record = dict(settings, file=FIXED_LABELS, sha256=file_digest(path) if path.exists() else None)
    return stored["probs"], record


def check_students(cfg: ValidateConfig, info: DatasetInfo) -> None:
    """Every student architecture is built and run on two blank images of the data's size, so an unknown name or a
    network too deep for the resolution is refused before the first epoch (and before the output folder is made)."""
    x = torch.zeros(2, info.channels, info.resolution, info.resolution)
    for arch in comma_list(cfg.student):
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # the students' own seeds stay untouched
                create_model(arch, info.num_classes, info.channels, info.resolution, cfg.student_width).eval()(x)
        except PrismError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the forward pass is the network's, said in one line
            raise PrismError(f"--student {arch}: cannot run on {info.resolution} px {info.channels}-channel images "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); pick another or pass "
                             f"--resolution") from None


def _micro_batches(cfg: ValidateConfig, net, x, soft, y, y2, lam):
    """Gradient accumulation as the references' ``--gradient-accumulation-steps``: the batch in ``grad_accum``
    contiguous parts, each forwarded (train-mode BatchNorm over the part) and weighted by its share of the batch,
    so the summed gradient is that of the batch's mean loss. A generator: ``fit`` backpropagates each part
    before the next one is forwarded. Soft labels were made on the whole batch, as a relabel batch."""
    k, n = cfg.grad_accum, len(x)
    softs = soft.tensor_split(k) if soft is not None else [None] * k
    for xs, ss, ys, y2s in zip(x.tensor_split(k), softs, y.tensor_split(k), y2.tensor_split(k)):
        if len(xs):
            yield student_loss(cfg, net(xs), ss, ys, y2s, lam), len(xs) / n


def _label_vectors(cfg: ValidateConfig, data, info: DatasetInfo, source: LabelSource | None) -> torch.Tensor:
    """``--loss mse``'s targets: the label vectors of ``--labels`` (a recover folder of the same images whose method
    wrote them, ``source``: FRePo's learned labels; a ``--distilled`` folder that holds them uses its own), else
    centred one-hot vectors of the hard labels (how FRePo evaluates images without learned labels)."""
    if not cfg.labels:
        return centred_onehot(data.targets, info.num_classes)
    if source is None:
        raise PrismError(f"--labels {cfg.labels}: --loss {cfg.loss} reads {sources_text(cfg.loss)}; that folder has "
                         f"none: give such a folder, or drop --labels to regress centred one-hot labels")
    if not cfg.distilled or Path(cfg.labels).resolve() != Path(cfg.distilled).resolve():
        raise PrismError(f"--labels {cfg.labels}: {source.what} belong to the images of their own folder; pass "
                         f"--distilled {cfg.labels} --labels {cfg.labels}")
    return source.read(cfg.labels, data)


def _mix_vectors(vec: torch.Tensor, mix) -> torch.Tensor:
    """The label vector of a CutMix/Mixup image: lambda of its own plus (1 - lambda) of its partner's."""
    partner, lam = mix_partners(vec, mix)
    return lam * vec + (1 - lam) * partner


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    by_epoch: dict[int, list[float]] = {}
    for c in curves:
        for p in c:
            by_epoch.setdefault(p["epoch"], []).append(p["top1"])
    return [{"epoch": e, "top1": round(float(np.mean(v)), 3)} for e, v in sorted(by_epoch.items())]
