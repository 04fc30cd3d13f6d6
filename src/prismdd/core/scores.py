"""DD-Ranking's label-robust and augmentation-robust scores (Li et al., arXiv 2505.13300; PyPI ``ddranking``).

Both judge a distilled set against a random real subset of the same size trained the same way, so that what a
protocol adds (soft labels, augmentation) is not credited to the images:

- LRS (label-robust score) from the hard-label recovery HLR = Acc(full data, hard labels) - Acc(synthetic, hard
  labels) and the improvement over random IOR = Acc(synthetic, the method's labels) - Acc(random real, the same
  labels): alpha = w * IOR - (1 - w) * HLR, LRS = (e^alpha - e^-1) / (e - e^-1), w = 0.5 on the leaderboard.
- ARS (augmentation-robust score): beta = g * (Acc(syn, aug) - Acc(random, aug)) + (1 - g) * (Acc(syn, no aug) -
  Acc(random, no aug)), normalised the same way, g = 0.5.

Accuracies enter as FRACTIONS (0..1): that is what the normalisation assumes (alpha in [-1, 1] maps onto [0, 1])
and how the paper writes it. ddranking 0.2.0's code (``metrics/soft_label.py``, ``aug_robust.py``) puts its
percentages into the exponent instead, which leaves [0, 1] for any gap over one point (an HLR of 40 points gives
-0.156 for every method); ``units="percent"`` reproduces that, to match a number it printed.
Torch-free: the report and the tests read it without loading torch.
"""
from __future__ import annotations

import math

LRS_INPUTS = ("full_hard", "syn_hard", "syn_soft", "random_soft")
ARS_INPUTS = ("syn_aug", "random_aug", "syn_noaug", "random_noaug")
INPUT_WORDS = {
    "full_hard": "full data with hard labels (run's full baseline, or validate --full-top1)",
    "syn_hard": "the distilled set with hard labels (run --scores)",
    "syn_soft": "the distilled set under the protocol",
    "random_soft": "random real under the protocol (the random-real baseline)",
    "syn_aug": "the distilled set under the protocol",
    "random_aug": "random real under the protocol (the random-real baseline)",
    "syn_noaug": "the distilled set without augmentation (run --scores)",
    "random_noaug": "random real without augmentation (run --scores)",
}


UNITS = {"fraction": 100.0, "percent": 1.0}  # what a percentage is divided by before the exponent


def normalised(x: float) -> float:
    """(e^x - e^-1) / (e - e^-1): -1 -> 0, 0 -> 0.269, 1 -> 1."""
    return (math.exp(x) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def lrs(full_hard: float, syn_hard: float, syn_soft: float, random_soft: float, weight: float = 0.5,
        units: str = "fraction") -> dict:
    """The label-robust score from top-1 accuracies in PERCENT (as prismdd and ddranking report them); returns
    the score (in [0, 1] for ``units="fraction"``) with HLR, IOR (in points) and alpha."""
    hlr, ior = full_hard - syn_hard, syn_soft - random_soft
    alpha = (weight * ior - (1 - weight) * hlr) / UNITS[units]
    return {"score": round(normalised(alpha), 4), "hlr": round(hlr, 3), "ior": round(ior, 3),
            "alpha": round(alpha, 5), "weight": weight}


def ars(syn_aug: float, random_aug: float, syn_noaug: float, random_noaug: float, weight: float = 0.5,
        units: str = "fraction") -> dict:
    """The augmentation-robust score from top-1 accuracies in percent; the two gaps over random real in points."""
    with_aug, without = syn_aug - random_aug, syn_noaug - random_noaug
    beta = (weight * with_aug + (1 - weight) * without) / UNITS[units]
    return {"score": round(normalised(beta), 4), "gap_aug": round(with_aug, 3), "gap_noaug": round(without, 3),
            "beta": round(beta, 5), "weight": weight}


def score_row(acc: dict) -> dict:
    """Both scores for one method from whichever of the eight accuracies ``acc`` holds (``None`` = not measured).
    Each score comes with its inputs; a score whose inputs are incomplete is ``None`` with the missing ones named,
    never computed from a stand-in."""
    out = {}
    for name, keys, fn in (("lrs", LRS_INPUTS, lrs), ("ars", ARS_INPUTS, ars)):
        inputs = {k: acc.get(k) for k in keys}
        missing = [k for k, v in inputs.items() if v is None]
        entry = {"inputs": inputs, "missing": missing, "score": None}
        if not missing:
            entry.update(fn(*(inputs[k] for k in keys)))
        out[name] = entry
    return out


def missing_line(entry: dict) -> str:
    """One line naming what a score lacks."""
    return "needs " + "; ".join(INPUT_WORDS[k] for k in entry["missing"])
