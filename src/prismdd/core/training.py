"""Supervised training every stage shares: the one training loop (``fit``), evaluation, LR schedules,
optimisers, and what a frozen network says about images (penultimate features, per-example scores,
ensemble logits).

Size: a little over 400 lines. The loop (``fit``) sits with what it is made of (schedules, optimiser groups, the
parameter EMA, evaluation), so a stage's student, teacher and audit model all train by one definition; the
readers of a frozen network (the last section: features, per-example scores, ensemble logits, fixed soft labels)
could stand alone, and stay beside ``evaluate``, whose eval-mode and normalisation rules they follow."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DatasetInfo, iterate_batches, normalize
from .errors import PrismError
from .io import JsonlLog, torch_save
from .models import FeatureExtractor
from .runtime import Heartbeat, Timer, progress
from .log import get_logger

logger = get_logger("train")

FEATURE_BATCH = 256  # images per forward pass when extracting features (no gradients)
SCORE_BATCH = 500  # images per forward pass when scoring examples
PHI_CLIP = 1e4  # |phi| beyond this is clipped (a float32 softmax saturates long before)


SCHEDULES = ("cosine", "decayed_cosine", "half_cosine", "half_linear", "linear", "warmup_cosine", "step_half")
STEP_DROP = 0.1  # step_half: the LR after the drop (DC-bench's and Hard Truths' MultiStepLR gamma)
WARMUP_COSINE_FLOOR = 0.01  # FRePo's eval.py: optax warmup_cosine_decay_schedule ends at 0.01 x the peak
OPTIMIZERS = ("adamw", "sgd", "adam")


def lr_factor(schedule: str, progress: float, warmup: float = 0.0) -> float:
    """Multiplier of the base LR at ``progress`` in [0, 1] of training.

    ``decayed_cosine``: PRISM's "decayed cosine" exactly as its ``validate/train_FKD_parallel.py``
    (``--cos``), with t = progress * E: 0.5 (1 + cos(pi t / (2.5 E))) for t <= 5E/6 (0.75 at the knee),
    then 0.5 (1 + cos(pi 5 / (6 * 2.5))) * (6E - 6t) / (6E) = 0.75 (1 - p): a DROP to 0.125 just after
    the knee, then a linear fall to 0. ``half_cosine``: 0.5 (1 + cos(pi p / 2)),
    the first half of a cosine period, 1 -> 0.5 (RDED/DELT's ``--cos``: ``math.pi * step / re_epochs / 2``;
    EDC's intent, ``--ls-type cos --st 2``). ``half_linear``: 1 - p / 2, 1 -> 0.5 in a straight line: what EDC's
    ``train_FKD_parallel.py`` actually runs, because its ``else`` branch replaces the cosine LambdaLR it built
    (FIDELITY.md, student protocols). ``warmup_cosine``: after the linear warm-up, a cosine over the REST of
    training from 1 to 0.01 (FRePo's ``eval.py:221-225``); the other schedules keep their curve over the whole run.
    ``step_half``: 1, then 0.1 from half of training on (the hard-label regime's step decay).
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    if schedule == "warmup_cosine":  # the cosine runs over what is left after the warm-up, down to the floor
        q = (p - warmup) / (1 - warmup) if warmup < 1 else 1.0
        return WARMUP_COSINE_FLOOR + (1 - WARMUP_COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * q))
    if schedule == "step_half":  # one drop x0.1 after half of training (ca2d's MultiStepLR at epoch 151 of 300)
        return 1.0 if p < 0.5 else STEP_DROP
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "half_cosine":
        return 0.5 * (1 + math.cos(math.pi * p / 2))
    if schedule == "linear":
        return 1.0 - p
    if schedule == "half_linear":
        return 1.0 - p / 2
    if schedule == "decayed_cosine":
        knee = 5 / 6
        at = lambda q: 0.5 * (1 + math.cos(math.pi * q / 2.5))
        return at(p) if p <= knee else at(knee) * (1 - p)
    raise PrismError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")


def half_sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FRePo's MSE (``lib/training/metrics.py:47-55``): half the squared error summed over classes, mean over
    examples. Its distillation loss and its student's regression onto label vectors (``validate --loss mse``)."""
    return 0.5 * (pred - target).pow(2).sum(1).mean()


DECAY_EXEMPT = ("1d", "none")


def decay_groups(model: nn.Module, weight_decay: float, exempt: str = "1d") -> list[dict]:
    """Parameter groups for the optimiser. ``1d``: as every reference's ``get_parameters`` (PRISM
    ``validate/utils.py``, SRe2L ``train_FKD.py``, RDED, DELT, G-VBSM, EDC, DWA, D4M): a parameter decays only if
    its name holds ``weight`` and it has more than one dimension (conv and linear kernels); biases and BatchNorm's
    affine parameters get weight decay 0. Over 300 epochs of AdamW 1e-3 / 0.01 a decayed BN scale shrinks by a
    factor up to 0.63 (issue 26), so this is a real difference. ``none``: every parameter decays."""
    if exempt not in DECAY_EXEMPT:
        raise PrismError(f"--decay-exempt {exempt!r}: expected one of {', '.join(DECAY_EXEMPT)}")
    named = list(model.named_parameters())
    if exempt == "none":
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    decay = [p for n, p in named if "weight" in n and p.ndim > 1]
    rest = [p for n, p in named if not ("weight" in n and p.ndim > 1)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = True):
    """``params``: an iterable of tensors or of parameter groups (``decay_groups``); a group's own
    ``weight_decay`` wins over the default given here."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise PrismError(f"optimizer {name!r}: expected adamw, sgd or adam")


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


EVAL_PIXELS = 500 * 64 * 64  # pixels per evaluation batch: 500 images up to 64 px, fewer above (224 px: 40)


@torch.no_grad()
def evaluate(model: nn.Module, split, info: DatasetInfo, device, batch_size: int | None = None,
             num_workers: int = 0, channels_last: bool = False) -> dict:
    """Top-1/top-5 (percent) and mean CE loss of ``model`` on a split. The default batch shrinks with the
    resolution: 500 images of 224 px peaked at 5-7 GB per process on CPU (BENCHMARKS.md section 7)."""
    if batch_size is None:
        batch_size = max(16, min(500, EVAL_PIXELS // (info.resolution ** 2)))
    model.eval()
    n, c1, c5, loss = 0, 0, 0, 0.0
    for x, y in iterate_batches(split, batch_size, shuffle=False, num_workers=num_workers):
        x = normalize(x.to(device), info)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), 1).indices
        c1 += (top[:, 0] == y).sum().item()
        c5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "n": n}


AT_CHANCE = 0.1  # a network below chance + 10 % of the way to 100 % has learnt next to nothing
WEAK = 0.5  # below halfway from chance to 100 %: usable, but its labels and statistics deserve a warning


def trust(top1: float | None, num_classes: int) -> str | None:
    """How far a teacher's (or the observer's) test top-1 is from chance: ``"at chance"``, ``"weak"`` or
    ``"ok"`` (None: not measured). Relative to chance, so it means the same on 3 classes and on 1000."""
    if top1 is None or num_classes < 2:
        return None
    chance = 100.0 / num_classes
    if top1 < chance + AT_CHANCE * (100 - chance):
        return "at chance"
    return "weak" if top1 < chance + WEAK * (100 - chance) else "ok"


def trust_line(role: str, arch: str, top1: float, num_classes: int) -> str | None:
    """One line for a teacher or observer that is not "ok"; None otherwise."""
    level = trust(top1, num_classes)
    if level in (None, "ok"):
        return None
    chance = 100.0 / num_classes
    bar = chance + (AT_CHANCE if level == "at chance" else WEAK) * (100 - chance)
    return (f"{role} {arch}: test top-1 {top1:.1f}% on {num_classes} classes is {level} (chance {chance:.1f}%, "
            f"{'at chance' if level == 'at chance' else 'weak'} below {bar:.1f}%); train it longer or with a smaller "
            f"batch, or leave it out")


class ParamEMA:
    """Exponential moving average of a model's PARAMETERS (not its buffers), as EDC's ``EMAMODEL``:
    started from the initial weights, ``update`` after every optimiser step (ema = d * ema + (1 - d) * w),
    and ``swapped_in`` evaluates the model with the averaged parameters and its own live BatchNorm buffers
    (EDC's ``ema_swap`` exchanges ``parameters()`` only)."""

    def __init__(self, model: nn.Module, decay: float, state: list[torch.Tensor] | None = None):
        self.model, self.decay = model, decay
        params = list(model.parameters())
        self.shadow = [p.detach().clone() for p in params] if state is None else [s.to(p.device) for s, p in
                                                                                   zip(state, params)]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.model.parameters()):
            s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.model.parameters()):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def swapped_in(self, fn: Callable[[], dict]) -> dict:
        self.swap()
        try:
            return fn()
        finally:
            self.swap()


