"""score: per-example scores of a training split, computed once and read by every selection method (herding,
k-center, forgetting, EL2N, CCS, BPS) at every IPC (the file format: ``artifacts/scores.py``).

Size: about 470 lines: the stage's options, the forward pass over the split (embedding, entropy), the recorded
training runs (dynamics) and the resume and torchrun bookkeeping that joins them into one file. They share one
folder and one set of work files, so they stay together; the embedders themselves live in ``methods/embed.py``.

Kinds (``--kinds``):

- ``embedding`` (N, D): an embedder's vector of each un-augmented, normalised training image (``--embed``,
  ``methods/embed.py``; default ``teacher``: the ``--embed-arch`` teacher's penultimate features, eval mode);
- ``entropy`` (N,): the predictive entropy (nats) of the ``--embed-arch`` teacher's softmax on the same images
  (BPS's entropy rule);
- ``dynamics``: ``--record-runs`` short trainings from scratch of ``--record-arch``. In run r and epoch e, each
  example's correctness (argmax == label; forgetting events, Toneva et al. ICLR 2019) and margin (assigned logit
  minus the largest other; its mean over epochs is AUM, Pleiss et al. NeurIPS 2020, which CCS prunes by) are read
  off the logits of ITS TRAINING PASS: the augmented view it was trained on that epoch, in train mode, as Data Diet's
  ``train.py`` records forgetting from the training step's logits. After epoch ``--el2n-epoch`` the model's EL2N
  = ||softmax - onehot||_2 on the un-augmented images in eval mode (Data Diet, Paul et al. NeurIPS 2021: CIFAR-10
  epoch 20 of 200, averaged over 10 runs; mansheej/data_diet aee462e, ``scores.py``'s ``l2_error``).

Resumable after kill -9: embedding and entropy are written per shard of examples; each run writes an atomic
checkpoint after every epoch (model, optimizer, the rows recorded so far) and, once finished, a file of its own
under ``work/``. Every random draw of epoch e of run r (data order, views, dropout) comes from a generator seeded by
(seed, 'score-run', r, e) and its initial weights from (seed, 'score-run', r), so a resumed run gives the same bits
as an uninterrupted one. A finished folder's kinds are kept (a requested kind is checked against the settings its
file records, and refused when they differ); only the missing kinds are computed. Under torchrun, embedding and
entropy are split into contiguous shards of whole batches (the same batches as one process, so the same bits) and
run r trains on rank r % world; rank 0 assembles ``scores.safetensors``, then writes the manifest, last.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import (MANIFEST, SCORE_KINDS, SCORES_FILE, SCORES_FORMAT, check_kinds, clear_outputs, file_digest,
                         load_scores, locked_stage, read_manifest, reusable, save_scores, score_settings, seal_files,
                         teacher_digests, write_manifest)
from ..core import distributed as dist
from ..core.augment import apply_views, sample_views
from ..core.config import CommonConfig, assemble_config, comma_list, opt
from ..core.data import DatasetInfo, load_splits, normalize
from ..core.errors import PrismError
from ..core.io import JsonlLog, load_tensors, read_json, save_tensors, tensors_metadata
from ..core.log import get_logger
from ..core.models import create_model
from ..core.runtime import Heartbeat, Timer, derive_seed, make_generator
from ..core.training import EVAL_PIXELS, FEATURE_BATCH, OPTIMIZERS, SCHEDULES, evaluate, fit, make_optimizer
from ..methods.embed import EMBEDDERS, embedder_option_groups, load_teacher, teacher_folder, teacher_record

logger = get_logger("score")

WORK = "work"  # per-shard and per-run files while the stage runs; removed once scores.safetensors is written
EL2N_FRACTION = 0.1  # Data Diet takes EL2N at epoch 20 of 200 (CIFAR-10): --el2n-epoch's default is this share
PASS_KINDS = ("embedding", "entropy")  # the kinds made by one forward pass over the (sharded) training split


@dataclass
class ScoreBase(CommonConfig):
    """The score stage's options; ``ScoreConfig`` (below) adds every embedder's own (``methods/embed.py``)."""

    out: str = opt("runs/scores", "output folder: scores.safetensors and manifest.json (work/ while it runs)",
                   hashed=False)
    teachers: str = opt("runs/teachers", "a squeeze output folder; its --embed-arch teacher gives the entropy and the "
                                         "teacher embedding (not read for --kinds dynamics alone)", path=True)
    kinds: str = opt("embedding,entropy", "comma list of: embedding (herding, k-center, BPS) | entropy (BPS) | dynamics "
                                          "(forgetting, EL2N, CCS: trains --record-runs networks, the slow kind); "
                                          "kinds already in --out are kept, only missing ones are computed",
                     choices=tuple(SCORE_KINDS), many=True)
    embed: str = opt("teacher", "the embedder of --kinds embedding: " + " | ".join(
        f"{name} ({cls.summary})" for name, cls in EMBEDDERS.items()) + "; methods/embed.py says how to add one")
    embed_arch: str = opt("convnet", "the teacher in --teachers whose penultimate features (--embed teacher) and "
                                     "predictive entropy are recorded")
    record_arch: str = opt("convnet", "dynamics: the network trained from scratch in every run (Data Diet: ResNet-18 "
                                      "on CIFAR-10)")
    record_width: float = opt(0.5, "dynamics: its width multiplier (0.5: squeeze's CPU default; 1.0 on a GPU)",
                              minimum=0.01)
    record_runs: int = opt(4, "dynamics: independent runs (own initial weights, data order and views); Data Diet "
                              "averages EL2N over 10, 4 keeps a CPU run to minutes (fewer runs: noisier scores)",
                           minimum=1)
    record_epochs: int = opt(10, "dynamics: epochs of each run (Data Diet and forgetting: 200 on CIFAR-10; 10 is a "
                                 "CPU budget, which sees fewer forgetting events)", minimum=1)
    el2n_epoch: int | None = opt(None, "dynamics: EL2N is taken after this epoch (default: 10 % of --record-epochs, at "
                                       "least 1: Data Diet's epoch 20 of 200, early in training, where its EL2N "
                                       "pruned best)", minimum=1)
    batch_size: int = opt(128, "dynamics: images per optimiser step (Data Diet: 128); every example is trained on "
                               "once per epoch (the last batches are not dropped)", minimum=1)
    optimizer: str = opt("sgd", "dynamics: sgd (Nesterov, momentum 0.9: Data Diet's) | adamw | adam",
                         choices=OPTIMIZERS)
    lr: float = opt(0.1, "dynamics: peak learning rate (Data Diet: 0.1 with SGD)", minimum=0.0)
    weight_decay: float = opt(5e-4, "dynamics: weight decay (Data Diet: 5e-4)", minimum=0.0)
    schedule: str = opt("cosine", "dynamics: LR schedule over each run (Data Diet: x0.2 steps at epochs 60/120/160 of "
                                  "200, so its EL2N epoch sits at the peak LR, as 10 % into a cosine nearly does)",
                        choices=SCHEDULES)
    warmup: float = opt(0.0, "dynamics: fraction of each run with a linear LR warm-up", minimum=0.0)
    min_scale: float = opt(0.8, "dynamics: RandomResizedCrop scale floor of the training views (Data Diet: a pad-4 "
                                "random crop of 32 px and a flip; 0.8 is a comparably mild crop; 1.0 = no crop)")
    flip: bool = opt(True, "dynamics: random horizontal flips of the training views")

    def check(self):
        check_kinds(comma_list(self.kinds))
        if self.el2n_epoch is not None and self.el2n_epoch > self.record_epochs:
            raise PrismError(f"--el2n-epoch {self.el2n_epoch}: after the last of --record-epochs {self.record_epochs}; "
                             f"give 1 to {self.record_epochs} (Data Diet takes EL2N early: epoch 20 of 200)")
        if not 0 < self.min_scale <= 1:
            raise PrismError(f"--min-scale {self.min_scale}: must be in (0, 1]")
        embedder = EMBEDDERS.get(self.embed)  # an unknown name: one line listing the registered ones
        embedder.check(self)

    @property
    def kind_list(self) -> list[str]:
        """The requested kinds, each once, in SCORE_KINDS order."""
        asked = set(comma_list(self.kinds))
        return [k for k in SCORE_KINDS if k in asked]

    @property
    def el2n_after(self) -> int:
        """--el2n-epoch resolved: given, else 10 % of the run (at least epoch 1)."""
        return self.el2n_epoch or max(1, round(EL2N_FRACTION * self.record_epochs))


ScoreConfig = assemble_config("ScoreConfig", ScoreBase, embedder_option_groups(), __name__)


# ----------------------------------------------------------------------------- per-example math (logits (B, K))
def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_k p_k log p_k in nats, from log-softmax (no log 0 for a confident network); (B,)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def correct_and_margin(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax == label, assigned logit - largest other logit), each (B,): AUM's margin (Pleiss et al.)."""
    z = logits.float()
    y = targets[:, None]
    assigned = z.gather(1, y).squeeze(1)
    other = z.scatter(1, y, float("-inf")).amax(1)
    return z.argmax(1) == targets, assigned - other


