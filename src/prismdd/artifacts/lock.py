"""The one writer of an output folder: every stage holds an ``flock`` on ``<out>/.prismdd.lock`` for its life.

The kernel releases an ``flock`` when its process ends in any way (kill -9 included), so whether the lock is held
is the kernel's answer, not a guess from a PID that may have been reused; the file also records its owner (PID,
host, stage, start) for the one-line refusal. The decode cache (``core.data.cache``) locks its keys the same way.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import PrismError
from ..core.io import atomic_path, remove_orphans
from ..core.runtime import torch_threads
from ..core.log import get_logger

logger = get_logger("lock")

LOCK_FILE = ".prismdd.lock"  # the one writer of a folder: an flock held on it, and its PID, host and stage inside

_HELD: dict[str, tuple[int, int]] = {}  # folder -> (depth, fd) of the locks this process holds (re-entrant: the
# pipeline nests stages)


def _lock_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or empty: not written by a finished acquire (ours is complete before it is linked)


@contextmanager
def _folder_flock(folder: Path):
    """Serialises acquisitions and releases of ``folder``'s lock file between processes (held for milliseconds)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _refuse(folder: Path, lock: Path, owner: dict, option: str) -> PrismError:
    return PrismError(f"{option} {folder}: in use by prismdd {owner.get('stage')} (pid {owner.get('pid')} on "
                      f"{owner.get('host')}, since {owner.get('started')}); wait for it to finish or pass another "
                      f"{option} (if no such process runs, delete {lock})")


def _acquire(folder: Path, lock: Path, stage: str, option: str) -> int:
    """The fd holding the flock of a fresh lock file that records this process, or a refusal naming the owner."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
    with _folder_flock(folder):
        owner = _lock_owner(lock)
        if owner is not None:
            try:
                old = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:
                old = None
            if old is not None:
                try:
                    fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its process runs: the kernel says so
                    raise _refuse(folder, lock, owner, option) from None
                finally:
                    os.close(old)
            if owner and owner.get("host") != socket.gethostname():
                raise _refuse(folder, lock, owner, option)  # another machine's process: cannot be checked from here
            logger.warning(f"[{stage}] taking over the lock of a process that no longer runs "
                           f"(pid {owner.get('pid', '?')}, {owner.get('stage', '?')}) in {folder}",
                           extra={"stderr": True})  # on stderr, as a problem is
            lock.unlink(missing_ok=True)
        fd = None
        try:
            with atomic_path(lock) as tmp:  # the record is complete before the file appears under its name
                tmp.write_text(json.dumps(me) + "\n")
                fd = os.open(tmp, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: uncontended; the rename keeps the inode and the lock
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
    return fd


def _release(folder: Path, lock: Path, fd: int) -> None:
    with _folder_flock(folder):
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # still ours (not deleted and replaced by hand)
                lock.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the flock


@contextmanager
def output_lock(folder, stage: str, option: str = "--out"):
    """Hold ``folder`` as its one writer for the block: a second prismdd process writing there gets one line
    naming the first (PID, stage, start time); a lock file left by a process that no longer runs (kill -9, power
    loss: the kernel released its flock) is taken over with a note. Leftover temporary files of dead writers are
    removed once the lock is held."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PrismError(f"{option} {folder}: is a file, not a folder; pass a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        depth, fd = _HELD[key]
        _HELD[key] = (depth + 1, fd)
        try:
            yield folder
        finally:
            _HELD[key] = (_HELD[key][0] - 1, fd)
        return
    lock = folder / LOCK_FILE
    fd = _acquire(folder, lock, stage, option)
    _HELD[key] = (1, fd)
    try:
        remove_orphans(folder)
        yield folder
    finally:
        _HELD.pop(key, None)
        _release(folder, lock, fd)


def locked_stage(stage: str):
    """Decorator of a stage function ``fn(cfg)``: holds ``cfg.out`` (``output_lock``) for the stage's life,
    released on any exit. Under torchrun only rank 0 takes it (the ranks of one job share the folder). Every rank
    runs with ``cfg.threads`` torch threads when given (``torch_threads``; None: as the caller set them)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            if int(os.environ.get("RANK", "0")) != 0:
                with torch_threads(getattr(cfg, "threads", None)):
                    return fn(cfg, *args, **kwargs)
            made = _missing_folders(Path(cfg.out))
            try:
                with output_lock(cfg.out, stage), torch_threads(getattr(cfg, "threads", None)):
                    return fn(cfg, *args, **kwargs)
            except BaseException:
                # a call that failed its checks leaves no empty folder behind; anything written stays
                for folder in made:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                raise
        return run
    return wrap


def _missing_folders(path: Path) -> list[Path]:
    """The folders a stage creates for ``path``, deepest first (none when it exists)."""
    made = []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made