def check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss):
        raise PrismError(f"{what}: loss became {loss.item()}; lower the learning rate or check the inputs")


# ----------------------------------------------------------------------------- the training loop
def fit(model: nn.Module, optimizer, batches: Callable[[int], Iterable], loss_fn: Callable[..., dict], *,
        epochs: int, steps_per_epoch: int, lr: float, schedule: str, warmup: float = 0.0, lr_every: str = "step",
        evaluate_fn: Callable[[], dict], eval_every: int, checkpoint: Path, config_hash: str,
        resume: dict | None, log: JsonlLog | None, desc: str, is_main: bool = True, verbose: bool = False,
        ema_decay: float = 0.0, epoch_state: Callable[[int], dict] | None = None) -> dict:
    """Train ``model`` for ``epochs`` epochs, resumably; the one loop behind teachers and students.

    ``batches(epoch)`` yields each epoch's batches (at most ``steps_per_epoch`` are used); ``loss_fn(batch)``
    returns named loss terms with the optimised one under ``"total"``, or an iterator of ``(terms, weight)``
    pairs, one per micro-batch (gradient accumulation): each is backpropagated as ``weight * total`` before the
    next is computed, so only one micro-batch's graph is alive at a time; one optimiser step follows. The LR follows ``schedule`` over
    all steps (``lr_every="step"``) or changes once per epoch (``"epoch"``). Test accuracy (``evaluate_fn``) every ``eval_every`` epochs and after the last. After every
    epoch ``checkpoint`` holds model, optimiser, epoch and the accuracy curve (written by the main process;
    the log line follows it, so a kill in between never logs an epoch twice). ``resume``: such a
    checkpoint, already checked against ``config_hash`` by the caller's resume guard. ``verbose``: print a
    line per evaluation (teachers; students show it on their progress bar). Without a terminal every fit prints a
    ``Heartbeat`` line at least once a minute (epoch, step, loss, elapsed, time left). ``ema_decay`` > 0: an EMA of the
    parameters (``ParamEMA``) is updated after every step and every evaluation uses it (EDC); at the end the
    model holds the averaged parameters, the weights the final accuracy was measured with. ``epoch_state(n)``: called
    after each epoch (``n`` epochs finished), before the checkpoint is written; what it returns goes into that
    checkpoint, so a caller's per-epoch records (the score stage's per-example rows) resume with the weights.
    Returns ``{"curve", "final", "seconds"}``; ``seconds`` counts time before a resume too.
    """
    start, curve, before = 0, [], 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start, curve, before = int(resume["epoch"]), list(resume.get("curve", [])), float(resume.get("elapsed", 0.0))
    ema = ParamEMA(model, ema_decay, resume.get("ema") if resume else None) if ema_decay > 0 else None
    measure = (lambda: ema.swapped_in(evaluate_fn)) if ema is not None else evaluate_fn
    timer = Timer()
    total_steps = max(1, epochs * steps_per_epoch)
    # without a terminal (a log file, nohup, CI) the bar is silent: a line a minute says where training is
    beat = Heartbeat(desc, total_steps, done=start * steps_per_epoch, enabled=is_main)
    for epoch in range(start, epochs):
        model.train()
        bar = progress(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=None if is_main else True)
        running, steps = 0.0, 0
        for step, batch in enumerate(batches(epoch)):
            if step >= steps_per_epoch:
                break
            # "epoch": the LR changes once per epoch, as a LambdaLR stepped after each epoch (the reference code)
            at = epoch / epochs if lr_every == "epoch" else (epoch * steps_per_epoch + step) / total_steps
            set_lr(optimizer, lr * lr_factor(schedule, at, warmup))
            optimizer.zero_grad(set_to_none=True)
            out = loss_fn(batch)
            loss = 0.0
            for terms, weight in ([(out, 1.0)] if isinstance(out, dict) else out):
                check_finite(terms["total"], f"{desc} epoch {epoch + 1}")
                (terms["total"] * weight).backward()
                loss += weight * float(terms["total"].detach())
            optimizer.step()
            if ema is not None:
                ema.update()
            running += loss
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / steps:.3f}")
            beat.step(loss=running / steps, epoch=f"{epoch + 1}/{epochs}")
        beat.done = (epoch + 1) * steps_per_epoch  # an epoch shorter than steps_per_epoch (a small last pass)
        bar.close()
        record = {"epoch": epoch + 1, "train_loss": running / max(steps, 1), "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % max(1, eval_every) == 0 or epoch + 1 == epochs:
            ev = measure()
            record.update(test_top1=ev["top1"], test_top5=ev["top5"])
            curve.append({"epoch": epoch + 1, "top1": round(ev["top1"], 3), "top5": round(ev["top5"], 3)})
            if verbose and is_main:  # the steps too: an "epoch" here may be part of a pass (run's teacher steps)
                logger.info(f"[{desc}] epoch {epoch + 1}/{epochs} "
                            f"(step {(epoch + 1) * steps_per_epoch}/{total_steps}): "
                            f"train loss {record['train_loss']:.4f}, test top-1 {ev['top1']:.2f}%")
        extra = epoch_state(epoch + 1) if epoch_state is not None else {}
        if is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "curve": curve, "elapsed": before + timer.elapsed, "config_hash": config_hash, **extra}
            if ema is not None:
                state["ema"] = ema.shadow
            torch_save(state, checkpoint)
            if log is not None:
                log.write(**record)
    if not curve or curve[-1]["epoch"] != epochs:  # nothing trained here (0 epochs): measure what we have
        ev = measure()
        curve.append({"epoch": epochs, "top1": round(ev["top1"], 3), "top5": round(ev["top5"], 3)})
    if ema is not None:  # the model leaves with the weights its accuracy was measured with
        ema.swap()
    return {"curve": curve, "final": curve[-1], "seconds": before + timer.elapsed}


