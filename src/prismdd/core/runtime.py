"""Runtime helpers: devices, seeded random streams, progress bars, timers."""
from __future__ import annotations

import hashlib
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import PrismError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PrismError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise PrismError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def default_channels_last(device: torch.device) -> bool:
    """NHWC by default only where it is known to pay: CUDA convolutions (tensor-core kernels want NHWC; timed by
    benchmarks/gpu_check.sh). On CPU it measured between 0.8x and 1.3x from run to run on the 2-core machine, the
    same speed within noise (BENCHMARKS.md section 1), so the plain layout stays."""
    return torch.device(device).type == "cuda"


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
    kw.setdefault("disable", not sys.stderr.isatty())
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
