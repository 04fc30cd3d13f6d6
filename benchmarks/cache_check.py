"""What the decoded cache's checksum check costs: ``_cache_problem`` (meta.json parsed, sizes compared, every
64 MiB chunk of images.u8 hashed with sha256 by up to 4 threads) on a cache of N random 3x224x224 images, the
first time in a process (best of 3) and again in the same process (skipped: once per process and file version).
The file has just been written, so it is read from the page cache; a cold read adds the disk's read time.

    python benchmarks/cache_check.py 1000 10000      (RELIABILITY.md quotes its output)
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import prismdd.core.data.cache as D


def measure(n: int) -> str:
    shape = (n, 3, 224, 224)
    nbytes = int(np.prod(shape))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "key"
        folder.mkdir()
        np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tofile(folder / "images.u8")
        sums = D._chunk_digests(folder / "images.u8", nbytes)
        meta = {"shape": list(shape), "chunk_bytes": D.CHECK_CHUNK, "sha256": sums}  # as _write_cache seals it
        (folder / "meta.json").write_text(json.dumps(meta))
        first = []
        for _ in range(3):
            D._VERIFIED.clear()  # as a new process finds it
            t = time.perf_counter()
            assert D._cache_problem(folder, shape) is None
            first.append(time.perf_counter() - t)
        t = time.perf_counter()
        D._cache_problem(folder, shape)
        again = time.perf_counter() - t
    best = min(first)
    return (f"{n} images of 3x224x224 ({nbytes / 2**20:.0f} MiB, {len(sums)} chunks): checked in {best:.3f} s "
            f"({nbytes / 2**30 / best:.2f} GiB/s), again in the same process {again * 1e3:.2f} ms")


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["1000"]:
        print(measure(int(arg)))
