"""Runtime helpers: devices, seeded random streams, progress bars, timers."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import PrismError
from .io import pid_alive
from .log import get_logger


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


JOBS_DIR_ENV = "PRISMDD_JOBS_DIR"
RETUNE_EVERY_S = 20.0  # how often a running job looks again at how many prismdd jobs share its cores
# the first look comes sooner: two jobs started together each count only themselves when the other has not yet
# registered (measured: one of the two took 2 threads every time), which a look after a few seconds corrects
FIRST_RETUNE_S = 3.0
_auto = {"on": False, "last": 0.0}  # threads left to prismdd (no --threads, no OMP_NUM_THREADS): re-tuned as jobs come and go


def jobs_dir() -> Path:
    """Where every running prismdd command of this user leaves a file named by its pid (``PRISMDD_JOBS_DIR``)."""
    given = os.environ.get(JOBS_DIR_ENV, "").strip()
    return Path(given) if given else Path(tempfile.gettempdir()) / f"prismdd-jobs-{os.getuid()}"


def live_jobs() -> int:
    """The prismdd commands running on this machine now (this one included, at least 1); files of processes that
    died (kill -9) are removed on the way."""
    n = 0
    try:
        entries = list(jobs_dir().iterdir())
    except OSError:
        return 1
    for p in entries:
        if p.name.isdigit() and pid_alive(int(p.name)):
            n += 1
        elif p.name.isdigit():
            p.unlink(missing_ok=True)
    return max(1, n)


@contextmanager
def shared_cores(auto: bool):
    """Count this command among the machine's prismdd jobs while it runs; ``auto``: its threads are left to
    ``default_threads`` and re-tuned while it runs (``retune_threads``), so a job started beside it, or one that
    ends, moves both to their share of the cores."""
    folder, me = jobs_dir(), None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        me = folder / str(os.getpid())
        me.touch()
    except OSError:  # a read-only temp folder: the count is lost, nothing else
        me = None
    _auto.update(on=auto, last=time.monotonic() - RETUNE_EVERY_S + FIRST_RETUNE_S)
    try:
        yield
    finally:
        _auto["on"] = False
        if me is not None:
            me.unlink(missing_ok=True)


def default_threads() -> int:
    """torch's CPU threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` if set (the user's word), else the
    cores this process may use (``taskset``, a container's or a scheduler's CPU set: not the machine's count) divided
    among the prismdd commands running on this machine (``live_jobs``) and the processes torchrun starts here
    (``LOCAL_WORLD_SIZE``). More threads than free cores cost 1.8-5x when two jobs share a machine (BENCHMARKS.md
    section 14): two jobs started side by side take half the cores each, and a job left alone takes them all
    again (``retune_threads``)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call: every core
        cores = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    share = max(int(local) if local.isdigit() and int(local) > 0 else 1, live_jobs())
    return max(1, cores // share)


def retune_threads() -> None:
    """Where threads are left to prismdd, set them to ``default_threads()`` again, at most every ``RETUNE_EVERY_S``
    (called from the progress heartbeat, on the thread that runs the work)."""
    if not _auto["on"] or time.monotonic() - _auto["last"] < RETUNE_EVERY_S:
        return
    _auto["last"] = time.monotonic()
    n = default_threads()
    if n != torch.get_num_threads():
        get_logger("runtime").debug(f"[runtime] {live_jobs()} prismdd job(s) on this machine: {n} thread(s)")
        torch.set_num_threads(n)


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op CPU threads inside the block: ``n``; None leaves them as they are (the command line has
    already set ``default_threads()``; a Python caller keeps its own ``torch.set_num_threads``, as the benchmark
    scripts' ``--threads`` do). The count before is restored after."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


PROGRESS_EVERY_S = 60.0  # seconds between progress lines when no bar is shown (a log file, nohup, a batch job)
PROGRESS_EVERY_ENV = "PRISMDD_PROGRESS_EVERY"  # overrides it (seconds), e.g. for a test with output redirected


def progress_every() -> float:
    given = os.environ.get(PROGRESS_EVERY_ENV, "").strip()
    try:
        return max(0.0, float(given)) if given else PROGRESS_EVERY_S
    except ValueError:
        raise PrismError(f"{PROGRESS_EVERY_ENV}={given!r}: expected a number of seconds") from None


def clock(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``: elapsed and left times in progress lines."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Heartbeat:
    """A progress line at most every ``progress_every()`` seconds when stderr is not a terminal (where ``progress``'s
    bar is silent), so a job with its output in a file says where it is:
    ``[recover prism] step 120/300 (40 %), loss 1.2345, 2m10s elapsed, about 3m15s left``.

    ``total`` counts the steps of the whole stage and ``done`` those finished before this call (a resume); the time
    left is estimated from the steps made in this call. ``enabled=False``: silent (torchrun's other ranks)."""

    def __init__(self, stage: str, total: int, *, done: int = 0, enabled: bool = True, unit: str = "step"):
        self.stage, self.total, self.done, self.first = stage, max(1, int(total)), int(done), int(done)
        self.unit = unit
        self.enabled = enabled and not sys.stderr.isatty()
        self.every = progress_every()
        self.timer, self.last = Timer(), 0.0

    def step(self, n: int = 1, loss: float | torch.Tensor | None = None, **more) -> None:
        self.done += n
        retune_threads()
        if not self.enabled or self.timer.elapsed - self.last < self.every:
            return
        self.last = t = self.timer.elapsed
        made = self.done - self.first
        parts = [f"{k} {v}" for k, v in more.items()]
        parts.append(f"{self.unit} {self.done}/{self.total} ({100 * self.done / self.total:.0f} %)")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{clock(t)} elapsed")
        if made > 0:
            parts.append(f"about {clock(t / made * max(0, self.total - self.done))} left")
        get_logger(self.stage.split()[0]).info(f"[{self.stage}] " + ", ".join(parts))
