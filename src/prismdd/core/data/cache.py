"""The decoded ImageFolder cache: each split decoded once into a memory-mapped uint8 file
(``<cache_root>/imagefolder/<key>/images.u8``), built under an ``flock`` so parallel ranks decode it once, sealed
with per-chunk checksums that are verified once per process; and the remembered header scans (``read_scan``)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import PrismError
from ..io import atomic_path
from ..runtime import progress
from .base import TensorImages
from .decode import FolderImages
from ..log import get_logger

logger = get_logger("data")


class CachedFolderImages(TensorImages):
    """An ImageFolder split decoded once into a uint8 memory-mapped array (``decode_cache``): sliced like an
    in-memory split; ``samples`` still names each image's file."""

    def __init__(self, images, targets, samples, resolution: int, channels: int, cache: Path):
        super().__init__(images, targets)
        self.samples, self.resolution, self.channels, self.cache = samples, resolution, channels, cache


def cache_root() -> Path | None:
    """Where decoded ImageFolders are kept: ``$PRISMDD_CACHE``, else ``$XDG_CACHE_HOME/prismdd`` or
    ``~/.cache/prismdd``; ``PRISMDD_CACHE=off`` (or 0/none) decodes every batch from the files instead."""
    env = os.environ.get("PRISMDD_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false", "no"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prismdd"


class _Decode(Dataset):
    """Cache building: one image per item, errors returned (not raised) so every worker reports its files."""

    def __init__(self, split: FolderImages):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            return self.split.load(i), ""
        except PrismError as e:
            return torch.zeros(self.split.channels, self.split.resolution, self.split.resolution, dtype=torch.uint8), str(e)


def files_digest(samples: list[tuple[str, int]]) -> str:
    """What a decoded cache depends on in the files: each path, label, size and modification time."""
    h = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# bump when the decoded layout or the decoding changes: older caches are then ignored (2: EXIF orientation applied,
# transparency composited on white, per-chunk checksums in meta.json)
CACHE_VERSION = 2
CHECK_CHUNK = 64 << 20  # bytes per checksum of images.u8: chunks are hashed in parallel and a change is located
_VERIFIED: set[tuple] = set()  # (images.u8, inode, mtime): caches whose checksums this process has verified


def cache_key(digest: str, **settings) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, "files": digest, **settings},
                                     sort_keys=True).encode()).hexdigest()[:24]


def _chunk_digests(path: Path, nbytes: int, chunk: int | None = None) -> list[str]:
    """sha256 of each ``chunk``-byte piece (default ``CHECK_CHUNK``) of a file, read through one shared read-only
    mapping and hashed by up to 4 threads (hashlib releases the GIL). RELIABILITY.md states what it costs
    (``benchmarks/cache_check.py``)."""
    chunk = chunk or CHECK_CHUNK
    with open(path, "rb") as f, mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ) as mm, memoryview(mm) as mv:
        def one(start: int) -> str:
            with mv[start: start + chunk] as piece:  # released before the mapping closes
                return hashlib.sha256(piece).hexdigest()

        starts = range(0, nbytes, chunk)
        if len(starts) == 1:
            return [one(0)]
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1, len(starts))) as pool:
            return list(pool.map(one, starts))


