"""Membership-inference attacks and their metrics: threshold, LiRA (offline/online), ROC AUC and TPR at
low FPR with bootstrap intervals. Pure functions of per-example scores (numpy in, numpy out)."""
from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import auc, roc_curve

from ..core.errors import PrismError
from ..core.runtime import derive_seed

ATTACKS = ("threshold", "lira-offline", "lira-online")
FPR_POINTS = {"tpr_at_0.1pct_fpr": 0.001, "tpr_at_1pct_fpr": 0.01}  # metric name -> false-positive rate
CI_LEVEL = 0.95  # two-sided percentile bootstrap interval
GLOBAL_VARIANCE_BELOW = 64  # auto: one variance per group below this many shadows (Carlini et al. 2022, Fig. 6)
PER_EXAMPLE_STD_FLOOR = 0.1  # per-example variance: std floored at this share of the global std (few observations)


def _rankable(scores) -> np.ndarray:
    """Scores as finite floats with the same order (ROC metrics depend on ranks only); NaN ranks lowest."""
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
