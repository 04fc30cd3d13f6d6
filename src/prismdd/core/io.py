"""File I/O every stage shares: atomic writes (temp file + rename), JSON, checkpoints, JSON-lines logs."""
from __future__ import annotations

import errno
import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from .errors import PrismError

if TYPE_CHECKING:
    import torch

# torch (and safetensors' torch half) are imported by the functions that need them: configs and presets use
# this module, and `prismdd --help` must not wait for torch (cli.py)


# ----------------------------------------------------------------------------- atomic files
@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or kill mid-write therefore never leaves a truncated file where a finished one is expected.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TMP_SUFFIX = ".tmp"


def _new_tmp(path: Path) -> Path:
    """An empty, new file ``.<name>.<pid>.<random>.tmp`` beside ``path``, created with mode 0o666 so the
    kernel applies the umask exactly as for a plain ``open()`` (``mkstemp`` would make it 0600 whatever the
    umask, and the rename keeps that mode). The PID in the name lets ``remove_orphans`` tell a dead writer's
    leftover from a live writer's file."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "cannot create a temporary file", str(path.parent))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, killed but not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_orphans(folder, depth: int = 2) -> list[Path]:
    """Delete the temporary files (``.<name>.<pid>.<8 hex>.tmp``) that writers killed mid-write left in
    ``folder`` and its sub-folders down to ``depth`` levels (``images/<class>/`` is the deepest a stage
    writes); files of a writer that still runs are kept. Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    found = [p for d in range(depth + 1) for p in folder.glob("*/" * d + f".*{TMP_SUFFIX}")]
    for p in found:
        parts = p.name[: -len(TMP_SUFFIX)].split(".")
        ours = len(parts) >= 4 and parts[-2].isdigit() and len(parts[-1]) == 8 and all(
            ch in "0123456789abcdef" for ch in parts[-1])
        if not ours or int(parts[-2]) == os.getpid() or pid_alive(int(parts[-2])):
            continue  # another program's file, or a writer that still runs
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


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
    if hasattr(o, "tolist") and getattr(o, "ndim", 0):  # tensors and arrays
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _write_failed(path, e: Exception) -> PrismError:
    """torch.save and safetensors report a failed write (disk full, file-size limit) as their own errors
    (``enforce fail at inline_container.cc``, ``SafetensorError: ... IoError``): one line naming the file."""
    return PrismError(f"{path}: cannot write ({str(e).strip().splitlines()[0][:200]}); the disk may be full: free "
                      f"space or pass another --out, then re-run the same command to resume")


def torch_save(obj, path) -> None:
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except OSError:
            raise
        except RuntimeError as e:
            raise _write_failed(path, e) from None


def torch_load(path, map_location="cpu"):
    import torch

    # weights_only=True: checkpoints never execute code when loaded (security standard)
    return torch.load(path, map_location=map_location, weights_only=True)


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """A flat dict of tensors as one safetensors file (no pickle), written atomically; ``metadata``: text
    fields stored in the file's header (e.g. the config hash it was made with).

    The bytes come from ``safetensors.torch.save`` and are written by us, not by ``save_file``: ``save_file``
    creates its file anew with mode 0600 whatever the umask (the temporary file made by ``atomic_path`` would be
    replaced), and its header lists the metadata in a per-process hash order, so the same tensors gave other
    bytes in another process and byte digests refused identical files. The header is re-serialised with sorted
    keys (the tensors' offsets are in it, so their data is unchanged) and padded to 8 bytes as the format asks."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            data = _sorted_header(save(tensors, metadata=metadata))
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            if e.errno == errno.EFBIG:  # a file-size limit (ulimit -f) reads as a full disk, as safetensors said it
                raise _write_failed(path, e) from None
            raise
        except Exception as e:  # SafetensorError "I/O error: ... (os error 28)": the write failed
            if "I/O error" in str(e) or "os error" in str(e):
                raise _write_failed(path, e) from None
            raise


def _sorted_header(blob: bytes) -> bytes:
    """A safetensors file's bytes with its JSON header written in sorted key order (deterministic)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data must start at a multiple of 8 bytes
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def tensors_metadata(path) -> dict[str, str]:
    """The header's text fields of a safetensors file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise PrismError(f"{path}: cannot read ({str(e).splitlines()[0]}); delete it and re-run the stage "
                         f"that wrote it") from None


def load_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

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
        self.path = Path(path)  # its folder is made by the first write: a call that fails first leaves none

    def write(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            raise

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
