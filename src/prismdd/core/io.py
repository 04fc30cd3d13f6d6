"""File I/O every stage shares: atomic writes (temp file + rename), JSON, checkpoints, JSON-lines logs."""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import PrismError


# ----------------------------------------------------------------------------- atomic files
@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or kill mid-write therefore never leaves a truncated file where a finished one is expected.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PrismError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise PrismError(f"{path}: not valid JSON ({e}); delete it and re-run the stage that wrote it") from None


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def torch_save(obj, path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path, map_location="cpu"):
    # weights_only=True: checkpoints never execute code when loaded (security standard)
    return torch.load(path, map_location=map_location, weights_only=True)


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """A flat dict of tensors as one safetensors file (no pickle), written atomically; ``metadata``: text
    fields stored in the file's header (e.g. the config hash it was made with)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def tensors_metadata(path) -> dict[str, str]:
    """The header's text fields of a safetensors file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise PrismError(f"{path}: cannot read ({str(e).splitlines()[0]}); delete it and re-run the stage "
                         f"that wrote it") from None


def load_tensors(path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise PrismError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt or cut-off files
        raise PrismError(f"{path}: cannot load ({str(e).splitlines()[0]}); delete it and re-run the stage "
                         f"that wrote it") from None


class JsonlLog:
    """Append-only JSON-lines log (one dict per line) for machines; progress bars are for people."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")

    def read(self) -> list[dict]:
        """Every complete record; a last line cut off by a kill mid-write is skipped, not an error."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise PrismError(f"{self.path}: line {i + 1} is not valid JSON; delete the file to start the log anew")
        return out