# ----------------------------------------------------------------------------- what a frozen network says
def extract_features(images_uint8: torch.Tensor, info: DatasetInfo, model: nn.Module, device,
                     batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Penultimate (pre-classifier) features of uint8 (N, C, H, W) images -> float (N, D) on the CPU.

    The model runs in eval mode (running BN statistics, so a feature never depends on its batch-mates);
    its previous mode is restored afterwards.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.eval()
    extractor = FeatureExtractor(model)
    feats = []
    try:
        for s in range(0, len(images_uint8), batch_size):
            x = normalize(images_uint8[s: s + batch_size].to(device), info)
            f, _ = extractor(x)
            feats.append(f.float().cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, 0)
    return torch.cat(feats)


def _true_class_stats(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, phi) per example from logits (B, K): phi = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j,
    computed without forming 1 - p (which underflows to 0 for a confident model)."""
    z = logits.float()
    loss = F.cross_entropy(z, y, reduction="none")
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    phi = (z_y - torch.logsumexp(others, dim=1)).clamp(-PHI_CLIP, PHI_CLIP)
    return loss, phi


@torch.no_grad()
def example_scores(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, info: DatasetInfo, device,
                   *, flip: bool = False, batch_size: int = SCORE_BATCH) -> dict[str, np.ndarray]:
    """Per-example ``loss``, true-class ``confidence``, its logit ``logit_confidence`` = log(p / (1 - p))
    and the LiRA statistic ``phi`` of ``model`` (eval mode), as float64 numpy arrays (N,).

    ``images``: uint8 (N, C, H, W); ``targets``: (N,) the labels the model was trained with. ``flip``:
    ``phi`` is the mean of the logit over the image and its horizontal flip (the others: the image alone).
    """
    model.eval()
    device = torch.device(device)
    losses, plain, phis = [], [], []
    for s in range(0, len(targets), batch_size):
        x = normalize(images[s: s + batch_size].to(device), info)
        y = torch.as_tensor(targets[s: s + batch_size]).long().to(device)
        loss, phi = _true_class_stats(model(x), y)
        plain.append(phi.cpu())
        if flip:
            phi = 0.5 * (phi + _true_class_stats(model(x.flip(-1)), y)[1])
        losses.append(loss.cpu())
        phis.append(phi.cpu())
    loss = torch.cat(losses).double().numpy()
    return {"loss": loss, "confidence": np.exp(-loss), "logit_confidence": torch.cat(plain).double().numpy(),
            "phi": torch.cat(phis).double().numpy()}


ENSEMBLES = ("mean", "norm-matched", "norm-matched-sample", "weighted")


def combine_logits(logits: list[torch.Tensor], how: str, primary_weight: float = 0.5) -> torch.Tensor:
    """Ensemble of teacher logits (B, K) each.

    ``norm-matched`` (the reference, ``relabel/generate_soft_label_r18.py``): each teacher's logits are
    divided by the Frobenius norm of that teacher's WHOLE batch (B, K) and multiplied by the mean of those
    norms over teachers, then averaged. ``norm-matched-sample``: the same with a per-sample L2 norm (each
    image's logit vector), so no teacher dominates any single image by scale.
    """
    if len(logits) == 1:
        return logits[0]
    stack = torch.stack(logits)  # (T, B, K)
    if how == "mean":
        return stack.mean(0)
    if how in ("norm-matched", "norm-matched-sample"):
        dims = (1, 2) if how == "norm-matched" else (2,)
        norms = torch.linalg.vector_norm(stack, dim=dims, keepdim=True).clamp_min(1e-12)  # (T, 1, 1) | (T, B, 1)
        return (stack / norms * norms.mean(0, keepdim=True)).mean(0)
    if how == "weighted":
        rest = (1 - primary_weight) / (len(logits) - 1)
        w = torch.tensor([primary_weight] + [rest] * (len(logits) - 1), device=stack.device).view(-1, 1, 1)
        return (stack * w).sum(0)
    raise PrismError(f"ensemble {how!r}: expected one of {', '.join(ENSEMBLES)}")


FIXED_LABEL_BATCH = 256  # images per teacher forward when the fixed labels are computed (no gradients)


@torch.no_grad()
def fixed_soft_logits(labeler, data, info: DatasetInfo, device, batch: int = FIXED_LABEL_BATCH) -> torch.Tensor:
    """Teacher (ensemble) logits (N, K) of every image of ``data`` as it is, un-augmented: whole, unflipped, unmixed,
    normalised as the student sees it at test time (the soft regime's fixed labels). Each image goes through the
    teachers exactly once."""
    out = [labeler(normalize(data.get_images(torch.arange(i, min(i + batch, len(data)))).to(device), info)).float().cpu()
           for i in range(0, len(data), batch)]
    return torch.cat(out) if out else torch.zeros(0, info.num_classes)


def fixed_soft_labels(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): the per-image label the student is trained towards at the same T (KL x T^2)."""
    return torch.softmax(logits / temperature, dim=1)


class SoftLabeler:
    """Teacher (ensemble) logits on given inputs; the same object serves relabel and online validation."""

    def __init__(self, teachers: list[nn.Module], names: list[str], ensemble: str = "mean", primary_weight: float = 0.5):
        self.teachers, self.names, self.ensemble, self.primary_weight = teachers, names, ensemble, primary_weight
        # teachers that gave NaN/inf logits so far: one such teacher makes a norm-matched ensemble non-finite for
        # every view, so the finite-label checks name it rather than the whole ensemble
        self.non_finite: list[str] = []

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [t(x).float() for t in self.teachers]
        for name, out in zip(self.names, outs):
            if name not in self.non_finite and not torch.isfinite(out).all():
                self.non_finite.append(name)
        return combine_logits(outs, self.ensemble, self.primary_weight)

    @property
    def suspects(self) -> list[str]:
        """The teachers to name when the labels are not finite: those that gave NaN/inf logits, else all."""
        return self.non_finite or self.names
