"""Shared fixtures: one tiny teacher zoo on ``digits`` per session, an in-process CLI runner, and helpers
for tiny recover runs. Everything runs on CPU in seconds (8x8 images, width-0.25 networks)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: stable timings on a shared 2-core machine, and the same float reduction order as the
# OMP_NUM_THREADS=1 subprocesses of the torchrun test.
torch.set_num_threads(1)
# ...and the same for the command line, whose default --threads is OMP_NUM_THREADS when set (else every usable core):
# a test that compares a CLI run with an in-process or subprocess run needs one reduction order on every side
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.pop("WORLD_SIZE", None)  # recover must run as a single process unless a test launches torchrun
# the running-jobs count behind the default --threads: the tests' own folder, so jobs elsewhere on the machine (or
# another pytest worker) never change a test's thread count
os.environ["PRISMDD_JOBS_DIR"] = __import__("tempfile").mkdtemp(prefix="prismdd-test-jobs-")
# decoded ImageFolder caches go to a throw-away folder, never the user's ~/.cache/prismdd
if "PRISMDD_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PRISMDD_CACHE"] = tempfile.mkdtemp(prefix="prismdd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PRISMDD_CACHE"], True)

ZOO_ARCHS = ("convnet", "resnet18", "mobilenet_v2")
# the tiny recover run every end-to-end test uses: 10 classes x ipc 2 = 20 units -> batches of 8, 8, 4
TINY_RECOVER = dict(dataset="digits", ipc=2, iterations=3, batch_size=8, device="cpu", seed=0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a minute on 2 CPU cores")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them)")


@pytest.fixture(autouse=True)
def terminal_messages():
    """prismdd's messages on stdout as the `prismdd` command shows them (its terminal handler at info level), so
    a test that calls a stage directly reads them with capsys as a CLI user would see them; each test starts from
    that level (a --quiet test leaves nothing behind). ``library_logging`` undoes it."""
    import logging

    from prismdd.core.log import ROOT, configure

    logger = logging.getLogger(ROOT)
    handlers, level = list(logger.handlers), logger.level
    configure(logging.INFO)
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def library_logging(terminal_messages):
    """The ``prismdd`` logger as ``import prismdd`` leaves it for a library caller: no handler of prismdd's own
    (the NullHandler only), no level."""
    import logging

    from prismdd.core.log import ROOT, TerminalHandler

    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, TerminalHandler)]
    logger.setLevel(logging.NOTSET)
    yield logger


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """convnet, resnet18 and mobilenet_v2 teachers on digits (width 0.25, 2 epochs), trained once.

    Read-only for tests: copy it (``shutil.copytree``) before adding teachers to it.
    """
    from prismdd.core.config import build_config
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    out = tmp_path_factory.mktemp("zoo")
    # batch 256: 5 steps per epoch; the teachers' accuracy does not matter for these tests
    squeeze(build_config(SqueezeConfig, dict(dataset="digits", arch=",".join(ZOO_ARCHS), width=0.25, epochs=2,
                                             batch_size=256, out=str(out), device="cpu")))
    return out


@pytest.fixture(scope="session")
def cli():
    """``cli([...]) -> exit code``: runs ``prismdd.cli.main`` in-process (argparse's SystemExit included)."""
    from prismdd.cli import main

    def run(argv: list[str]) -> int:
        try:
            return int(main([str(a) for a in argv]) or 0)
        except SystemExit as e:  # --help, argparse usage errors
            return int(e.code or 0)

    return run


@pytest.fixture(scope="session")
def recover_run(zoo):
    """``recover_run(out, method="prism", **overrides) -> out``: a tiny recover run with the session zoo."""
    from prismdd.stages.recover import recover, recover_config

    def run(out, method: str = "prism", **overrides) -> Path:
        settings = dict(TINY_RECOVER, teachers=str(zoo), out=str(out))
        settings.update(overrides)
        return recover(recover_config(method, **settings))

    return run


@pytest.fixture(scope="session")
def prism_run(recover_run, tmp_path_factory) -> Path:
    """The reference PRISM run (seed 0) that determinism, resume and torchrun results are compared with."""
    return recover_run(tmp_path_factory.mktemp("prism_ref"), "prism")


def png_files(folder) -> dict[str, Path]:
    """``{relative path: file}`` of every image a recover run wrote."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p for p in sorted((folder / "images").rglob("*.png"))}


def png_array(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.uint8).copy()


def run_torchrun(args: list, nproc: int = 2, timeout: int = 300):
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m prismdd ARGS`` on CPU (gloo), with
    one thread per rank and no inherited rank variables; asserts it succeeded and returns the process."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "prismdd", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
