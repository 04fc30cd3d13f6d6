"""Method plug-ins: the mechanisms a paper adds on top of recovery's one engine.

SRe2L, CDA, DELT and PRISM are settings of the engine (presets). Other methods need code the engine does not
have: G-VBSM's real-data statistics and round-robin backbones, DWA's per-batch weight adjustment of the teacher,
EDC's category-aware matching, or no optimisation at all (RDED stitches selected real patches, D4M decodes
diffusion prototypes). Such a method is a ``Plugin`` registered under a name, picked by recover's ``--plugin``
(set by the method's preset). Every hook has a do-nothing default, so a plug-in overrides only what it changes.

Determinism contract (resume and torchrun shards must give the same images): a hook may keep state across
iterations of ONE batch, but anything that spans batches must be a function of the batch index ``b`` (and the
seed), never of how many batches this process has run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

from ..core.registry import Registry


class Plugin:
    """The default plug-in: plain engine behaviour. Subclass and register with ``@PLUGINS.register(name)``."""

    name: ClassVar[str] = "none"
    # a method that learns the whole set jointly (FRePo) gets ONE batch of every (class, IPC index) unit
    whole_set: ClassVar[bool] = False
    # False: no teacher is loaded (nothing pretrained is used); --teachers/--primary are then not needed
    uses_teachers: ClassVar[bool] = True
    # False: the engine's pixel optimisation never runs (the images are made another way), so its options
    # (--param, --clip-prior, --view-noise) would change nothing and are refused
    engine_optimises: ClassVar[bool] = True
    # the kinds of per-example scores (``artifacts/scores.py``) it reads from ``--select-scores``: the selection
    # methods' (``methods/select.py``); ``prismdd run`` makes them with the score stage first
    score_kinds: ClassVar[tuple[str, ...]] = ()
    # how a refusal of an engine option says why (FRePo optimises its pixels, in a loop of its own)
    without_engine: ClassVar[str] = "does not optimise pixels"
    # files (glob patterns under the recover folder) the method writes besides images, records and logs/rank*:
    # ``recover --force`` removes those of EVERY method, so a folder re-made with another method holds none of
    # the old method's files (FRePo's learned labels would otherwise be read with the new images)
    owned_files: ClassVar[tuple[str, ...]] = ()
    # of those, the files that belong to the finished set: sealed in the manifest (sha256, ``outputs.files``),
    # checked by their readers and by a re-run of recover
    sealed_files: ClassVar[tuple[str, ...]] = ()
    # kinds of SHARED option groups (``OPTION_KINDS`` besides "plugin", its own group) that the plug-in reads: the
    # engine's kinds ("param", "prior") come with ``engine_optimises``; others are named here (every selection
    # method reads the "select" group, ``methods/select.py``). A group of a kind the plug-in does not read is left
    # out of its --help and refused by recover when switched on (``Options.in_use``)
    option_kinds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def reads_kind(cls, kind: str) -> bool:
        """Whether option groups of ``kind`` act on this plug-in (its own "plugin" group is matched by name)."""
        return kind in cls.option_kinds or (cls.engine_optimises and kind in ENGINE_OPTION_KINDS)

    @classmethod
    def takes_bn_free(cls, cfg) -> bool:
        """Whether BN-free teachers may be in this run's pool: only where the plug-in matches their statistics itself
        and the engine's BN term is off (EDC's conv statistics). Elsewhere a BN-free member would count 0 in the BN
        mean, so recover refuses it."""
        return False

    def __init__(self, cfg, info, train, teachers: dict, pool: list[str], device: torch.device):
        # cfg: RecoverConfig; info: DatasetInfo; train: the training split (``get_images``, ``targets``);
        # teachers: arch -> Teacher(arch, model, card, folder); pool: the BN pool's archs
        self.cfg, self.info, self.train, self.teachers, self.pool, self.device = cfg, info, train, teachers, pool, device

    def prepare(self, out: Path, rank: int = 0) -> dict:
        """Once per run, before any batch (e.g. precompute real-data statistics). Returns provenance for the
        manifest (what was computed or loaded, from which files)."""
        return {}

    def input_digests(self) -> dict[str, str]:
        """``{name: sha256}`` of files the plug-in reads besides the teachers (a selection method's score file), known
        once ``__init__`` ran: recover records them with the folder's inputs and refuses to resume finished batches
        when one changed since (as for retrained teachers)."""
        return {}

    def outputs_present(self, out: Path) -> bool:
        """Whether the files a finished set of this method needs besides its images are in ``out`` (a batch whose
        record and images exist is redone when not: a re-run remakes what was deleted)."""
        return True

    def synthesize(self, b: int, units: list[tuple[int, int]], x0: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        """Methods that do not optimise pixels return (normalised images, record extras) for the batch's units;
        None (the default) runs the optimisation engine."""
        return None

    def begin_batch(self, b: int, units: list[tuple[int, int]], x: torch.Tensor) -> None:
        """Before a batch's first iteration (e.g. adjust teacher weights)."""

    def pick_teachers(self, b: int, it: int, ce_teacher: str, bn_set: list[str]) -> tuple[str, list[str]]:
        """The CE teacher and the BN set of iteration ``it`` of batch ``b``."""
        return ce_teacher, bn_set

    def losses(self, engine, xa: torch.Tensor, y: torch.Tensor, b: int, it: int,
               logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra loss terms for one augmented batch, ALREADY WEIGHTED: every value is added to the total and
        logged under its name. ``logits``: arch -> logits of the teachers that ran this iteration."""
        return {}

    def grad_wrt(self) -> list[torch.Tensor]:
        """Tensors besides the pixels whose gradient of each iteration's total loss the plug-in receives in
        ``take_grads`` (DWA's carried teacher gradient). None by default, so nothing more is computed."""
        return []

    def take_grads(self, grads: list[torch.Tensor | None]) -> None:
        """The gradients of ``grad_wrt()``'s tensors, once per iteration (None: the loss does not use it)."""

    def end_batch(self, b: int, record: dict) -> None:
        """After a batch, also when it failed (undo what begin_batch changed); may add entries to the record."""


PLUGINS: Registry[type[Plugin]] = Registry("recovery plug-in")
PLUGINS.register("none", Plugin)


class Options:
    """A method's own options: a group of ``opt`` fields declared next to its code, each name prefixed with the
    group's (``frepo_width``: ``--frepo-width``, ``cfg.frepo_width``). Recover's config is the engine's fields plus
    every registered group's under the same flat names (``stages/recover.py``), and ``--help`` shows each group
    under its own heading. Declare one with ``@options(name, kind)`` on a subclass."""

    name: ClassVar[str] = ""
    # plugin: shown with --method NAME --help where NAME's preset sets --plugin to it; param and prior act on the
    # engine's pixel optimisation, so they are shown only for methods whose pixels the engine optimises; select:
    # shared by the selection methods (``Plugin.option_kinds``), shown for those only
    kind: ClassVar[str] = "plugin"

    @staticmethod
    def check(cfg) -> None:
        """Rules that involve several fields (one field's bounds and choices are checked by ``opt``); ``cfg`` is the
        whole recover config, so a rule may read the engine's fields. Raise ``PrismError`` naming the flag."""

    @classmethod
    def active(cls, cfg) -> bool:
        """Whether the group's fields act on ``cfg``'s results: a plug-in's own group when that plug-in runs, a shared
        group when it is switched on (``in_use``). Only active groups enter the config hash (``core.config``), so a
        method added later, or another method's settings, never change the hash of a run they take no part in."""
        return cfg.plugin == cls.name if cls.kind == "plugin" else cls.in_use(cfg) is not None

    @staticmethod
    def in_use(cfg) -> str | None:
        """Shared groups (every kind but plugin): the flag and value that switch the group on in ``cfg`` (e.g.
        ``--clip-prior MODEL``), else None; recover refuses it for a method that does not read the group's kind
        (``Plugin.reads_kind``: param and prior for a method the engine does not optimise)."""
        return None


OPTION_KINDS = ("param", "prior", "select", "plugin")  # the order of the groups in recover's config and its --help
ENGINE_OPTION_KINDS = ("param", "prior")  # the kinds that act on the engine's pixel optimisation
OPTIONS: Registry[type[Options]] = Registry("option group")


def options(name: str, kind: str = "plugin"):
    """Class decorator: make ``cls`` a dataclass of options and register it under ``name`` (a plug-in's group
    under the plug-in's own name). Every field must carry ``name_`` as a prefix: flat names of different
    methods can then never collide."""
    if kind not in OPTION_KINDS:
        raise ValueError(f"option group {name!r}: kind {kind!r}, expected one of {', '.join(OPTION_KINDS)}")

    def add(cls: type[Options]) -> type[Options]:
        cls = dataclasses.dataclass(cls)
        cls.name, cls.kind = name, kind
        stray = [f.name for f in dataclasses.fields(cls) if not f.name.startswith(name + "_")]
        if stray:
            raise ValueError(f"option group {name!r}: {', '.join(stray)} lack the prefix {name + '_'!r}")
        return OPTIONS.register(name, cls)

    return add


def option_groups() -> list[type[Options]]:
    """Every registered group, parametrisations first, then priors, the selection methods' shared group, then
    plug-ins, each by name: recover's order."""
    return sorted((g for _, g in OPTIONS.items()), key=lambda g: (OPTION_KINDS.index(g.kind), g.name))
