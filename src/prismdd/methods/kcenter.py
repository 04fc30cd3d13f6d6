"""k-center greedy (Sener and Savarese, ICLR 2018; the DC paper's coreset baseline): per class, farthest-first
traversal of the ``embedding`` scores in Euclidean distance.

The first pick is the member nearest the class mean (``--kcenter-start mean``, deterministic: the most central
image, and the same set for every seed) or a uniform random member (``random``, from the class's seeded stream:
DeepCore's ``k_center_greedy``, deepcore/methods/kcentergreedy.py:37-38, draws it with ``np.random.randint``). Each
further pick is the unselected member whose distance to its nearest selected member is largest; ties (in either
rule) to the lowest training index. float64, distances as ``||a - b||`` (not DeepCore's expanded
``|a|^2 + |b|^2 - 2ab``, which loses precision for near points)."""
from __future__ import annotations

import torch

from ..core.config import opt
from .base import Options, PLUGINS, options
from .select import SelectionPlugin


@options("kcenter", kind="plugin")
class KCenterOptions(Options):
    """k-center greedy's settings (``--method kcenter``)."""

    kcenter_start: str = opt("mean", "kcenter: the first pick of each class: mean (the member nearest the class mean; "
                                     "deterministic) | random (a seeded random member, as DeepCore)",
                             choices=("mean", "random"))


def farthest_first(emb: torch.Tensor, k: int, start: int) -> tuple[list[int], list[float]]:
    """Positions of ``k`` farthest-first picks of ``emb`` (n, D) from row ``start``, and each pick's distance to
    its nearest earlier pick (0.0 for the start)."""
    emb = emb.double()
    nearest = (emb - emb[start]).norm(dim=1)  # (n,): distance to the nearest selected row
    picks, dists = [start], [0.0]
    nearest[start] = -1.0  # never picked again (distances are >= 0)
    for _ in range(k - 1):
        p = int(torch.argmax(nearest))  # the first maximum: the lowest position
        picks.append(p)
        dists.append(float(nearest[p]))
        nearest = torch.minimum(nearest, (emb - emb[p]).norm(dim=1))
        nearest[picks] = -1.0
    return picks, dists


@PLUGINS.register("kcenter")
class KCenter(SelectionPlugin):
    name = "kcenter"
    score_kinds = ("embedding",)

    def choose(self, c, members, ipc):
        emb = self.scores.embedding[members].double()
        if self.cfg.kcenter_start == "random":
            start = int(torch.randint(len(members), (1,), generator=self.class_generator(c)))
        else:
            start = int(torch.argmin((emb - emb.mean(0)).norm(dim=1)))
        pos, dists = farthest_first(emb, ipc, start)
        return members[pos].tolist(), [{"distance": round(d, 6)} for d in dists]
