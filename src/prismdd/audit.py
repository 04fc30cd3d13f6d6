"""audit: membership-inference audit of PRISM's privacy claim (METHOD.md section 6, seed Appendix A).

The paper argues by analogy to PATE that disagreeing teacher architectures protect individual training
images. That is not a differential-privacy guarantee, so prismdd *measures* what an attacker learns:

Set-up
    An audit **pool** is drawn from the training split. The **target** pipeline is trained on a random half
    of it (the members; the other half are non-members). A pipeline is: teachers (squeeze) -> distilled
    set (recover: PRISM, SRe2L) -> student (validate), or a student on a random real subset with the same
    IPC. Every stage is the existing one, restricted to the members with its ``subset`` option.
    **Shadow** pipelines are the same pipeline on other random halves of the pool, in complementary
    pairs, so every example is IN for exactly half of an even number of shadows.
Targets
    ``teacher`` (the primary teacher itself), ``prism`` / ``sre2l`` (students of the distilled sets),
    ``random-real`` (a student of IPC real member images with the same soft-label protocol).
Attacks
    ``threshold``: the true-class confidence (rank-equivalent to the negative loss; scored as its logit,
    which does not saturate in float32); needs no shadows.
    ``lira-offline`` / ``lira-online``: the likelihood-ratio attack of Carlini et al. (2022) on
    phi = log(p / (1 - p)) of the true class, averaged over the image and its flip: online compares
    Gaussians fitted to the shadows' phi where the example was IN and OUT; offline uses the OUT Gaussian
    only (a one-sided test). With few shadows one global variance per group is used (the paper's advice).
Metrics
    ROC AUC and TPR at 0.1 % and 1 % FPR (read off the piecewise-linear ROC), with percentile bootstrap
    confidence intervals (members and non-members resampled separately, seeded), the counts behind them,
    and a log-log ROC plot. Rows are computed on three example sets: ``pool`` (every non-canary pool
    example), ``direct`` (only the members whose pixels entered the student's training set directly: the
    real-image initialisation of PRISM, the random real subset; non-members as in ``pool``) and ``canaries``.

Output in ``out/``: ``audit.json``, ``audit_roc.png``, ``manifest.json``, ``plan.json`` (pool, halves,
canaries) and ``models/<target|shadow_NN>/`` (one folder per pipeline: its member indices, teachers,
distilled sets, students and a log of the stages' output). Every trained model lives in its own folder
and the stages skip finished work, so re-running the same command resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CommonConfig, build_config, comma_list, config_to_dict
from .data import DATASETS, DatasetInfo, TensorImages, class_indices, load_dataset, load_indices, normalize
from .utils import (PrismError, Timer, derive_seed, make_generator, read_json, resolve_device, write_json,
                    write_manifest)

TARGETS = ("teacher", "prism", "sre2l", "random-real")
DISTILLED = ("prism", "sre2l")  # targets whose student learns from a recover output
ATTACKS = ("threshold", "lira-offline", "lira-online")
CANARY_KINDS = ("mislabel", "outlier")
LIRA_VARIANCES = ("auto", "global", "per-example")
FPR_POINTS = {"tpr_at_0.1pct_fpr": 0.001, "tpr_at_1pct_fpr": 0.01}  # metric name -> false-positive rate
CI_LEVEL = 0.95  # two-sided percentile bootstrap interval
GLOBAL_VARIANCE_BELOW = 64  # auto: one variance per group below this many shadows (Carlini et al. 2022, Fig. 6)
PER_EXAMPLE_STD_FLOOR = 0.1  # per-example variance: std floored at this share of the global std (few observations)
SCORE_BATCH = 500  # pool images per forward pass when scoring
PHI_CLIP = 1e4  # |phi| beyond this is clipped (a float32 softmax saturates long before)
NOTE = ("Empirical membership-inference attack measurement on this run: it bounds what these attacks "
        "achieve, not what any attack could. It is not a differential-privacy guarantee (no gradient "
        "clipping, no calibrated noise, teachers trained on the same data). AUC 0.5 and TPR equal to the "
        "FPR are chance level.")

# settings left unset (None) are filled from these: quick = tiny everything (digits: about 2 minutes on
# 2 CPU cores); default = a small audit that still finishes on a CPU (more shadows on a GPU)
QUICK = dict(pool_size=1000, shadow_models=2, bn_pool="convnet,resnet18", width=0.25, teacher_epochs=30,
             iterations=50, student_width=0.25, student_epochs=60, threads=1)
DEFAULTS = dict(pool_size=2000, shadow_models=4, bn_pool="convnet,resnet18,mobilenet_v2", width=0.5,
                teacher_epochs=20, iterations=300, student_width=0.5, student_epochs=300, threads=None)
SHADOWS_ON_GPU = 16  # default shadow count when the device is CUDA (LiRA gets much sharper with more)

# settings that decide what each model is trained on / how: a re-run into the same folder must agree on them
TRAINING_KEYS = ("dataset", "data_root", "resolution", "subset", "seed", "pool_size", "background", "canaries",
                 "canary_kind", "teacher_arch", "bn_pool", "width", "teacher_epochs", "teacher_batch_size", "ipc", "iterations",
                 "student", "student_width", "student_epochs", "student_protocol")


@dataclass
class AuditConfig(CommonConfig):
    out: str = "runs/audit"
    quick: bool = False  # tiny everything (digits: about 2 minutes on 2 CPU cores); settings you give still win
    targets: str = "teacher,prism,sre2l,random-real"  # comma list of attacked models
    attacks: str = "threshold,lira-offline,lira-online"  # comma list; LiRA needs shadow models (online: >= 2)
    pool_size: int | None = None  # audit pool drawn from the train split; None: 2000 (quick 1000), capped at the split
    background: int = 0  # extra train images outside the pool that every model trains on (not scored; realism)
    shadow_models: int | None = None  # shadow pipelines on random halves of the pool; None: 4 on CPU, 16 on GPU (quick 2); 0: threshold only
    canaries: int = 0  # pool examples turned into canaries (audited separately as examples=canaries)
    canary_kind: str = "mislabel"  # mislabel (a wrong class) | outlier (a uniform-noise image with a random class)
    teacher_arch: str = "convnet"  # the teacher target, and the primary (logit) teacher of PRISM and SRe2L
    bn_pool: str | None = None  # PRISM's BN-teacher pool; None: convnet,resnet18,mobilenet_v2 (quick: convnet,resnet18)
    width: float | None = None  # width multiplier of every teacher; None: 0.5 (quick 0.25)
    teacher_epochs: int | None = None  # None: 20 (quick 30); teachers see only half the pool, so more epochs than usual
    teacher_batch_size: int = 128  # squeeze batch size; smaller gives more steps per epoch on a small member set
    ipc: int = 10  # images per class of the distilled sets and of the random real subset
    iterations: int | None = None  # recovery iterations per image; None: 300 (quick 50)
    student: str = "convnet"  # student architecture (one)
    student_width: float | None = None  # None: 0.5 (quick 0.25)
    student_epochs: int | None = None  # None: 300 (quick 60)
    student_protocol: str = "prism"  # one validate protocol for every student, so only the training images differ
    query_flip: bool = True  # LiRA: average phi over the image and its horizontal flip (both seen in training)
    lira_variance: str = "auto"  # auto (global below 64 shadows, Carlini et al. 2022) | global | per-example
    bootstrap: int = 200  # bootstrap resamples for the confidence intervals (0: no intervals)
    threads: int | None = None  # torch CPU threads while auditing; None: torch's default (quick: 1, tiny nets run faster)
    force: bool = False  # retrain every model of the audit

    def validate(self):
        bad = [t for t in self.target_list if t not in TARGETS]
        if bad or not self.target_list:
            raise PrismError(f"--targets {self.targets!r}: expected a comma list of {', '.join(TARGETS)}")
        bad = [a for a in self.attack_list if a not in ATTACKS]
        if bad or not self.attack_list:
            raise PrismError(f"--attacks {self.attacks!r}: expected a comma list of {', '.join(ATTACKS)}")
        if self.canary_kind not in CANARY_KINDS:
            raise PrismError(f"--canary-kind {self.canary_kind!r}: expected one of {', '.join(CANARY_KINDS)}")
        if self.lira_variance not in LIRA_VARIANCES:
            raise PrismError(f"--lira-variance {self.lira_variance!r}: expected one of {', '.join(LIRA_VARIANCES)}")
        if "," in self.student:
            raise PrismError(f"--student {self.student!r}: the audit trains one student architecture")
        for name in ("pool_size", "shadow_models", "teacher_epochs", "iterations", "student_epochs", "threads"):
            v = getattr(self, name)
            if v is not None and v < (4 if name == "pool_size" else 0):
                raise PrismError(f"{name}={v}: must be >= {4 if name == 'pool_size' else 0}")
        if self.background < 0 or self.canaries < 0 or self.bootstrap < 0 or self.ipc < 1 or self.teacher_batch_size < 1:
            raise PrismError("background, canaries and bootstrap must be >= 0; ipc and teacher_batch_size >= 1")

    @property
    def target_list(self) -> list[str]:
        return comma_list(self.targets)

    @property
    def attack_list(self) -> list[str]:
        return comma_list(self.attacks)


def resolve_config(cfg: AuditConfig) -> AuditConfig:
    """Fill every unset (None) setting from QUICK or DEFAULTS; the result is what the manifest records."""
    table = QUICK if cfg.quick else DEFAULTS
    fills = {k: v for k, v in table.items() if getattr(cfg, k) is None}
    if "shadow_models" in fills and not cfg.quick and resolve_device(cfg.device).type == "cuda":
        fills["shadow_models"] = SHADOWS_ON_GPU
    return dataclasses.replace(cfg, **fills)


# ----------------------------------------------------------------------------- metrics
def _rankable(scores) -> np.ndarray:
    """Scores as finite floats with the same order (ROC metrics depend on ranks only); NaN ranks lowest."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    if np.isfinite(s).all():
        return s
    return rankdata(np.where(np.isnan(s), -np.inf, s)).astype(np.float64)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """TPR of the piecewise-linear ROC at false-positive rate ``at`` (points between two thresholds are
    reachable by randomising between them). At a vertical step the top of the step counts."""
    j = int(np.searchsorted(fpr, at, side="right"))  # first point with fpr > at
    if j >= len(fpr):
        return float(tpr[-1])
    i = j - 1  # last point with fpr <= at: the top of its vertical step (roc_curve's order)
    if i < 0:
        return 0.0
    return float(tpr[i] + (tpr[j] - tpr[i]) * (at - fpr[i]) / (fpr[j] - fpr[i]))