def _cache_problem(folder: Path, shape) -> str | None:
    """Why the decoded cache in ``folder`` may not be used, ``""`` when there is none yet, None when it is sound:
    ``meta.json`` parses and describes ``shape``, ``images.u8`` has exactly that many bytes, and (once per process
    and file version) every chunk's checksum matches, so changed bytes are never trained on."""
    if not folder.exists():
        return ""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:  # ValueError: garbled JSON or bytes that are not UTF-8
        return f"meta.json cannot be read: {type(e).__name__}"
    if not isinstance(meta, dict) or meta.get("shape") != list(shape):
        return f"meta.json does not describe {shape[0]} images of {list(shape[1:])}"
    nbytes = int(np.prod(shape))
    sums, chunk = meta.get("sha256"), meta.get("chunk_bytes")
    if not isinstance(chunk, int) or chunk < 1 or not isinstance(sums, list) or len(sums) != -(-nbytes // chunk):
        return "meta.json holds no checksums"
    data = folder / "images.u8"
    try:
        st = data.stat()
    except OSError:
        return "images.u8 is missing"
    if st.st_size != nbytes:
        return f"images.u8 holds {st.st_size} bytes, {nbytes} expected"
    stamp = (str(data.resolve()), st.st_ino, st.st_mtime_ns)
    if stamp not in _VERIFIED:
        bad = sum(a != b for a, b in zip(sums, _chunk_digests(data, nbytes, chunk)))
        if bad:
            return f"images.u8 changed since it was decoded: {bad} of {len(sums)} checksummed chunks differ"
        _VERIFIED.add(stamp)
    return None


def _discard(folder: Path) -> None:
    """Remove a damaged cache and the half-written copies of killed builders (the caller holds the key's lock, so
    no live process is writing them). Renamed first: a process that mapped the old file keeps reading its inode."""
    for p in [folder, *folder.parent.glob(f"{folder.name}.tmp-*"), *folder.parent.glob(f"{folder.name}.old-*")]:
        if p.exists():
            gone = p.with_name(f"{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)


def decode_cache(split: FolderImages, key: str, num_workers: int = 0, what: str = "images"):
    """``split`` decoded once into ``<cache_root>/imagefolder/<key>/images.u8`` (uint8 N x C x R x R, memory-mapped
    read-only-shared: pages are loaded as touched and shared between processes), written atomically under a lock
    so parallel ranks decode it once. A cache that fails ``_cache_problem`` (truncated, garbled metadata, changed
    bytes) is decoded again with a one-line notice. Returns a ``CachedFolderImages``, or ``split`` itself when
    caching is off or the disk lacks room (a one-line notice says so)."""
    root = cache_root()
    if root is None or len(split) == 0:
        return split
    folder = root / "imagefolder" / key
    shape = (len(split), split.channels, split.resolution, split.resolution)
    nbytes = int(np.prod(shape))
    if _cache_problem(folder, shape) is not None:
        (root / "imagefolder").mkdir(parents=True, exist_ok=True)
        with open(root / "imagefolder" / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process decoding the same folder: wait, then reuse its work
            problem = _cache_problem(folder, shape)  # asked again: that process may have built or repaired it
            if problem is not None:
                if problem:
                    logger.warning(f"[data] {what}: the decoded cache {folder} is damaged ({problem}); "
                                   f"decoding it again")
                _discard(folder)
                free = shutil.disk_usage(root).free
                if free < nbytes * 1.05 + (1 << 30):
                    logger.warning(f"[data] {what}: decoded cache needs {nbytes / 1e9:.1f} GB, {root} has "
                                   f"{free / 1e9:.1f} GB free; decoding from the files every epoch instead "
                                   f"(set PRISMDD_CACHE=DIR elsewhere)")
                    return split
                _write_cache(split, folder, shape, num_workers, what)
    arr = np.memmap(folder / "images.u8", dtype=np.uint8, mode="c", shape=shape)  # copy-on-write: never written back
    return CachedFolderImages(torch.from_numpy(arr), split.targets, split.samples, split.resolution, split.channels,
                              folder)


def _write_cache(split: FolderImages, folder: Path, shape, num_workers: int, what: str) -> None:
    t0 = time.perf_counter()
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arr = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=shape)
    workers = num_workers or (min(8, os.cpu_count() or 1) if len(split) > 2000 else 0)
    loader = torch.utils.data.DataLoader(_Decode(split), batch_size=64, num_workers=workers)
    errors, pos = [], 0
    try:
        for x, err in progress(loader, desc=f"decode {what}", total=len(loader)):
            arr[pos: pos + len(x)] = x.numpy()
            errors += [e for e in err if e]
            pos += len(x)
    except BaseException:  # interrupted: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        more = f" (and {len(errors) - 1} more: `prismdd check-data` lists them)" if len(errors) > 1 else ""
        raise PrismError(errors[0] + more)
    arr.flush()
    del arr
    nbytes = int(np.prod(shape))
    t1 = time.perf_counter()
    sums = _chunk_digests(tmp / "images.u8", nbytes)  # read back from the page cache: what was written is sealed
    meta = {"shape": list(shape), "files": len(split), "source": str(Path(split.samples[0][0]).parents[1]),
            "decode_seconds": round(t1 - t0, 2), "checksum_seconds": round(time.perf_counter() - t1, 3),
            "workers": workers, "chunk_bytes": CHECK_CHUNK, "sha256": sums}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: a folder with it is complete
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first (no lock on this file system): keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        st = (folder / "images.u8").stat()
        _VERIFIED.add((str((folder / "images.u8").resolve()), st.st_ino, st.st_mtime_ns))  # sealed just now
    logger.info(f"[data] {what}: decoded {len(split)} images once into {folder} ({nbytes / 1e6:.1f} MB, "
                f"{meta['decode_seconds']:.1f}s); every later load reuses it")


def read_scan(key: str) -> dict | None:
    """A remembered header scan, or None (none yet, or unreadable: the scan is simply made again)."""
    root = cache_root()
    path = root / "imagefolder" / f"{key}.scan.json" if root else None
    try:
        scan = json.loads(path.read_text()) if path and path.exists() else None
    except (OSError, ValueError):
        return None
    return scan if isinstance(scan, dict) and {"resolution", "channels", "notes"} <= scan.keys() else None


def write_scan(key: str, scan: dict) -> None:
    root = cache_root()
    if root is None:
        return
    try:
        with atomic_path(root / "imagefolder" / f"{key}.scan.json") as tmp:
            tmp.write_text(json.dumps(scan))
    except OSError:  # a read-only cache only costs the header scan next time
        pass
