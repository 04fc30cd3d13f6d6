"""FRePo's cost on this machine: wall-clock per outer step and peak memory, and how both grow with IPC.

Each configuration runs ``prismdd recover --method frepo`` in a fresh process, which reports its own peak resident
memory (``getrusage(RUSAGE_SELF)``) when it exits, for ``--steps`` outer steps, and the time per step is
taken from the run's own JSON-lines log (first logged step to last), so start-up and data loading are excluded:

    python benchmarks/frepo_cost.py                      # IPC 1, 10, 50 at the benchmark's CPU size
    python benchmarks/frepo_cost.py --ipcs 10 --widths 0.5,1.0 --real-batches 256,1024   # what the CPU size saves
    python benchmarks/frepo_cost.py --smoke              # CI-sized (digits)

Prints one Markdown table: IPC, images, pool width, real batch, threads, s per step, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def one_run(dataset: str, ipc: int, width: float, real_batch: int, steps: int, threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = ["prismdd", "recover", "--method", "frepo", "--dataset", dataset, "--ipc", str(ipc),
            "--iterations", str(steps), "--frepo-width", str(width), "--frepo-real-batch", str(real_batch),
            "--log-every", "1", "--device", "cpu", "--out", str(out)]
    # the child reports its OWN peak resident memory when it exits (Linux ru_maxrss: KiB)
    code = ("import atexit, resource, runpy, sys; atexit.register(lambda: sys.stderr.write("
            "'PEAK_RSS_KIB=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
            f"sys.argv = {argv!r}; runpy.run_module('prismdd', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    peak_kib = int(proc.stderr.rsplit("PEAK_RSS_KIB=", 1)[1].split()[0])
    log = [json.loads(line) for line in (out / "logs" / "frepo.jsonl").read_text().splitlines()]
    # the first step includes one-off work (first forward, allocator warm-up): time from step 1 on
    t = [r["time"] for r in log if r["step"] >= 1]
    per_step = (t[-1] - t[0]) / max(1, len(t) - 1)
    return {"per_step": per_step, "peak_mib": peak_kib / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--widths", default="0.5")
    p.add_argument("--real-batches", default="256")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        a.dataset, a.ipcs, a.widths, a.real_batches, a.steps, a.threads = "digits", "1,2", "0.25", "32", 4, 1
    print(f"{a.dataset}, {a.steps} outer steps per row, {a.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; peak RSS of the whole recover process (data included)\n")
    print("| IPC | images | pool width | real batch | s per step | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(int(i), float(w), int(r)) for i in a.ipcs.split(",") for w in a.widths.split(",")
                for r in a.real_batches.split(",")]
        for n, (ipc, width, real_batch) in enumerate(runs):
            r = one_run(a.dataset, ipc, width, real_batch, a.steps, a.threads, Path(tmp) / f"run{n}")
            print(f"| {ipc} | {ipc * 10} | {width} | {real_batch} | {r['per_step']:.3f} | {r['peak_mib']:.0f} |",
                  flush=True)

if __name__ == "__main__":
    main()
