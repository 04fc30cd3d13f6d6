"""kill -9 and SIGTERM during the plug-in methods (issue 24): rded, G-VBSM while it computes the real-data
statistics it stores beside its teachers, DWA, EDC; and (issue 22) SRe2L with the multi-resolution parametrisation
and a text-to-image generator. Each run is killed at a chosen atomic rename (a finished
file written but not yet in place: ``test_faults.child``), re-run with the same settings, and compared with an
uninterrupted run: the same images bit for bit, the same records, nothing left behind. SIGTERM through the
CLI unwinds like Ctrl-C: one line, status 143, no lock, no temporary file, and the re-run finishes the set."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prismdd.artifacts import LOCK_FILE
from prismdd.core.io import read_json
from prismdd.stages.recover import recover, recover_config

from conftest import TINY_RECOVER
from test_faults import child, same_images, tmp_files

pytestmark = pytest.mark.slow  # kill -9 / SIGTERM of subprocesses: out of `pytest -m "not slow"`

# the renames of a tiny run (ipc 2, batch 8, 3 iterations): 1 the lock, 2 inputs.json, then (G-VBSM, EDC) one
# statistics file per teacher, then per batch its PNGs and its record
TINY_SD = object()  # stands for the folder of a tiny Stable Diffusion, made only for the case that needs it
KILL_AT = {  # case: (method, the rename to die at, settings)
    "rded": ("rded", 13, {}),  # batch 1's 2nd PNG
    "gvbsm": ("gvbsm", 4, {"gvbsm_stats_images": 64}),  # the 2nd teacher's statistics, computed, not yet stored
    "dwa": ("dwa", 13, {}),  # batch 1's 2nd image (DWA packs one IPC index per batch)
    "edc": ("edc", 16, {"edc_stats_images": 64}),  # batch 1's 1st PNG, after every teacher's statistics
    # issue 22: the multi-resolution parametrisation with DAS's view noise, and a text-to-image generator
    "sre2l-multires": ("sre2l", 13, {"param": "multires", "view_noise": 0.2}),  # batch 1's 2nd PNG
    "t2i": ("t2i", 13, {"t2i_model": TINY_SD, "t2i_steps": 2}),  # batch 1's 2nd PNG (t2i: batches of 8, 8, 4)
}


@pytest.fixture
def one_thread():
    """The killed child runs on one thread; so do the runs compared with it, so recorded losses match to the bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def records(out: Path) -> list[dict]:
    """Every batch record but its time and its config hash (which covers the output and teacher paths)."""
    return [{k: v for k, v in read_json(p).items() if k not in ("seconds", "config_hash")}
            for p in sorted((out / "records").glob("batch_*.json"))]


@pytest.mark.parametrize("case", list(KILL_AT))
def test_kill9_during_a_plugin_method_then_resume_is_identical(case, zoo, tmp_path, one_thread):
    method, n, extra = KILL_AT[case]
    if TINY_SD in extra.values():
        from tiny_models import save_tiny_sd

        model = str(save_tiny_sd(tmp_path / "sd"))
        extra = {k: model if v is TINY_SD else v for k, v in extra.items()}
    runs = {}
    for name in ("ref", "killed"):  # each its own copy of the zoo: G-VBSM and EDC store statistics beside it
        shutil.copytree(zoo, tmp_path / f"teachers_{name}")
        runs[name] = dict(TINY_RECOVER, teachers=str(tmp_path / f"teachers_{name}"), out=str(tmp_path / name), **extra)
    ref = recover(recover_config(method, **runs["ref"]))
    proc = child("recover", dict(runs["killed"], method=method), "kill", n, tmp_path / "unused")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    out = tmp_path / "killed"
    assert not (out / "manifest.json").exists() and (out / LOCK_FILE).exists()
    recover(recover_config(method, **runs["killed"]))
    same_images(out, ref)
    assert records(out) == records(ref)
    assert not tmp_files(out) and not tmp_files(tmp_path / "teachers_killed") and not (out / LOCK_FILE).exists()
    stats = sorted(p.name for p in (tmp_path / "teachers_killed").rglob("*stats*.safetensors"))
    assert stats == sorted(p.name for p in (tmp_path / "teachers_ref").rglob("*stats*.safetensors"))


def test_sigterm_is_as_clean_as_ctrl_c_and_the_rerun_finishes(zoo, tmp_path):
    args = ["recover", "--method", "rded", "--dataset", "digits", "--teachers", str(zoo), "--ipc", "2",
            "--iterations", "200", "--batch-size", "4", "--device", "cpu", "--seed", "0"]
    ref = tmp_path / "ref"
    assert subprocess.run([sys.executable, "-m", "prismdd", *args, "--out", str(ref)], capture_output=True,
                          text=True).returncode == 0
    out = tmp_path / "termed"
    proc = subprocess.Popen([sys.executable, "-m", "prismdd", *args, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "records" / "batch_00000.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never finished its first batch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "prismdd: terminated (SIGTERM); finished work is kept" in err and "Traceback" not in err
    assert not (out / LOCK_FILE).exists() and not tmp_files(out) and not (out / "manifest.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "prismdd", *args, "--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_images(out, ref)
    assert records(out) == records(ref)
