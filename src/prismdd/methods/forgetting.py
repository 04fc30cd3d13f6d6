"""Forgetting (Toneva et al., ICLR 2019; the DC paper's coreset baseline): per class, the most forgotten examples.

From the ``dynamics`` scores' ``correct`` (R runs, E epochs, N): a forgetting event of example i in run r is an
epoch e with ``correct[r, e - 1, i] == 1`` and ``correct[r, e, i] == 0`` (learned, then misclassified; the first
epoch starts from "not learned", as in Data Diet's ``init_forget_stats`` and DeepCore's ``last_acc`` zeros, so it
cannot count). An example never classified correctly in a run counts as infinitely forgotten there (Toneva et al.;
Data Diet's ``save_forget_scores``; DeepCore gives it 0). The score is the MEAN over runs (Data Diet's
``get_mean_score.py``; inf when any run never learned it). Picks: highest score first (DeepCore's ``Forgetting.select``
and Data Diet's ``keep_max_scores`` keep the most forgotten), ties in a seeded random order of the class (many
examples share a small integer count)."""
from __future__ import annotations

import torch

from .base import PLUGINS
from .select import SelectionPlugin, ranked


def forgetting_scores(correct: torch.Tensor) -> torch.Tensor:
    """(R, E, n) 0/1 -> (n,) float64: forgetting events per run, averaged over runs; inf where a run never learned."""
    c = correct.to(torch.bool)
    events = (c[:, :-1] & ~c[:, 1:]).sum(1).double()  # (R, n)
    events[~c.any(1)] = float("inf")
    return events.mean(0)


@PLUGINS.register("forgetting")
class Forgetting(SelectionPlugin):
    name = "forgetting"
    score_kinds = ("dynamics",)

    def choose(self, c, members, ipc):
        score = forgetting_scores(self.scores.correct[:, :, members])
        ties = torch.randperm(len(members), generator=self.class_generator(c))
        pos = ranked(score, members, descending=True, tie_order=ties)[:ipc]
        return members[pos].tolist(), [{"forgetting": None if torch.isinf(score[p]) else round(float(score[p]), 6),
                                        "never_learned": bool(torch.isinf(score[p]))} for p in pos.tolist()]
