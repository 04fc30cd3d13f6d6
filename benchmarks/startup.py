"""CLI start-up: wall time of the commands that should answer at once (issue 27), as a Markdown table.

Each command runs ``--repeats`` times in a fresh interpreter (``python -m prismdd ...``, output discarded); the
table shows the median and the slowest, whether the command imported torch (``-X importtime``), and beside them
``python -c "import torch"``, the floor of any command that needs torch. The machine's load average is printed
with the table: on a shared machine every number moves with it.

    python benchmarks/startup.py
    python benchmarks/startup.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ["--help"],
    ["methods"],
    ["methods", "--protocols"],
    ["models"],
    ["datasets"],
    ["recover", "--help"],
]


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-X", "importtime", *args[1:]], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, check=True).stderr
    return any(line.rstrip().endswith("| torch") for line in out.splitlines())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = [(" ".join(["python", "-c", "'import torch'"]), [sys.executable, "-c", "import torch"])]
    rows += [("prismdd " + " ".join(c), [sys.executable, "-m", "prismdd", *c]) for c in COMMANDS]
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (1 / 5 / 15 min), {a.repeats} runs each\n")
    print("| command | median s | slowest s | imports torch |")
    print("|---|---|---|---|")
    for name, args in rows:
        times = [timed(args) for _ in range(a.repeats)]
        torch_loaded = "yes" if name.startswith("python -c") else ("yes" if imports_torch(args) else "no")
        print(f"| `{name}` | {statistics.median(times):.2f} | {max(times):.2f} | {torch_loaded} |", flush=True)


if __name__ == "__main__":
    main()