def el2n(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """||softmax(z) - onehot(y)||_2 per example (Data Diet's ``l2_error``); (B,)."""
    p = torch.softmax(logits.float(), dim=1)
    return torch.linalg.vector_norm(p - F.one_hot(targets, p.shape[1]).float(), dim=1)


def pass_batch(info: DatasetInfo) -> int:
    """Images per no-grad forward pass: 256, fewer above 64 px (the evaluation's pixel budget)."""
    return max(16, min(FEATURE_BATCH, EVAL_PIXELS // (info.resolution ** 2)))


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    """[start, end) of the forward passes over n examples: fixed for every world size, so shards compute the very
    batches one process does (a convolution's result may depend on the batch shape)."""
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


def shard(bounds: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s contiguous run of whole batches."""
    k = len(bounds)
    return bounds[rank * k // world: (rank + 1) * k // world]


@torch.no_grad()
def el2n_scores(model: nn.Module, split, info: DatasetInfo, device, batch: int) -> torch.Tensor:
    """EL2N of every example of ``split`` (un-augmented, eval mode) -> float32 (N,) on the CPU."""
    was = model.training
    model.eval()
    out = []
    try:
        for s, e in batch_bounds(len(split), batch):
            idx = torch.arange(s, e)
            x = normalize(split.get_images(idx).to(device), info)
            out.append(el2n(model(x), split.targets[idx].to(device)).cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------- what made each kind
def digest(settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))  # tuples -> lists, as the header stores them


def data_record(cfg, info: DatasetInfo, targets: torch.Tensor) -> dict:
    """The training split the scores describe: its classes, size, labels (digest) and subset file (digest)."""
    return {"dataset": info.name, "classes": info.num_classes, "resolution": info.resolution,
            "channels": info.channels, "n": len(targets),
            "targets_sha256": hashlib.sha256(targets.to(torch.int64).contiguous().numpy().tobytes()).hexdigest(),
            "subset_sha256": file_digest(cfg.subset) if cfg.subset else None}


def dynamics_record(cfg) -> dict:
    return {"arch": cfg.record_arch, "width": cfg.record_width, "runs": cfg.record_runs,
            "epochs": cfg.record_epochs, "el2n_epoch": cfg.el2n_after, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
            "warmup": cfg.warmup, "min_scale": cfg.min_scale, "flip": cfg.flip, "seed": cfg.seed}


def kind_settings(cfg, kind: str, data: dict) -> dict:
    """What shapes ``kind``'s tensors (JSON): compared with a finished folder's record, written into its header and
    manifest. Reading it checks that the inputs exist (a missing teacher: one line with the squeeze command)."""
    if kind == "embedding":
        own = {"embed": cfg.embed, **EMBEDDERS.get(cfg.embed).settings(cfg)}
    elif kind == "entropy":
        own = teacher_record(cfg.teachers, cfg.embed_arch)
    else:
        own = dynamics_record(cfg)
    return _plain({"data": data, **own})


def _first_difference(was: dict, now: dict, prefix: str = "") -> str:
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key), now.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return _first_difference(a, b, f"{prefix}{key}.")
            return f"{prefix}{key}: {a} then, {b} now"
    return "none"


# ----------------------------------------------------------------------------- a finished folder
def kept_scores(out: Path, settings: dict[str, dict], targets: torch.Tensor) -> tuple[dict, dict]:
    """What a previous run left in ``out`` that this one keeps: (tensors, {kind: settings}). A requested
    kind whose recorded settings differ is refused (never mixed in), as is a file of other data. A kind the folder
    holds but this run does not ask for is kept with its own record."""
    path = out / SCORES_FILE
    finished = (out / MANIFEST).exists()
    if finished:
        read_manifest(out, "score", "--out")  # another stage's folder: refused, never written over
    if not path.exists():
        return {}, {}
    if finished:
        tensors = {k: v for k, v in vars(load_scores(out, option="--out")).items()
                   if torch.is_tensor(v)}  # checks the seal, the format and the shapes
    else:  # killed between the file (written atomically) and its manifest: the file is whole
        if tensors_metadata(path).get("format") != SCORES_FORMAT:
            raise PrismError(f"{path}: not a score file of this prismdd; use --force to redo it, or another --out")
        tensors = load_tensors(path)
    if not torch.equal(tensors["targets"], targets.to(torch.int64).cpu()):
        raise PrismError(f"--out {out}: holds scores of another training split ({len(tensors['targets'])} labels, this "
                         f"one has {len(targets)} or other classes); use --force to redo them, or another --out")
    recorded = score_settings(out)
    have = [k for k, names in SCORE_KINDS.items() if all(n in tensors for n in names)]
    for kind in have:
        if kind in settings and recorded.get(kind) != settings[kind]:
            raise PrismError(f"--out {out}: its {kind} scores were made with other settings "
                             f"({_first_difference(recorded.get(kind) or {}, settings[kind])}); use --force to redo "
                             f"them (every kind), or another --out")
    return tensors, {k: recorded.get(k) for k in have}


def present_kinds(out: Path) -> list[str]:
    path = out / SCORES_FILE
    if not path.exists():
        return []
    return [k for k in tensors_metadata(path).get("kinds", "").split(",") if k]


# ----------------------------------------------------------------------------- embedding and entropy
def shard_file(out: Path, kind: str, start: int, end: int) -> Path:
    return out / WORK / f"{kind}_{start:09d}-{end:09d}.safetensors"


def forward_pass(cfg, kinds: list[str], settings: dict, train, info: DatasetInfo, device, out: Path,
                 ctx: dist.DistContext) -> None:
    """This rank's shard of ``kinds`` (embedding, entropy), one file per kind, each reused when finished."""
    bounds = shard(batch_bounds(len(train), pass_batch(info)), ctx.rank, ctx.world_size)
    if not bounds:
        return
    start, end = bounds[0][0], bounds[-1][1]
    todo = [k for k in kinds if reusable(shard_file(out, k, start, end), digest(settings[k]),
                                         what=f"a finished {k} shard") is None]
    if not todo:
        return
    embed = EMBEDDERS.get(cfg.embed)(cfg, info, train, device) if "embedding" in todo else None
    teacher = load_teacher(cfg.teachers, cfg.embed_arch, info, device) if "entropy" in todo else None
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in todo}
    beat = Heartbeat(f"score {'+'.join(todo)}", len(bounds), enabled=ctx.is_main, unit="batch")
    with torch.no_grad():
        for s, e in bounds:
            x = train.get_images(torch.arange(s, e))  # uint8, un-augmented
            if embed is not None:
                v = embed(x)
                if v.ndim != 2 or len(v) != e - s:
                    raise PrismError(f"--embed {cfg.embed}: gave shape {tuple(v.shape)} for {e - s} images, expected "
                                     f"({e - s}, D)")
                parts["embedding"].append(v.float().cpu())
            if teacher is not None:
                parts["entropy"].append(predictive_entropy(teacher(normalize(x.to(device), info))).cpu())
            beat.step()
    for k in todo:
        save_tensors({"value": torch.cat(parts[k])}, shard_file(out, k, start, end),
                     metadata={"config_hash": digest(settings[k]), "kind": k})


def gather_pass(out: Path, kinds: list[str], n: int, info: DatasetInfo, world: int) -> dict[str, torch.Tensor]:
    """Rank 0: the shards of every rank, in example order."""
    bounds = batch_bounds(n, pass_batch(info))
    got = {}
    for k in kinds:
        pieces = []
        for r in range(world):
            mine = shard(bounds, r, world)
            if mine:
                pieces.append(load_tensors(shard_file(out, k, mine[0][0], mine[-1][1]))["value"])
        got[k] = torch.cat(pieces)
    return got


# ----------------------------------------------------------------------------- training dynamics
def run_file(out: Path, r: int) -> Path:
    return out / WORK / f"run_{r:03d}.safetensors"


def record_run(cfg, r: int, train, test, info: DatasetInfo, device, out: Path, run_hash: str) -> None:
    """Train run ``r`` from scratch and record its rows: correct and margin (E, N) from each example's training pass,
    el2n (N,) after epoch --el2n-epoch. Checkpointed after every epoch; a finished run's file is kept."""
    path = run_file(out, r)
    if reusable(path, run_hash, what="a finished score run") is not None:
        logger.info(f"[score] run {r + 1}/{cfg.record_runs}: finished in {path}, kept")
        return
    ckpt = out / WORK / f"run_{r:03d}.pt"
    resume = reusable(ckpt, run_hash, what="an unfinished score run")
    n, epochs, el2n_after = len(train), cfg.record_epochs, cfg.el2n_after
    batch = min(cfg.batch_size, n)
    steps = math.ceil(n / batch)  # every example once per epoch, in near-equal batches (none of size 1 for BN)
    if resume is not None:
        logger.info(f"[score] run {r + 1}/{cfg.record_runs}: resuming after epoch {resume['epoch']}")
        correct, margin, el2n_ = resume["correct"], resume["margin"], resume.get("el2n")
    else:
        correct = torch.zeros(epochs, n, dtype=torch.uint8)
        margin = torch.zeros(epochs, n, dtype=torch.float32)
        el2n_ = None
    rngs = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=rngs):  # the caller's global RNG is left as it was
        torch.manual_seed(derive_seed(cfg.seed, "score-run", r))  # initial weights (overwritten by a resume)
        model = create_model(cfg.record_arch, info.num_classes, info.channels, info.resolution,
                             cfg.record_width).to(device)
        optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)

        def batches(epoch):
            gen = make_generator(cfg.seed, "score-run", r, epoch)  # data order, then every step's views
            torch.manual_seed(derive_seed(cfg.seed, "score-run", r, epoch, "global"))  # dropout, if the net has any
            for idx in torch.randperm(n, generator=gen).tensor_split(steps):
                yield train.get_images(idx), train.targets[idx], idx, gen, epoch

        def loss_fn(b):
            x, y, idx, gen, epoch = b
            x = normalize(x.to(device), info)
            if cfg.min_scale < 1 or cfg.flip:
                x = apply_views(x, sample_views(len(x), gen, (cfg.min_scale, 1.0), flip=cfg.flip))
            y = y.to(device)
            logits = model(x)
            ok, m = correct_and_margin(logits.detach(), y)  # the pass it is trained on: this view, train mode
            correct[epoch, idx] = ok.cpu().to(torch.uint8)
            margin[epoch, idx] = m.cpu()
            return {"total": F.cross_entropy(logits, y)}

        def epoch_state(done: int) -> dict:
            nonlocal el2n_
            if done == el2n_after:
                el2n_ = el2n_scores(model, train, info, device, pass_batch(info))
            return {"correct": correct, "margin": margin, "el2n": el2n_}

        result = fit(model, optimizer, batches, loss_fn, epochs=epochs, steps_per_epoch=steps, lr=cfg.lr,
                     schedule=cfg.schedule, warmup=cfg.warmup,
                     evaluate_fn=lambda: evaluate(model, test, info, device, num_workers=cfg.num_workers),
                     eval_every=epochs, checkpoint=ckpt, config_hash=run_hash, resume=resume,
                     log=JsonlLog(out / "logs" / f"run_{r:03d}.jsonl"),
                     desc=f"score run {r + 1}/{cfg.record_runs}", epoch_state=epoch_state)
    top1 = result["final"]["top1"]
    save_tensors({"correct": correct, "margin": margin, "el2n": el2n_}, path,
                 metadata={"config_hash": run_hash, "test_top1": f"{top1:.3f}"})
    ckpt.unlink(missing_ok=True)
    logger.info(f"[score] run {r + 1}/{cfg.record_runs}: test top-1 {top1:.2f}%, "
                f"{100 * correct[-1].float().mean():.1f}% of training passes correct in its last epoch")


def gather_runs(out: Path, runs: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Rank 0: every run's rows stacked (R, E, N) and (R, N), and each run's test top-1."""
    files = [run_file(out, r) for r in range(runs)]
    rows = [load_tensors(p) for p in files]
    top1 = [float(tensors_metadata(p)["test_top1"]) for p in files]
    return ({"correct": torch.stack([t["correct"] for t in rows]), "margin": torch.stack([t["margin"] for t in rows]),
             "el2n": torch.stack([t["el2n"] for t in rows])}, top1)


# ----------------------------------------------------------------------------- the stage
@locked_stage("score")
def score(cfg: ScoreConfig) -> Path:
    """Compute (or complete) the scores of ``cfg.kinds`` in ``cfg.out``; returns the folder."""
    timer = Timer()
    ctx = dist.init(cfg.device)
    device = ctx.device
    out = Path(cfg.out)
    train, test, info = load_splits(cfg)
    targets = train.targets.to(torch.int64)
    data = data_record(cfg, info, targets)
    asked = cfg.kind_list
    settings = {k: kind_settings(cfg, k, data) for k in asked}  # a missing teacher is refused here, before any work
    kept, recorded = {}, {}
    if ctx.is_main:
        if cfg.force:
            if (out / MANIFEST).exists():
                read_manifest(out, "score", "--out")  # --force never clears another stage's folder
            clear_outputs(out, SCORES_FILE, "logs/run_*.jsonl")
            shutil.rmtree(out / WORK, ignore_errors=True)
        kept, recorded = kept_scores(out, settings, targets)
    dist.barrier(ctx)
    finished, have = (out / MANIFEST).exists(), present_kinds(out)  # as rank 0 left the folder, on every rank
    todo = [k for k in asked if k not in have]
    if ctx.is_main:
        if not todo and finished:
            logger.info(f"[score] {out} holds {', '.join(have)} scores made with these settings; nothing to do "
                        f"(use --force to redo them)")
        elif have:
            logger.info(f"[score] keeping the {', '.join(have)} scores in {out}; computing "
                        f"{', '.join(todo) or 'nothing new'}")
    if not todo and finished:
        dist.barrier(ctx)
        return out
    (out / WORK).mkdir(parents=True, exist_ok=True)
    dist.barrier(ctx)
    passes = [k for k in todo if k in PASS_KINDS]
    if passes:
        forward_pass(cfg, passes, settings, train, info, device, out, ctx)
    runs_top1 = None
    if "dynamics" in todo:
        run_hash = digest(settings["dynamics"])
        for r in range(cfg.record_runs):
            if r % ctx.world_size == ctx.rank:
                record_run(cfg, r, train, test, info, device, out, run_hash)
    dist.barrier(ctx)
    if ctx.is_main:
        tensors = dict(kept, targets=targets)
        tensors.update(gather_pass(out, passes, len(train), info, ctx.world_size))
        if "dynamics" in todo:
            rows, runs_top1 = gather_runs(out, cfg.record_runs)
            tensors.update(rows)
        made = {**recorded, **{k: settings[k] for k in todo}}
        old = read_json(out / MANIFEST) if finished else {}
        (out / MANIFEST).unlink(missing_ok=True)  # the folder is unfinished until its new manifest seals the new file
        save_scores(out, tensors, settings=made)
        shutil.rmtree(out / WORK, ignore_errors=True)
        kinds = present_kinds(out)
        # kept kinds: the teacher digest they recorded; kinds read now: the teacher's weights as they are
        digests = {f"teacher {s['arch']}": s["teacher_sha256"] for s in made.values() if "teacher_sha256" in s}
        if "entropy" in asked or ("embedding" in asked and EMBEDDERS.get(cfg.embed).uses_teachers):
            digests.update(teacher_digests({cfg.embed_arch: teacher_folder(cfg.teachers, cfg.embed_arch)}))
        runs = runs_top1 if runs_top1 is not None else (old.get("outputs") or {}).get("runs_test_top1")
        write_manifest(out, "score", cfg,
                       inputs={"dataset": info.to_dict(), "kinds": made, "digests": digests,
                               **({"embedder": made["embedding"]["embed"]} if "embedding" in made else {})},
                       outputs={"files": seal_files(out, [SCORES_FILE]), "kinds": kinds, "n": len(train),
                                **({"runs_test_top1": runs} if runs is not None else {})},
                       wall_time=timer.elapsed, extra={"world_size": ctx.world_size})
        logger.info(f"[score] {', '.join(kinds)} scores of {len(train)} {info.name} training images -> "
                    f"{out / SCORES_FILE} ({timer.elapsed:.1f}s)")
    dist.barrier(ctx)
    return out