def roc_metrics(scores, is_member, *, curve: bool = False) -> dict:
    """AUC and TPR at 0.1 % and 1 % FPR of a score (higher = "member") against the true membership."""
    from sklearn.metrics import auc, roc_curve

    y = np.asarray(is_member, dtype=bool)
    if y.all() or not y.any():
        raise PrismError("membership metrics need at least one member and one non-member")
    s = _rankable(scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out = {"auc": float(auc(fpr, tpr))}  # trapezoids under the full curve = roc_auc_score
    out.update({name: tpr_at_fpr(fpr, tpr, at) for name, at in FPR_POINTS.items()})
    if curve:
        out["fpr"], out["tpr"] = fpr, tpr
    return out


def bootstrap_ci(scores, is_member, n: int = 200, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """Percentile bootstrap intervals ``{metric: [low, high]}`` of ``roc_metrics``.

    Members and non-members are resampled separately (with replacement), so each resample keeps the
    counts; the resamples are drawn from (seed, 'audit', 'bootstrap').
    """
    if n <= 0:
        return {}
    y = np.asarray(is_member, dtype=bool)
    s = _rankable(scores)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(derive_seed(seed, "audit", "bootstrap"))
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for k, v in roc_metrics(s[idx], y[idx]).items():
            draws.setdefault(k, []).append(v)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: [float(x) for x in np.percentile(v, q)] for k, v in draws.items()}


# ----------------------------------------------------------------------------- per-example scores
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


# ----------------------------------------------------------------------------- attacks
def fit_gaussians(shadow_phi: np.ndarray, shadow_in: np.ndarray, variance: str = "global") -> dict:
    """Per-example IN and OUT Gaussians of the shadows' phi.

    ``shadow_phi``, ``shadow_in``: (S, N). ``variance``: ``global`` = one std per group over every
    observation (Carlini et al.'s fixed variance), ``per-example`` = each example's own std (floored).
    An example with no observation in a group gets that group's global mean.
    """
    phi = np.asarray(shadow_phi, dtype=np.float64)
    inn = np.asarray(shadow_in, dtype=bool)
    out = {}
    for group, mask in (("in", inn), ("out", ~inn)):
        count = mask.sum(0)
        glob_mean = float(phi[mask].mean()) if mask.any() else float("nan")
        glob_std = float(phi[mask].std()) if mask.sum() > 1 else 1.0
        glob_std = glob_std if glob_std > 0 else 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, (phi * mask).sum(0) / np.maximum(count, 1), glob_mean)
            if variance == "per-example":
                var = ((phi - mean) ** 2 * mask).sum(0) / np.maximum(count, 1)
                std = np.maximum(np.sqrt(var), PER_EXAMPLE_STD_FLOOR * glob_std)
                std = np.where(count > 1, std, glob_std)
            else:
                std = np.full(phi.shape[1], glob_std)
        out[f"mean_{group}"], out[f"std_{group}"], out[f"count_{group}"] = mean, std, count
    return out


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray, *, online: bool,
                variance: str = "global") -> np.ndarray:
    """LiRA membership score per example (higher = member).

    online: log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out). offline: the one-sided test against the
    OUT Gaussian, -log Pr[Z >= phi] (monotone in phi's z-score, and finite far into the tail).
    """
    from scipy.stats import norm

    g = fit_gaussians(shadow_phi, shadow_in, variance)
    phi = np.asarray(target_phi, dtype=np.float64)
    if online:
        return norm.logpdf(phi, g["mean_in"], g["std_in"]) - norm.logpdf(phi, g["mean_out"], g["std_out"])
    return -norm.logsf(phi, g["mean_out"], g["std_out"])


