"""Small shared helpers: atomic writes, manifests, seeding, devices, progress."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch


class PrismError(Exception):
    """A user-facing error: the CLI prints ``str(err)`` as one line and exits with status 2."""


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
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- provenance
def versions() -> dict:
    import numpy
    import torchvision

    from . import __version__

    out = {
        "prismdd": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def write_manifest(out_dir, stage: str, config, *, inputs: dict | None = None, outputs: dict | None = None,
                   wall_time: float | None = None, extra: dict | None = None) -> dict:
    """Write ``config.yaml`` (resolved) and ``manifest.json`` into a stage's output folder."""
    from .config import config_to_dict, save_config

    out_dir = Path(out_dir)
    save_config(config, out_dir / "config.yaml")
    manifest = {
        "stage": stage,
        "config": config_to_dict(config),
        "config_hash": config_hash(config),
        "seed": getattr(config, "seed", None),
        "inputs": inputs or {},
        "outputs": outputs or {},
        "versions": versions(),
        "wall_time_s": None if wall_time is None else round(wall_time, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    if extra:
        manifest.update(extra)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def read_manifest(folder, stage: str | None = None) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        hint = f" (run `prismdd {stage}` first)" if stage else ""
        raise PrismError(f"{path}: no manifest; this folder was not written by a finished prismdd stage{hint}")
    m = read_json(path)
    if stage and m.get("stage") != stage:
        raise PrismError(f"{path}: expected the output of stage {stage!r}, found {m.get('stage')!r}")
    return m


def config_hash(config, exclude: Iterable[str] = ("out", "device", "num_workers", "force")) -> str:
    from .config import config_to_dict

    d = {k: v for k, v in config_to_dict(config).items() if k not in set(exclude)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- runtime
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PrismError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise PrismError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def make_generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and any identifying parts (stage, batch index, epoch ...).

    Deriving every random stream from (seed, name, index) keeps results independent of the order in
    which work is done, of resume points and of the number of processes.
    """
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def derive_seed(seed: int, *parts: Any) -> int:
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def progress(iterable=None, **kw):
    """tqdm progress bar on a terminal, silent otherwise (CI logs stay readable)."""
    from tqdm.auto import tqdm

    kw.setdefault("disable", not sys.stderr.isatty())
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
