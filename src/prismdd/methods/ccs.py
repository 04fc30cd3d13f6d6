"""CCS, coverage-centric coreset selection (Zheng et al., ICLR 2023) with AUM: per class, drop the hardest examples,
then sample evenly across the remaining score range.

1. AUM (area under the margin, Pleiss et al. 2020) of each member: the ``dynamics`` scores' ``margin`` (assigned
   logit minus the largest other logit, per run and epoch) averaged over epochs and runs. CCS's
   ``generate_importance_score.py`` accumulates (sums) the margin of softmax PROBABILITIES over epochs; the order is
   that of the mean, and the logit margin is the score artifact's definition (FIDELITY.md).
2. Drop the ``int(ccs_drop_hard * n)`` members with the lowest AUM (ties: the lowest training index goes first), as
   CCS's ``mislabel_mask`` (``--mis-ratio``, key ``accumulated_margin``, ascending; train.py:136-137).
3. Split the remaining AUM range [min, max] into ``ccs_strata`` (50) equal-width strata, half-open
   ``[lo + k w, lo + (k + 1) w)`` with the maximum in the last (CCS widens the range by ``max * 1.0001``, which
   shrinks it when the maximum is negative and then drops the maximum from every stratum: not copied).
4. Budgets: strata visited from the smallest (ties: the lower stratum), each given
   ``min(size, remaining // strata left)`` (``bin_allocate``, core/data/Coreset.py:75-94).
5. Inside a stratum, its budget of members drawn uniformly at random from the class's seeded stream; picks are listed
   stratum by stratum, lowest AUM stratum first.

Per class (class-balanced): CCS's official code selects over the whole training set, so its classes get unequal
counts; a distilled set needs ``ipc`` per class."""
from __future__ import annotations

import torch

from ..core.config import opt
from ..core.errors import PrismError
from .base import Options, PLUGINS, options
from .select import SelectionPlugin, ranked


@options("ccs", kind="plugin")
class CCSOptions(Options):
    """CCS's settings (``--method ccs``): the hard cut and the strata."""

    ccs_drop_hard: float = opt(0.3, "ccs: fraction of each class dropped first, lowest AUM (hardest) first (CCS's "
                                    "--mis-ratio; its README's value at 90 % pruning, the closest it documents to a "
                                    "distilled set's > 99 %)", minimum=0.0)
    ccs_strata: int = opt(50, "ccs: equal-width AUM strata (CCS: stratas = 50)", minimum=1)

    @staticmethod
    def check(cfg) -> None:
        if cfg.ccs_drop_hard >= 1:
            raise PrismError(f"--ccs-drop-hard {cfg.ccs_drop_hard}: a fraction of each class, expected 0 to < 1")


def aum(margin: torch.Tensor) -> torch.Tensor:
    """(R, E, n) margins -> (n,) float64: their mean over epochs and runs."""
    return margin.double().mean((0, 1))


def strata_of(score: torch.Tensor, strata: int) -> torch.Tensor:
    """Stratum (0 .. strata - 1) of each score: equal-width half-open bins over [min, max], the max in the last."""
    lo, hi = float(score.min()), float(score.max())
    width = (hi - lo) / strata
    if width == 0:
        return torch.zeros(len(score), dtype=torch.long)
    inner = torch.tensor([lo + k * width for k in range(1, strata)], dtype=torch.float64)  # the strata's lower edges
    return torch.searchsorted(inner, score.double(), right=True)  # edges <= score: a score on an edge goes up


def allocate(sizes: list[int], total: int) -> list[int]:
    """Budget per stratum: smallest stratum first (ties: the lower index), each min(size, remaining // strata left)."""
    budgets = [0] * len(sizes)
    rest = total
    for left, s in zip(range(len(sizes), 0, -1), sorted(range(len(sizes)), key=lambda i: (sizes[i], i))):
        budgets[s] = min(sizes[s], rest // left)
        rest -= budgets[s]
    return budgets


@PLUGINS.register("ccs")
class CCS(SelectionPlugin):
    name = "ccs"
    score_kinds = ("dynamics",)

    def choose(self, c, members, ipc):
        cfg = self.cfg
        score = aum(self.scores.margin[:, :, members])
        drop = int(cfg.ccs_drop_hard * len(members))
        kept = ranked(score, members, descending=False)[drop:].sort().values  # positions, ascending
        if len(kept) < ipc:
            raise PrismError(f"--ccs-drop-hard {cfg.ccs_drop_hard}: class {self.info.class_names[c]!r} keeps "
                             f"{len(kept)} of {len(members)} images, fewer than --ipc {ipc}; lower --ccs-drop-hard")
        stratum = strata_of(score[kept], cfg.ccs_strata)
        budgets = allocate(torch.bincount(stratum, minlength=cfg.ccs_strata).tolist(), ipc)
        if sum(budgets) != ipc:  # cannot happen when the strata hold >= ipc images (tests/methods/test_select.py)
            raise RuntimeError(f"ccs: strata budgets {budgets} sum to {sum(budgets)}, expected {ipc}")
        gen = self.class_generator(c)
        pos, extras = [], []
        for k, b in enumerate(budgets):
            inside = kept[stratum == k]
            for p in inside[torch.randperm(len(inside), generator=gen)[:b]].tolist():
                pos.append(p)
                extras.append({"aum": round(float(score[p]), 6), "stratum": k})
        return members[pos].tolist(), extras
