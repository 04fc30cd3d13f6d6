"""Label sources: label vectors a method learns with its images and writes beside them (FRePo's learned labels).

validate trains on them without knowing the method: it asks ``label_source(folder)`` which registered source, if
any, provides vectors for the images of a recover folder, and the source answers with its file (named in every
message), the student loss its vectors need (``loss``: FRePo regresses them with the MSE), the vectors in the
set's image order (``read``) and the file's digest for the student's provenance (``digest``). A method registers
one instance in its own module (``LABEL_SOURCES.register(name, SomeSource())``) and owns its file's name, format
and reader there.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import MANIFEST, SEALED_FILES, DistilledSet, file_digest
from ..core.errors import PrismError
from ..core.io import read_json
from ..core.registry import Registry


class LabelSource:
    """One kind of per-image label vectors in a recover folder. Subclass, set the class fields, implement ``made``
    and ``read``, and register an instance under the method's name."""

    file: ClassVar[str] = ""  # the file under the recover folder that holds the vectors
    what: ClassVar[str] = "learned labels"  # how messages and the student's digests call them
    method: ClassVar[str] = ""  # the method that writes them, as messages name it (FRePo)
    writer: ClassVar[str] = ""  # the command that writes them (recover --method frepo)
    loss: ClassVar[str] = "mse"  # the validate --loss that trains on them
    protocol: ClassVar[str] = ""  # the validate --protocol that sets that loss

    def made(self, manifest: dict) -> bool:
        """Whether a recover manifest's run writes this source's file (a missing file is then an error, not a set
        without vectors)."""
        return False

    def provides(self, folder) -> bool:
        """Whether a finished folder holds these vectors. A folder made with them whose file was deleted is refused:
        read as a set without them, its images would train on one-hot labels and be reported as the method's result."""
        folder = Path(folder)
        path = folder / self.file
        if not (folder / MANIFEST).exists():
            return False
        m = read_json(folder / MANIFEST)
        sealed = (m.get("outputs") or {}).get(SEALED_FILES) or {}
        if m.get("stage") == "recover" and (self.file in sealed or self.made(m)) and not path.exists():
            raise PrismError(f"{path}: missing: {folder} is a {self.method} set and its {self.what} were deleted; "
                             f"re-run the recover command that made it (it makes them again), or re-run it with --force")
        return path.exists()

    def read(self, folder, ds: DistilledSet) -> torch.Tensor:
        """The (N, C) vectors of ``folder``, in ``ds``'s image order (class, then IPC index), checked."""
        raise NotImplementedError

    def digest(self, folder) -> str:
        """The sha256 of the file: a student trained on other vectors is not reused."""
        return file_digest(Path(folder) / self.file)


LABEL_SOURCES: Registry[LabelSource] = Registry("label source")


def label_source(folder, loss: str | None = None) -> LabelSource | None:
    """The registered source whose vectors ``folder`` holds (None: none does); ``loss``: ask only the sources that
    train with that loss, so a folder is not read for vectors a student with another loss would not use."""
    for _, source in LABEL_SOURCES.items():
        if (loss is None or source.loss == loss) and source.provides(folder):
            return source
    return None


def sources_text(loss: str) -> str:
    """What ``--loss loss`` can read, for messages: 'learned labels (learned_labels.safetensors, written by recover
    --method frepo)', one such phrase per source, joined by 'or'."""
    return " or ".join(f"{s.what} ({s.file}, written by {s.writer})" for _, s in LABEL_SOURCES.items()
                       if s.loss == loss) or "label vectors (no method writes any)"
