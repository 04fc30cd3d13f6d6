"""Herding (Welling, ICML 2009; the DC paper's coreset baseline): per class, greedily add the image whose
embedding brings the running mean of the selected embeddings CLOSEST (Euclidean) to the class mean.

Step t (t = 1 .. ipc) adds the unselected member x minimising ``|| mu - (s + x) / t ||`` (``mu``: the class mean of
the ``embedding`` scores, ``s``: the sum of the t - 1 selected), ties to the lowest training index. DeepCore's
``Herding.herding`` (deepcore/methods/herding.py:80-82) takes the ``argmax`` of that distance, i.e. the image
that moves the mean FARTHEST away: a defect we do not copy (FIDELITY.md, selection section). Computed in float64 so
that near-ties do not depend on summation order."""
from __future__ import annotations

import torch

from .base import PLUGINS
from .select import SelectionPlugin


def herd(emb: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Positions (rows of ``emb``, (n, D)) of ``k`` herding picks in order, and the distance of the running mean to
    the mean after each pick."""
    emb = emb.double()
    mu = emb.mean(0)
    free = torch.ones(len(emb), dtype=torch.bool)
    total = torch.zeros_like(mu)
    picks, dists = [], []
    for t in range(1, k + 1):
        d = (mu - (total + emb) / t).norm(dim=1)  # (n,): the running mean's distance if each row were added
        d[~free] = float("inf")
        p = int(torch.argmin(d))  # the first minimum: the lowest position, members being ascending
        picks.append(p)
        dists.append(float(d[p]))
        free[p] = False
        total += emb[p]
    return picks, dists


@PLUGINS.register("herding")
class Herding(SelectionPlugin):
    name = "herding"
    score_kinds = ("embedding",)

    def choose(self, c, members, ipc):
        pos, dists = herd(self.scores.embedding[members], ipc)
        return members[pos].tolist(), [{"mean_distance": round(d, 6)} for d in dists]
