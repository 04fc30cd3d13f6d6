"""Random real images as a selection method (``--method random``): per class, ``ipc`` training images drawn at random.

The draw is ``core/data/sampling.py:random_real_indices``, the one validate's ``--random-real`` baseline, metrics'
diversity reference and the main job use, so for the same seed (and ``--subset``) this folder holds exactly the
images of the random-real baseline, in the same order: the baseline can then be relabelled and validated like any
distilled set. Its draw runs class by class on ONE stream seeded by the seed, so a class's images depend on the
seed and the IPC only (the first ``k`` images at IPC ``n > k`` are those of IPC ``k``)."""
from __future__ import annotations

import torch

from ..core.data import random_real_indices
from .base import PLUGINS
from .select import SelectionPlugin


@PLUGINS.register("random")
class RandomSelection(SelectionPlugin):
    name = "random"
    score_kinds = ()

    def choose(self, c: int, members: torch.Tensor, ipc: int) -> tuple[list[int], list[dict]]:
        if not hasattr(self, "draw"):  # every class at once: the baseline's one stream
            self.draw = random_real_indices(self.train, self.info.num_classes, ipc, self.cfg.seed)
        picks = self.draw[c * ipc:(c + 1) * ipc].tolist()
        return picks, [{} for _ in picks]
