"""Embedders: what turns training images into the per-example vectors (N, D) that selection methods compare by
distance (herding's running mean, k-center's farthest point, BPS's nearest-neighbour patterns). The score stage
(``prismdd score --kinds embedding --embed NAME``) runs one over the training split, sharded over torchrun ranks,
and stores the result as the ``embedding`` tensor of ``scores.safetensors``.

An embedder is a subclass of ``Embedder`` registered with ``@embedder(name)`` (and a few words in ``summary`` for
``--embed``'s help); it has four parts:

- ``settings(cfg)`` (classmethod, cheap, JSON-able): what shapes its vectors: the options it reads and the digests
  of the files it uses. The stage compares it with a finished folder's record before any work (equal: the stored
  embedding is kept; different: refused) and writes it into the manifest.
- ``__init__(cfg, info, train, device)``: load (or train) what it needs. Every torchrun rank builds one, so work
  done here must not depend on the rank (derive any random draw from ``cfg.seed`` with ``make_generator``).
- ``__call__(images)``: uint8 (B, C, H, W) un-augmented training images -> float32 (B, D) on the CPU; the same
  image must give the same vector whatever its batch-mates (eval mode), so shards agree with one process.
- ``options`` (optional): a dataclass of ``opt`` fields, subclassing ``EmbedderOptions``, each named ``<name>_...``;
  the score stage's config takes them as its own flags (``--<name>-...``), and ``check(cfg)`` may refuse combinations
  in one line. They shape the config hash only when ``--embed`` names this embedder.

``"teacher"`` (here): the penultimate features (the input of the final Linear layer, ``core.models.FeatureExtractor``)
of the ``--embed-arch`` teacher of a squeeze folder: what DeepCore's herding and k-center embed with (its
``EmbeddingRecorder`` sits just before the final ``fc``; PatrickZH/DeepCore 74ec709, ``deepcore/nets/resnet.py``).
BPS registers its contrastive embedder, ``"bps"``, in ``methods/bps.py``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..artifacts import WEIGHTS, file_digest, find_teachers, load_model
from ..core.data import DatasetInfo, normalize
from ..core.errors import PrismError
from ..core.models import FeatureExtractor
from ..core.registry import Registry


class EmbedderOptions:
    """Base of an embedder's option dataclass: its fields take part (config hash) only when it is the chosen one."""

    embedder: ClassVar[str] = ""  # set by ``@embedder``

    @classmethod
    def active(cls, cfg) -> bool:
        return getattr(cfg, "embed", None) == cls.embedder


class Embedder:
    """Base class of an embedder (see the module's docstring for the contract)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # a few words for --embed's help
    options: ClassVar[type | None] = None  # a dataclass of ``opt`` fields named ``<name>_...``, or None
    # whether it reads --teachers / --embed-arch (the manifest then records the teacher's digest)
    uses_teachers: ClassVar[bool] = False

    @classmethod
    def settings(cls, cfg) -> dict[str, Any]:
        """What shapes this embedder's vectors (options and input digests), JSON-able; cheap (no model runs)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg) -> None:
        """Rules between several fields, raised as one-line ``PrismError``s naming the flag (called when chosen)."""

    def __init__(self, cfg, info: DatasetInfo, train, device: torch.device):
        self.cfg, self.info, self.train, self.device = cfg, info, train, device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


EMBEDDERS: Registry[type[Embedder]] = Registry("embedder")


def embedder(name: str):
    """Class decorator: register an ``Embedder`` subclass under ``name`` (its option fields must carry ``name_``)."""
    def add(cls: type[Embedder]) -> type[Embedder]:
        cls.name = name
        if cls.options is not None:
            if not issubclass(cls.options, EmbedderOptions):
                raise ValueError(f"embedder {name!r}: its options must subclass EmbedderOptions")
            cls.options.embedder = name
            stray = [f.name for f in dataclasses.fields(cls.options) if not f.name.startswith(name + "_")]
            if stray:
                raise ValueError(f"embedder {name!r}: options {', '.join(stray)} lack the prefix {name + '_'!r}")
        return EMBEDDERS.register(name, cls)
    return add


def embedder_option_groups() -> list[type]:
    """The option dataclasses of every registered embedder, by name: the score stage's config adds their fields."""
    return [cls.options for _, cls in EMBEDDERS.items() if cls.options is not None]


def teacher_folder(teachers: str, arch: str, option: str = "--embed-arch") -> Path:
    """The folder of the ``arch`` teacher in the squeeze folder ``teachers``; one line with the command that trains it
    when there is none."""
    fix = f"train it with `prismdd squeeze --arch {arch} --out {teachers}`"
    if not Path(teachers).is_dir():
        raise PrismError(f"--teachers {teachers}: folder not found; {fix}")
    try:
        found = find_teachers(teachers)
    except PrismError:
        found = {}
    if arch not in found:
        have = f" (it holds {', '.join(found)})" if found else " (it holds no finished teacher)"
        raise PrismError(f"{option} {arch}: no {arch} teacher in {teachers}{have}; {fix}")
    return found[arch]


def teacher_record(teachers: str, arch: str, option: str = "--embed-arch") -> dict[str, str]:
    """``{"arch", "teacher_sha256"}``: which teacher, and which weights (retraining it in place changes the digest)."""
    return {"arch": arch, "teacher_sha256": file_digest(teacher_folder(teachers, arch, option) / WEIGHTS)}


def load_teacher(teachers: str, arch: str, info: DatasetInfo, device, option: str = "--embed-arch") -> torch.nn.Module:
    """The ``arch`` teacher, frozen in eval mode, checked against the dataset (classes, resolution)."""
    return load_model(teacher_folder(teachers, arch, option), arch=arch, dataset=info.name,
                      class_names=info.class_names, resolution=info.resolution, device=device)[0]


@embedder("teacher")
class TeacherEmbedder(Embedder):
    """Penultimate features of the ``--embed-arch`` teacher on the normalised, un-augmented image (eval mode: running
    BN statistics, so a vector never depends on its batch-mates). D is the width of the teacher's last hidden layer."""

    uses_teachers = True
    summary = "penultimate features of the --embed-arch teacher, as DeepCore's herding and k-center"

    @classmethod
    def settings(cls, cfg) -> dict[str, Any]:
        return teacher_record(cfg.teachers, cfg.embed_arch)

    def __init__(self, cfg, info: DatasetInfo, train, device: torch.device):
        super().__init__(cfg, info, train, device)
        self.extract = FeatureExtractor(load_teacher(cfg.teachers, cfg.embed_arch, info, device))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features, _ = self.extract(normalize(images.to(self.device), self.info))
        return features.float().cpu()
