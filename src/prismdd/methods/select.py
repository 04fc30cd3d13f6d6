"""Coreset selection as a recovery plug-in: the distilled set is ``ipc`` REAL training images per class, chosen by a
rule, written as the same folder (``images/``, ``records/``, manifest) as a synthesis method's, so relabel, validate
and metrics read it unchanged.

A selector is a ``SelectionPlugin`` subclass registered with ``@PLUGINS.register(name)``, with a preset
``presets/recover/<name>.yaml`` (``plugin: <name>``, ``init: noise``, ``selection: single``, ``alpha_bn: 0``: no
teacher is loaded). It declares

- ``score_kinds``: the kinds of ``artifacts/scores.py`` it reads (``()``: none, e.g. random); the scores come from
  ``--select-scores DIR`` (a finished ``prismdd score`` folder), loaded ONCE per run into ``self.scores``
  (``Scores``: ``.embedding`` (N, D), ``.entropy`` (N,), ``.correct`` / ``.margin`` (R, E, N), ``.el2n`` (R, N),
  every axis N in training-set order), checked against the split's labels;
- ``choose(c, members, ipc) -> (picks, extras)``: ``members`` the training indices of class ``c``, ascending;
  ``picks`` the chosen training indices in pick order (exactly ``ipc`` distinct members; unit (c, k) is the k-th
  pick), ``extras`` one JSON-able dict per pick (the score it was picked by), recorded with the image.

Determinism: a pick may depend on (seed, class) only, never on the batch, the resume point or the rank. Ties are
broken by the lowest training index (``ranked``) unless the rule itself is random; then draw from
``class_generator(c)`` (``make_generator(seed, name, c)``). ``choose`` is called once per class and cached.

The images are the split's own uint8 pixels, normalised as the engine's images are; recover's PNG writer maps them
back to the same uint8 values exactly (tests/methods/test_select.py), so a selected folder holds the training
images bit for bit. Each batch record carries ``start_indices`` ([[training index]] per unit: the manifest's
provenance) and ``selection`` (per unit: method, class, pick, index and the selector's extras).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import SCORES_FILE, load_scores, sealed_in
from ..core.config import opt
from ..core.data import class_indices, normalize
from ..core.errors import PrismError
from ..core.runtime import make_generator
from .base import Options, Plugin, options


@options("select", kind="select")
class SelectOptions(Options):
    """Every selection method's options (real training images chosen by a rule, no optimisation): where the
    per-example scores they choose by come from."""

    select_scores: str = opt("", "a finished score folder (`prismdd score --kinds KINDS --out DIR`) holding the kinds "
                                 "the method reads (`prismdd methods NAME`); '' = none (random needs none)",
                             path=True)

    @staticmethod
    def in_use(cfg) -> str | None:
        return f"--select-scores {cfg.select_scores}" if cfg.select_scores else None


def ranked(values: torch.Tensor, members: torch.Tensor, *, descending: bool,
           tie_order: torch.Tensor | None = None) -> torch.Tensor:
    """Positions into ``members`` sorted by ``values`` (one per member), ties by the lowest training index, or, with
    ``tie_order`` (a permutation of positions: a seeded random order), by their place in it."""
    # sort by the tie-breaker first, then stably by value: equal values keep the tie-breaker's order
    base = torch.argsort(members, stable=True) if tie_order is None else tie_order
    order = torch.argsort(values[base], descending=descending, stable=True)
    return base[order]


class SelectionPlugin(Plugin):
    """Base of the selection methods: subclass, set ``name`` and ``score_kinds``, implement ``choose``."""

    engine_optimises = False  # the images are real training images, nothing is optimised
    uses_teachers = False  # the scores were computed beforehand by `prismdd score`
    option_kinds = ("select",)
    score_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        # checks and the score load here, not in prepare: a refusal then comes before recover --force clears the folder
        if cfg.init == "real" or cfg.init_from:  # the starts would be recorded as the images' provenance
            flag = "--init-from" if cfg.init_from else "--init real"
            raise PrismError(f"{flag}: {cfg.method} takes real training images itself; drop it (the {cfg.method} "
                             f"preset's --init noise)")
        kinds = ",".join(self.score_kinds)
        if self.score_kinds and not cfg.select_scores:
            raise PrismError(f"--select-scores: --method {cfg.method} chooses by {kinds} scores; make them with "
                             f"`prismdd score --kinds {kinds} --out DIR` and pass --select-scores DIR")
        if not self.score_kinds and cfg.select_scores:
            raise PrismError(f"--select-scores {cfg.select_scores}: --method {cfg.method} reads no scores; drop it")
        self.scores = (load_scores(cfg.select_scores, self.score_kinds, targets=train.targets,
                                   option="--select-scores") if self.score_kinds else None)
        self.members = class_indices(train.targets, info.num_classes)
        self.cache: dict[int, tuple[list[int], list[dict]]] = {}

    # ------------------------------------------------------------------ what a selector implements
    def choose(self, c: int, members: torch.Tensor, ipc: int) -> tuple[list[int], list[dict]]:
        """The ``ipc`` training indices of class ``c`` in pick order, and one dict of extras per pick."""
        raise NotImplementedError

    def class_generator(self, c: int) -> torch.Generator:
        """The random stream of class ``c`` for rules that draw (a function of the seed, the method and the class)."""
        return make_generator(self.cfg.seed, self.name, c)

    # ------------------------------------------------------------------ the plug-in hooks
    def input_digests(self) -> dict[str, str]:
        if self.scores is None:
            return {}
        return {"scores": sealed_in(self.cfg.select_scores, "score").get(SCORES_FILE, "")}

    def prepare(self, out: Path, rank: int = 0) -> dict:
        if self.scores is None:
            return {"selector": self.name, "scores": None}
        m = self.scores.manifest
        return {"selector": self.name,
                "scores": {"folder": str(Path(self.cfg.select_scores).resolve()), "config_hash": m.get("config_hash"),
                           "sha256": self.input_digests()["scores"], "kinds": list(self.score_kinds)}}

    def picks(self, c: int) -> tuple[list[int], list[dict]]:
        """Class ``c``'s choice (computed once, checked: ``ipc`` distinct members of the class)."""
        if c not in self.cache:
            members, ipc = self.members[c], self.cfg.ipc
            name = self.info.class_names[c]
            if len(members) < ipc:
                raise PrismError(f"--ipc {ipc}: class {name!r} has only {len(members)} training images; lower --ipc")
            chosen, extras = self.choose(c, members, ipc)
            chosen = [int(i) for i in chosen]
            allowed = set(members.tolist())
            if len(chosen) != ipc or len(set(chosen)) != ipc or not allowed.issuperset(chosen) or len(extras) != ipc:
                raise RuntimeError(f"{self.name}.choose gave {len(chosen)} picks for class {c}, expected {ipc} "
                                   f"distinct members with one extras dict each")
            self.cache[c] = chosen, extras
        return self.cache[c]

    def synthesize(self, b, units, x0):
        index = [self.picks(c)[0][k] for c, k in units]
        images = normalize(self.train.get_images(torch.tensor(index)), self.info)
        selection = [{"method": self.name, "class": c, "pick": k, "index": i, **self.picks(c)[1][k]}
                     for (c, k), i in zip(units, index)]
        return images, {"start_indices": [[i] for i in index], "selection": selection}
