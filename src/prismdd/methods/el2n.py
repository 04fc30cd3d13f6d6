"""EL2N (Paul et al., NeurIPS 2021, "Deep Learning on a Data Diet"): per class, the examples with the largest error
L2 norm ``||softmax(f(x)) - onehot(y)||_2`` early in training, averaged over runs.

The per-run values are the ``dynamics`` scores' ``el2n`` (R, N) (the score stage picks the early epoch); the score
is their mean over runs (Data Diet's ``scripts/get_mean_score.py``). Picks: highest first (Data Diet keeps the
hardest: ``data.py:subset_train_idxs_by_scores``, ``keep_max_scores``, the subset its ``run_keep_max_scores.py``
trains on), ties to the lowest training index. Data Diet selects over the whole training set; here per class."""
from __future__ import annotations

from .base import PLUGINS
from .select import SelectionPlugin, ranked


@PLUGINS.register("el2n")
class EL2N(SelectionPlugin):
    name = "el2n"
    score_kinds = ("dynamics",)

    def choose(self, c, members, ipc):
        score = self.scores.el2n[:, members].double().mean(0)
        pos = ranked(score, members, descending=True)[:ipc]
        return members[pos].tolist(), [{"el2n": round(float(score[p]), 6)} for p in pos.tolist()]
