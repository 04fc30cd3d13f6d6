"""RandAugment throughput (DELT's student protocol, ``--rand-augment``): images per second, serial and split over
worker processes (``--num-workers``), at a few image sizes. The images are identical for any worker count
(tests/stages/test_randaugment.py); only the time changes.

    python benchmarks/rand_augment.py                        # 28 px grey, 32 and 224 px RGB; workers 0, 2
    python benchmarks/rand_augment.py --workers 0,4,8 --batch 256
"""
from __future__ import annotations

import argparse
import time

import torch

from prismdd.core.augment import rand_augment_images, rand_augment_pool
from prismdd.core.config import comma_list

CONFIG = "rand-m6-n2-mstd1.0"  # DELT's


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1x28,3x32,3x224", help="comma list of CHANNELSxSIDE")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    workers = [int(w) for w in comma_list(a.workers)]
    for w in workers:
        if w > 1:  # start the pool (spawn + imports, seconds) before any clock runs
            rand_augment_images(torch.zeros(w, 3, 8, 8, dtype=torch.uint8), torch.arange(w), CONFIG, w)
    print(f"RandAugment {CONFIG}, batch {a.batch}, best of {a.repeats}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| image | " + " | ".join(f"workers {w}: images/s" for w in workers) + " |")
    print("|---|" + "---|" * len(workers))
    gen = torch.Generator().manual_seed(0)
    for spec in comma_list(a.sizes):
        c, side = (int(v) for v in spec.split("x"))
        x = torch.randint(0, 256, (a.batch, c, side, side), generator=gen, dtype=torch.uint8)
        seeds = torch.randint(0, 2 ** 62, (a.batch,), generator=gen)
        cells = []
        for w in workers:
            best = float("inf")
            for _ in range(a.repeats):
                t = time.perf_counter()
                rand_augment_images(x, seeds, CONFIG, w)
                best = min(best, time.perf_counter() - t)
            cells.append(f"{a.batch / best:,.0f}")
        print(f"| {c} x {side} x {side} | " + " | ".join(cells) + " |", flush=True)
    for w in workers:
        if w > 1:
            rand_augment_pool(w).shutdown()


if __name__ == "__main__":
    main()