def attack_scores(attack: str, target: dict[str, np.ndarray], shadow_phi: np.ndarray | None,
                  shadow_in: np.ndarray | None, variance: str = "global") -> np.ndarray:
    """Scores of one attack on the target's per-example stats (from ``example_scores``)."""
    if attack == "threshold":
        # logit(confidence) ranks exactly like the confidence and the negative loss, but does not saturate:
        # in float32 the loss of a confident model rounds to exactly 0 and ties members with non-members
        return target["logit_confidence"]
    if attack in ("lira-offline", "lira-online"):
        return lira_scores(target["phi"], shadow_phi, shadow_in, online=attack == "lira-online", variance=variance)
    raise PrismError(f"attack {attack!r}: expected one of {', '.join(ATTACKS)}")


# ----------------------------------------------------------------------------- the plan
def shadow_masks(n: int, count: int, seed: int) -> np.ndarray:
    """(count, n) IN masks of the shadows: complementary pairs of random halves, each pair drawn from
    (seed, 'audit', 'shadow-pair', j). An even count puts every example IN for exactly half the shadows, and
    adding shadows later keeps the earlier ones."""
    masks = np.zeros((count, n), dtype=bool)
    for j in range((count + 1) // 2):
        half = _random_half(n, make_generator(seed, "audit", "shadow-pair", j))
        masks[2 * j] = half
        if 2 * j + 1 < count:
            masks[2 * j + 1] = ~half
    return masks


def _random_half(n: int, gen: torch.Generator) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[torch.randperm(n, generator=gen)[: n // 2].numpy()] = True
    return mask


def make_plan(cfg: AuditConfig, n_train: int, num_classes: int) -> dict:
    """Pool, background, target half and canaries: every choice from (cfg.seed, 'audit', ...)."""
    candidates = (load_indices(cfg.subset, n_train).numpy() if cfg.subset else np.arange(n_train))
    n_pool = min(cfg.pool_size, len(candidates))
    if n_pool + cfg.background > len(candidates):
        raise PrismError(f"--background {cfg.background}: only {len(candidates) - n_pool} train images remain "
                         f"outside a pool of {n_pool}")
    perm = candidates[torch.randperm(len(candidates), generator=make_generator(cfg.seed, "audit", "pool")).numpy()]
    pool = np.sort(perm[:n_pool])
    background = np.sort(perm[n_pool: n_pool + cfg.background])
    if cfg.canaries >= n_pool:
        raise PrismError(f"--canaries {cfg.canaries}: must be smaller than the pool ({n_pool})")
    gen = make_generator(cfg.seed, "audit", "canaries")
    canary_pos = np.sort(torch.randperm(n_pool, generator=gen)[: cfg.canaries].numpy())
    # mislabel: a different class; outlier: any class (the image is replaced)
    shift = torch.randint(1, num_classes, (len(canary_pos),), generator=gen).numpy()
    outlier_class = torch.randint(0, num_classes, (len(canary_pos),), generator=gen).numpy()
    target_in = _random_half(n_pool, make_generator(cfg.seed, "audit", "target"))
    return {"pool": pool, "background": background, "target_in": target_in, "canary_pos": canary_pos,
            "canary_shift": shift, "canary_class": outlier_class}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- canaries
def canary_dataset(cfg: AuditConfig, plan: dict) -> str:
    """Register (in this process) a dataset equal to ``cfg.dataset`` except for the canaries; returns its name.

    Mislabelled canaries get ``(y + shift) mod K``; outliers become a uniform-noise image (drawn from
    (seed, 'audit', 'canary-images')) with a random class. Models trained in the audit record this name.
    """
    if not cfg.canaries:
        return cfg.dataset
    train_idx = plan["pool"][plan["canary_pos"]]
    spec_key = {"base": cfg.dataset, "kind": cfg.canary_kind, "idx": train_idx.tolist(), "seed": cfg.seed,
                "shift": plan["canary_shift"].tolist(), "cls": plan["canary_class"].tolist()}
    name = f"{cfg.dataset}+canaries-{_digest(spec_key)}"
    if name in DATASETS:
        return name
    base = DATASETS.get(cfg.dataset)
    idx = torch.as_tensor(train_idx)

    def load(root, download, resolution):
        train, test, info = base.loader(root, download, resolution)
        if not isinstance(train, TensorImages):
            raise PrismError(f"--canaries: needs an in-memory dataset; {cfg.dataset!r} is file-backed")
        images, targets = train.images.clone(), train.targets.clone()
        if cfg.canary_kind == "mislabel":
            targets[idx] = (targets[idx] + torch.as_tensor(plan["canary_shift"])) % info.num_classes
        else:
            gen = make_generator(cfg.seed, "audit", "canary-images")
            images[idx] = torch.randint(0, 256, (len(idx),) + tuple(images.shape[1:]), generator=gen,
                                        dtype=torch.int64).to(torch.uint8)
            targets[idx] = torch.as_tensor(plan["canary_class"])
        info = dataclasses.replace(info, name=name, source=info.source + f" + {len(idx)} {cfg.canary_kind} canaries")
        return TensorImages(images, targets), test, info

    DATASETS.register(name, type(base)(load, f"{cfg.dataset} with {len(idx)} {cfg.canary_kind} canaries (audit)",
                                       base.available, base.how_to_get))
    return name


# ----------------------------------------------------------------------------- pipelines
@contextmanager
def _torch_threads(n: int | None):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_seed(seed: int, index: int) -> int:
    """Stage seed of pipeline ``index`` (0 = target): weight init, data order, views and draws all differ."""
    return derive_seed(seed, "audit", "model", index) % (2 ** 31)


def model_folders(folder: Path, cfg: AuditConfig, index: int) -> dict[str, Path]:
    """The attacked model of each target inside one pipeline folder."""
    student = f"{cfg.student}_seed{index}"
    out = {"teacher": folder / "teachers" / cfg.teacher_arch}
    for t in ("prism", "sre2l", "random-real"):
        out[t] = folder / "students" / t / student
    return out


def train_pipeline(cfg: AuditConfig, folder: Path, index: int, members: np.ndarray, dataset: str) -> dict[str, Path]:
    """Train pipeline ``index`` on ``members`` (train indices) with the existing stages; resumable."""
    from .recover import recover, recover_config
    from .squeeze import SqueezeConfig, squeeze
    from .validate import validate, validate_config

    folder.mkdir(parents=True, exist_ok=True)
    subset = folder / "members.npy"
    if not subset.exists():
        np.save(subset, np.sort(members).astype(np.int64))
    targets = cfg.target_list
    common = dict(dataset=dataset, data_root=cfg.data_root, download=cfg.download, device=cfg.device,
                  resolution=cfg.resolution, num_workers=cfg.num_workers, subset=str(subset),
                  seed=model_seed(cfg.seed, index))
    pool = comma_list(cfg.bn_pool)
    archs = [cfg.teacher_arch] + ([a for a in pool if a != cfg.teacher_arch] if "prism" in targets else [])
    teachers = folder / "teachers"
    student = dict(common, teachers=str(teachers), label_teachers=cfg.teacher_arch, student=cfg.student,
                   student_width=cfg.student_width, epochs=cfg.student_epochs, seeds=str(index),
                   eval_every=cfg.student_epochs, force=cfg.force)
    with open(folder / "stages.log", "a", buffering=1) as log, redirect_stdout(log):  # line-buffered: tail -f works
        squeeze(build_config(SqueezeConfig, common, dict(out=str(teachers), arch=",".join(archs), width=cfg.width,
                                                         epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch_size,
                                                         force=cfg.force)))
        for method in DISTILLED:
            if method not in targets:
                continue
            recover(recover_config(method, **common, teachers=str(teachers), primary=cfg.teacher_arch,
                                   bn_pool=",".join(pool) if method == "prism" else cfg.teacher_arch,
                                   ipc=cfg.ipc, iterations=cfg.iterations, out=str(folder / method),
                                   force=cfg.force))
            validate(validate_config(cfg.student_protocol, **student, distilled=str(folder / method),
                                     out=str(folder / "students" / method)))
        if "random-real" in targets:
            validate(validate_config(cfg.student_protocol, **student, random_real=True, ipc=cfg.ipc,
                                     out=str(folder / "students" / "random-real")))
    return model_folders(folder, cfg, index)


def direct_members(target: str, folder: Path, members_sorted: np.ndarray, train_targets: torch.Tensor,
                   num_classes: int, ipc: int) -> np.ndarray | None:
    """Train indices of the members whose pixels entered a student's training set directly, or None.

    prism (real init): the first ``ipc`` members of each class in subset order, as recover picks them.
    random-real: the subset validate drew (recorded in its manifest). teacher / sre2l (noise init): None.
    """
    if target == "random-real":
        m = read_json(folder / "students" / "random-real" / "manifest.json")
        return members_sorted[np.asarray(m["inputs"]["source"]["indices"], dtype=np.int64)]
    if target in DISTILLED:
        m = read_json(folder / target / "manifest.json")
        if m["config"].get("init") != "real":
            return None
        per_class = class_indices(train_targets[torch.as_tensor(members_sorted)], num_classes)
        return members_sorted[torch.cat([c[:ipc] for c in per_class]).numpy()]
    return None


# ----------------------------------------------------------------------------- the stage
def audit(cfg: AuditConfig) -> dict:
    """Train the target and shadow pipelines, attack every target, write ``audit.json``; returns it."""
    cfg = resolve_config(cfg)
    with _torch_threads(cfg.threads):
        return _audit(cfg)


def _audit(cfg: AuditConfig) -> dict:
    timer = Timer()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    train, _, info = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.resolution)
    plan = make_plan(cfg, len(train), info.num_classes)
    n_pool, n_shadow = len(plan["pool"]), cfg.shadow_models
    shadow_in = shadow_masks(n_pool, n_shadow, cfg.seed)
    _check_plan(out, cfg, plan)
    dataset = canary_dataset(cfg, plan)

    # --- train the pipelines (target = index 0, shadows 1..S)
    names = ["target"] + [f"shadow_{i:02d}" for i in range(1, n_shadow + 1)]
    masks = np.concatenate([plan["target_in"][None], shadow_in])
    folders: list[dict[str, Path]] = []
    for index, (name, mask) in enumerate(zip(names, masks)):
        t0 = Timer()
        members = np.concatenate([plan["pool"][mask], plan["background"]])
        folders.append(train_pipeline(cfg, out / "models" / name, index, members, dataset))
        print(f"[audit] {name} ({index + 1}/{len(names)}): {int(mask.sum())} pool members, "
              f"{_accuracies(folders[-1], cfg.target_list)} ({t0.elapsed:.1f}s; log: {out / 'models' / name / 'stages.log'})")

    # --- score every pool example under every model
    train, _, info = load_dataset(dataset, cfg.data_root, cfg.download, cfg.resolution)
    pool_t = torch.as_tensor(plan["pool"])
    images, labels = train.get_images(pool_t), train.targets[pool_t]
    variance = cfg.lira_variance
    if variance == "auto":
        variance = "global" if n_shadow < GLOBAL_VARIANCE_BELOW else "per-example"
    is_canary = np.zeros(n_pool, dtype=bool)
    is_canary[plan["canary_pos"]] = True
    member = plan["target_in"]
    rows, curves, models, skipped = [], {}, {}, {}
    attacks = [a for a in cfg.attack_list if _attack_possible(a, n_shadow, skipped)]
    for target in cfg.target_list:
        stats = []
        for f in folders:
            model, _ = _load_model(f[target], device)
            stats.append(example_scores(model, images, labels, info, device, flip=cfg.query_flip))
        card = read_json(folders[0][target] / "card.json")
        models[target] = {"folder": str(folders[0][target]), "test_top1": card.get("test_top1")}
        shadow_phi = np.stack([s["phi"] for s in stats[1:]]) if n_shadow else None
        pop = {"pool": ~is_canary}
        direct = direct_members(target, out / "models" / "target", np.sort(np.concatenate(
            [plan["pool"][member], plan["background"]])), train.targets, info.num_classes, cfg.ipc)
        if direct is not None:
            models[target]["direct_members"] = len(direct)
            pop["direct"] = (np.isin(plan["pool"], direct) | ~member) & ~is_canary
        if cfg.canaries:
            pop["canaries"] = is_canary
        for attack in attacks:
            scores = attack_scores(attack, stats[0], shadow_phi, shadow_in, variance)
            for examples, sel in pop.items():
                if member[sel].all() or not member[sel].any():
                    continue
                row = _row(cfg, target, attack, examples, scores[sel], member[sel], n_shadow, card)
                if examples == "pool":
                    curves[(target, attack)] = roc_metrics(scores[sel], member[sel], curve=True)
                rows.append(row)
    _flag_best(rows)

    # --- write
    roc_path = roc_figure(curves, out / "audit_roc.png")
    result = {
        "note": NOTE,
        "dataset": cfg.dataset,
        "targets": rows,
        "models": models,
        "pool_size": n_pool,
        "members": int(member.sum()),
        "non_members": int((~member).sum()),
        "shadow_models": n_shadow,
        "background": len(plan["background"]),
        "attacks": attacks,
        "skipped_attacks": skipped,
        "lira": {"statistic": "phi = log(p/(1-p)) of the true class" + (", mean over image and flip"
                                                                          if cfg.query_flip else ""),
                 "variance": variance},
        "confidence_intervals": f"{int(CI_LEVEL * 100)}% percentile bootstrap, {cfg.bootstrap} resamples, "
                                f"members and non-members resampled separately",
        "best_attack": "per target (examples=pool): highest TPR at 1% FPR, then AUC; chosen after seeing the "
                       "results, so slightly optimistic",
        "canaries": {"count": cfg.canaries, "kind": cfg.canary_kind if cfg.canaries else None,
                     "indices": plan["pool"][plan["canary_pos"]].tolist(), "dataset": dataset},
        "member_indices": plan["pool"][member].tolist(),
        "non_member_indices": plan["pool"][~member].tolist(),
        "roc_plot": roc_path.name if roc_path else None,
        "wall_time_s": round(timer.elapsed, 2),
    }
    write_json(out / "audit.json", result)
    write_manifest(out, "audit", cfg, inputs={"dataset": info.to_dict()},
                   outputs={"audit": "audit.json", "roc_plot": result["roc_plot"],
                            "models": [str(out / "models" / n) for n in names]},
                   wall_time=timer.elapsed)
    print(audit_table(rows))
    print(f"[audit] {NOTE}")
    print(f"[audit] -> {out / 'audit.json'} ({timer.elapsed:.1f}s)")
    return result


def _attack_possible(attack: str, n_shadow: int, skipped: dict) -> bool:
    need = {"lira-offline": 1, "lira-online": 2}.get(attack, 0)
    if n_shadow < need:
        skipped[attack] = f"needs at least {need} shadow model(s), have {n_shadow}"
        print(f"[audit] skipping {attack}: {skipped[attack]}")
        return False
    return True


def _load_model(folder: Path, device):
    from .squeeze import load_teacher

    return load_teacher(folder, device=device)


def _accuracies(folders: dict[str, Path], targets: list[str]) -> str:
    parts = []
    for t in targets:
        card = read_json(folders[t] / "card.json")
        parts.append(f"{t} {card['test_top1']:.1f}%")
    return "test top-1: " + ", ".join(parts)


def _check_plan(out: Path, cfg: AuditConfig, plan: dict) -> None:
    """Refuse to mix models trained under other settings into this audit (resume safety)."""
    training = {k: v for k, v in config_to_dict(cfg).items() if k in TRAINING_KEYS}
    record = {"training": training, "pool_digest": _digest(plan["pool"].tolist()),
              "target_digest": _digest(plan["target_in"].tolist())}
    path = out / "plan.json"
    if path.exists() and not cfg.force:
        old = read_json(path)
        diff = [k for k in training if old.get("training", {}).get(k) != training[k]]
        if diff or old.get("pool_digest") != record["pool_digest"]:
            raise PrismError(f"{out}: holds an audit trained with other settings ({', '.join(diff) or 'pool'}); "
                             f"use another --out, or --force to retrain")
    write_json(path, record)


def _row(cfg, target, attack, examples, scores, member, n_shadow, card) -> dict:
    m = roc_metrics(scores, member)
    ci = bootstrap_ci(scores, member, cfg.bootstrap, derive_seed(cfg.seed, target, attack, examples))
    row = {"target": target, "attack": attack, "examples": examples}
    for k in ("auc", *FPR_POINTS):
        row[k] = round(m[k], 5)
        row[f"{k}_ci"] = [round(x, 5) for x in ci[k]] if k in ci else None
    n_non = int((~member).sum())
    row.update(members=int(member.sum()), non_members=n_non, shadow_models=n_shadow if attack != "threshold" else 0,
               fpr_floor=round(1.0 / n_non, 6), test_top1=card.get("test_top1"), best=False)
    return row


def _flag_best(rows: list[dict]) -> None:
    for target in {r["target"] for r in rows}:
        cands = [r for r in rows if r["target"] == target and r["examples"] == "pool"]
        if cands:
            max(cands, key=lambda r: (r["tpr_at_1pct_fpr"], r["auc"]))["best"] = True


def audit_table(rows: list[dict]) -> str:
    from .report import format_table

    def ci(r, k):
        c = r.get(f"{k}_ci")
        return f"{r[k]:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")

    return format_table([{"target": r["target"], "examples": r["examples"], "attack": r["attack"] + (" *" if r["best"] else ""),
                          "AUC [95% CI]": ci(r, "auc"), "TPR@0.1%FPR": ci(r, "tpr_at_0.1pct_fpr"),
                          "TPR@1%FPR": ci(r, "tpr_at_1pct_fpr"), "members": r["members"],
                          "non-members": r["non_members"], "shadows": r["shadow_models"]} for r in rows],
                        ["target", "examples", "attack", "AUC [95% CI]", "TPR@0.1%FPR", "TPR@1%FPR", "members",
                         "non-members", "shadows"])


def roc_figure(curves: dict, path: Path) -> Path | None:
    """Log-log ROC curves, one panel per target, one line per attack, with the chance diagonal."""
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .utils import atomic_path

    targets = list(dict.fromkeys(t for t, _ in curves))
    fig = Figure(figsize=(4.2 * len(targets), 4.0))
    FigureCanvasAgg(fig)
    lo = min(float(c["fpr"][c["fpr"] > 0].min()) for c in curves.values() if (c["fpr"] > 0).any()) / 2
    for i, target in enumerate(targets):
        ax = fig.add_subplot(1, len(targets), i + 1)
        for (t, attack), c in curves.items():
            if t == target:
                ax.plot(np.maximum(c["fpr"], lo), np.maximum(c["tpr"], lo), label=f"{attack} (AUC {c['auc']:.3f})")
        ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1), title=target,
               xlabel="false-positive rate", ylabel="true-positive rate" if i == 0 else None)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


__all__ = ["AuditConfig", "audit", "resolve_config", "example_scores", "roc_metrics", "tpr_at_fpr", "bootstrap_ci",
           "fit_gaussians", "lira_scores", "attack_scores", "shadow_masks", "make_plan", "train_pipeline",
           "audit_table", "roc_figure", "NOTE"]
