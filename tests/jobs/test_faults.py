"""Fault injection (issue 14): kill -9 mid-stage and resume, two writers of one folder, a full disk, NaN
teachers, outputs reused with other inputs, and the bad inputs a hostile user tries. Every failure must be
ONE line (``prismdd: error: ...``, exit status 2, no traceback) or a correct result.

Kept fast: digits, the session zoo (width 0.25), a handful of iterations; subprocesses only where a real
kill -9 or a real file-size limit is the point."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prismdd.artifacts import LOCK_FILE, check_finite_labels, output_lock, pack_logits
from prismdd.core.errors import PrismError
from prismdd.core.io import JsonlLog, read_json, remove_orphans, write_json

from conftest import TINY_RECOVER, png_array, png_files

# Runs a stage in a child process and injects a fault at the N-th atomic rename (``os.replace``): the N-th
# finished file's temporary copy is complete but not yet in place. ``kill``: SIGKILL itself there (kill -9);
# ``hold``: write a marker file and sleep there, so the parent can act while the child holds the folder.
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    stage, settings, action, n, marker = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    real_replace, calls = os.replace, [0]
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            open(marker, "w").close()
            time.sleep(120)
        return real_replace(src, dst)
    os.replace = replace
    if stage == "recover":
        from prismdd.stages.recover import recover, recover_config
        recover(recover_config(settings.pop("method"), **settings))
    elif stage == "relabel":
        from prismdd.core.config import build_config
        from prismdd.stages.relabel import RelabelConfig, relabel
        relabel(build_config(RelabelConfig, settings))
    else:
        from prismdd.core.config import build_config
        from prismdd.stages.squeeze import SqueezeConfig, squeeze
        squeeze(build_config(SqueezeConfig, settings))
""")


def child(stage: str, settings: dict, action: str, n: int, marker: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-c", CHILD, stage, json.dumps(settings), action, str(n), str(marker)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The CLI failed with status 2 and one ``prismdd: error:`` line that contains every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prismdd: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def same_images(a: Path, b: Path) -> None:
    fa, fb = png_files(a), png_files(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert (png_array(fa[k]) == png_array(fb[k])).all(), k


def tmp_files(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp"))


# ----------------------------------------------------------------------------- kill -9, two writers, resume
@pytest.mark.slow
def test_recover_second_writer_refused_kill9_then_resume_is_identical(zoo, prism_run, recover_run, tmp_path, cli,
                                                                      capsys):
    """A recover holds its folder; a second recover there gets one line; after the first is killed -9 mid-write
    (a half-renamed file left behind) its stale lock is taken over and the resumed set is the uninterrupted one."""
    out = tmp_path / "prism"
    marker = tmp_path / "holding"
    settings = dict(TINY_RECOVER, teachers=str(zoo), out=str(out), method="prism")
    # renames: the lock, inputs.json, then per batch 8 PNGs + its record: the 13th is batch 1's 2nd PNG
    proc = child("recover", settings, "hold", 13, marker)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the child never reached the fault point"
            time.sleep(0.2)
        code = cli(["recover", "--method", "prism", "--dataset", "digits", "--teachers", zoo, "--ipc", 2,
                    "--iterations", 3, "--batch-size", 8, "--device", "cpu", "--out", out])
        one_line_error(capsys, code, str(out), "in use by prismdd recover", f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9 while it sits inside a write
        proc.wait()
    assert (out / LOCK_FILE).exists() and tmp_files(out), "the kill should leave its lock and a .tmp behind"
    assert (out / "records" / "batch_00000.json").exists() and not (out / "manifest.json").exists()

    capsys.readouterr()
    recover_run(out, "prism")
    assert "taking over the lock" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists() and not tmp_files(out)
    same_images(out, prism_run)
    for b in range(3):
        mine, ref = read_json(out / f"records/batch_{b:05d}.json"), read_json(prism_run / f"records/batch_{b:05d}.json")
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in ref.items() if k != "seconds"}


@pytest.mark.slow
def test_squeeze_kill9_then_resume_is_identical(tmp_path, cli):
    """kill -9 while squeeze writes its second checkpoint; the re-run resumes and ends bit-identical."""
    settings = dict(dataset="digits", arch="convnet", width=0.25, epochs=2, batch_size=256, device="cpu")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    args = ["squeeze", "--dataset", "digits", "--arch", "convnet", "--width", 0.25, "--epochs", 2,
            "--batch-size", 256, "--device", "cpu"]
    assert cli(args + ["--out", ref]) == 0
    # renames: the lock, epoch 1's checkpoint, then epoch 2's checkpoint: killed with it written, not renamed
    proc = child("squeeze", dict(settings, out=str(out)), "kill", 3, tmp_path / "unused")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert (out / "convnet" / "checkpoint.pt").exists() and not (out / "convnet" / "card.json").exists()
    assert cli(args + ["--out", out]) == 0
    a, b = load_file(str(out / "convnet/model.safetensors")), load_file(str(ref / "convnet/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["epoch"] for line in (out / "convnet/log.jsonl").read_text().splitlines()] == [1, 2]
    assert not tmp_files(out) and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_relabel_kill9_then_resume_is_identical(prism_run, zoo, tmp_path, cli):
    """kill -9 with epoch 1's label file written but not renamed; the re-run keeps epoch 0, redoes epoch 1 and
    the files equal an uninterrupted run's."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    args = ["relabel", "--distilled", prism_run, "--teachers", zoo, "--epochs", 3, "--topk", 3]
    assert cli(args + ["--out", ref]) == 0
    settings = dict(distilled=str(prism_run), teachers=str(zoo), epochs=3, topk=3, out=str(out))
    # renames: the lock, epoch 0, then epoch 1
    proc = child("relabel", settings, "kill", 3, tmp_path / "unused")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert [p.name for p in out.glob("epoch_*")] == ["epoch_0000.safetensors"] and tmp_files(out)
    assert cli(args + ["--out", out]) == 0
    for e in range(3):
        a, b = load_file(str(out / f"epoch_{e:04d}.safetensors")), load_file(str(ref / f"epoch_{e:04d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), e
    assert not tmp_files(out) and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_lock_is_exclusive_reentrant_and_stale_after_death(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    # the owner holds an flock on the lock file (as output_lock does) and records itself in it
    hold = "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)"
    (folder / LOCK_FILE).write_text("")
    sleeper = subprocess.Popen([sys.executable, "-c", hold, str(folder / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:  # a lock whose owner runs: refused, naming it
        sleeper.stdout.readline()  # it holds the flock now
        (folder / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                    "stage": "relabel", "started": "then"}))
        with pytest.raises(PrismError, match=f"in use by prismdd relabel \\(pid {sleeper.pid}"):
            with output_lock(folder, "validate"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with output_lock(folder, "validate"):  # its owner is gone: taken over
        assert read_json(folder / LOCK_FILE)["pid"] == os.getpid()
        with output_lock(folder, "validate"):  # the same process again (the pipeline nests stages): fine
            pass
        assert (folder / LOCK_FILE).exists()
    assert not (folder / LOCK_FILE).exists()
    assert "taking over the lock" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # released on any exit
        with output_lock(folder, "validate"):
            raise RuntimeError("boom")
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_file_whose_flock_is_free_is_taken_over(tmp_path, capsys):
    """The kernel says whether the owner runs: a record naming a live PID (a reused PID) whose flock nobody holds
    is a dead writer's lock, taken over with the note."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename,
                                                "stage": "recover", "started": "then"}))
    with output_lock(folder, "validate"):
        assert read_json(folder / LOCK_FILE)["pid"] == os.getpid()
    assert "taking over the lock of a process that no longer runs" in capsys.readouterr().err
    assert not (folder / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- full disk, permissions
@pytest.mark.slow
def test_disk_full_via_file_size_limit_is_one_line(prism_run, zoo, tmp_path):
    """A real short write: RLIMIT_FSIZE makes the label file's write fail with EFBIG (errno 27), as ENOSPC would."""
    out = tmp_path / "labels"
    code = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))
        from prismdd.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", code, "relabel", "--distilled", str(prism_run), "--teachers",
                           str(zoo), "--epochs", "2", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("prismdd: error:") and "epoch_0000.safetensors" in line and "disk" in line, line
    assert not list(out.glob("epoch_*")) and not tmp_files(out) and not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 PermissionError(errno.EACCES, "Permission denied")])
def test_environment_errors_at_the_cli_boundary(prism_run, zoo, tmp_path, cli, capsys, monkeypatch, err):
    """A failed write() names no file; the atomic writer adds the path and the CLI prints one line."""
    def failing_save(*a, **k):
        raise err
    monkeypatch.setattr("safetensors.torch.save", failing_save)  # core.io imports it when it writes
    out = tmp_path / "labels"
    code = cli(["relabel", "--distilled", prism_run, "--teachers", zoo, "--epochs", 1, "--out", out,
                "--device", "cpu"])
    line = one_line_error(capsys, code, str(out / "epoch_0000.safetensors"), err.strerror)
    assert ("disk is full" if err.errno == errno.ENOSPC else "permission denied") in line
    assert not tmp_files(out)


def test_torch_save_failure_is_one_line(tmp_path, cli, capsys, monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", failing)
    out = tmp_path / "t"
    code = cli(["squeeze", "--dataset", "digits", "--arch", "convnet", "--width", 0.25, "--epochs", 1,
                "--batch-size", 256, "--steps-per-epoch", 1, "--device", "cpu", "--out", out])
    one_line_error(capsys, code, "checkpoint.pt", "disk may be full")


def test_out_is_a_file(prism_run, zoo, tmp_path, cli, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code = cli(["relabel", "--distilled", prism_run, "--teachers", zoo, "--epochs", 1, "--out", f])
    one_line_error(capsys, code, f"--out {f}", "is a file")


# ----------------------------------------------------------------------------- provenance on every reuse
def test_resume_with_a_teacher_retrained_in_place_is_refused(zoo, recover_run, tmp_path, cli, capsys):
    teachers = tmp_path / "zoo"
    shutil.copytree(zoo, teachers)
    out = recover_run(tmp_path / "prism", "prism", teachers=str(teachers))
    (out / "records" / "batch_00002.json").unlink()  # as if killed before the last batch finished
    w = teachers / "resnet18" / "model.safetensors"
    state = load_file(str(w))
    k = next(k for k, v in state.items() if v.is_floating_point() and "running" not in k)
    state[k] = state[k] + 0.01  # retrained in place: same card, other weights
    save_file(state, str(w))
    code = cli(["recover", "--method", "prism", "--dataset", "digits", "--teachers", teachers, "--ipc", 2,
                "--iterations", 3, "--batch-size", 8, "--device", "cpu", "--out", out])
    one_line_error(capsys, code, "teacher resnet18 changed", "--force")
    assert not (out / "records" / "batch_00002.json").exists()


def test_labels_of_other_images_refused_after_recover_force(zoo, recover_run, tmp_path, cli, capsys):
    """relabel records the pixels it labelled; recover --force rewrote them (other settings): validate refuses."""
    rec, labels = tmp_path / "prism", tmp_path / "labels"
    recover_run(rec, "prism")
    assert cli(["relabel", "--distilled", rec, "--teachers", zoo, "--epochs", 1, "--out", labels]) == 0
    recover_run(rec, "prism", iterations=4, force=True)
    code = cli(["validate", "--distilled", rec, "--labels", labels, "--epochs", 1, "--device", "cpu",
                "--out", tmp_path / "eval"])
    one_line_error(capsys, code, f"--labels {labels}", "made for other images", "--force")
    # relabel into the same folder without --force: refused too (the distilled set changed)
    code = cli(["relabel", "--distilled", rec, "--teachers", zoo, "--epochs", 1, "--out", labels])
    one_line_error(capsys, code, "--force")


def test_relabel_reuse_checks_the_teacher_digest(prism_run, zoo, tmp_path, cli, capsys):
    teachers = tmp_path / "zoo"
    shutil.copytree(zoo, teachers)
    labels = tmp_path / "labels"
    assert cli(["relabel", "--distilled", prism_run, "--teachers", teachers, "--epochs", 1, "--out", labels]) == 0
    w = teachers / "convnet" / "model.safetensors"
    state = load_file(str(w))
    state = {k: (v * 1.01 if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, str(w))
    code = cli(["relabel", "--distilled", prism_run, "--teachers", teachers, "--epochs", 2, "--out", labels])
    one_line_error(capsys, code, "epoch_0000.safetensors", "teacher convnet changed", "--force")


def test_changed_distilled_image_refused_by_every_reader_and_by_a_rerun(prism_run, zoo, tmp_path, cli, capsys):
    """A PNG zeroed after recover: relabel, validate and metrics refuse it in one line naming the file, and the same
    recover command no longer reports the folder finished; deleting it (the fix the line gives) remakes it."""
    from PIL import Image

    rec = tmp_path / "prism"
    shutil.copytree(prism_run, rec)
    png = rec / "images" / "003" / "003_001.png"
    Image.fromarray(png_array(png) * 0).save(png)  # same size, same format: only the digest tells
    needles = (str(png), "changed since recover wrote it", "delete it")
    for argv in (["relabel", "--distilled", rec, "--teachers", zoo, "--epochs", 1, "--out", tmp_path / "l"],
                 ["validate", "--distilled", rec, "--teachers", zoo, "--epochs", 1, "--device", "cpu",
                  "--out", tmp_path / "v"],
                 ["metrics", "--distilled", rec, "--observer", zoo / "convnet", "--out", tmp_path / "m"]):
        one_line_error(capsys, cli(argv), *needles)
    recover_args = ["recover", "--method", "prism", "--dataset", "digits", "--teachers", zoo, "--ipc", 2,
                    "--iterations", 3, "--batch-size", 8, "--device", "cpu", "--out", rec]
    one_line_error(capsys, cli(recover_args), *needles, "--force")
    png.unlink()
    assert cli(recover_args) == 0
    same_images(rec, prism_run)  # the batch of the deleted image was made again, bit for bit
    m = read_json(rec / "manifest.json")
    assert m["outputs"]["images"]["3_1"]["sha256"] == read_json(prism_run / "manifest.json")["outputs"]["images"][
        "3_1"]["sha256"]
    # an entry dropped from the manifest by hand: the set's digest no longer matches
    del m["outputs"]["images"]["3_1"]
    write_json(rec / "manifest.json", m)
    from prismdd.artifacts import load_distilled

    with pytest.raises(PrismError, match="image list was edited"):
        load_distilled(rec)


def test_recover_folder_without_digests_is_refused_in_one_line(prism_run, tmp_path):
    """A manifest that seals no image (not written by this prismdd's recover) cannot vouch for its PNGs: refused,
    naming the fix, whether the set's digest or an image's is missing."""
    from prismdd.artifacts import load_distilled

    unsealed = tmp_path / "unsealed"
    shutil.copytree(prism_run, unsealed)
    m = read_json(unsealed / "manifest.json")
    del m["outputs"]["images_sha256"]
    write_json(unsealed / "manifest.json", m)
    with pytest.raises(PrismError, match="records no images_sha256.*--force") as ei:
        load_distilled(unsealed)
    assert "\n" not in str(ei.value)
    for e in m["outputs"]["images"].values():
        del e["sha256"]
    write_json(unsealed / "manifest.json", m)
    with pytest.raises(PrismError, match="records no sha256.*--force"):
        load_distilled(unsealed)


def test_force_with_a_smaller_ipc_leaves_no_stale_images(recover_run, tmp_path):
    out = recover_run(tmp_path / "prism", "prism", ipc=2)
    assert len(png_files(out)) == 20
    recover_run(out, "prism", ipc=1, force=True)
    assert len(png_files(out)) == 10 == read_json(out / "manifest.json")["outputs"]["num_images"]
    assert len(list((out / "records").glob("batch_*.json"))) == 2


# ----------------------------------------------------------------------------- finite checks
def nan_zoo(zoo, tmp_path, arch: str, key_part: str) -> tuple[Path, str]:
    teachers = tmp_path / "nanzoo"
    shutil.copytree(zoo, teachers)
    w = teachers / arch / "model.safetensors"
    state = load_file(str(w))
    k = next(k for k, v in state.items() if key_part in k and v.is_floating_point())
    state[k] = torch.full_like(state[k], float("nan"))
    save_file(state, str(w))
    return teachers, k


def test_nan_teacher_refused_before_labels_are_stored(prism_run, zoo, tmp_path, cli, capsys):
    teachers, key = nan_zoo(zoo, tmp_path, "convnet", "weight")
    labels = tmp_path / "labels"
    code = cli(["relabel", "--distilled", prism_run, "--teachers", teachers, "--epochs", 1, "--out", labels])
    one_line_error(capsys, code, "convnet", key, "NaN")
    assert not list(labels.glob("epoch_*"))


def test_nan_bn_statistics_refused_in_recover(zoo, tmp_path, cli, capsys):
    teachers, key = nan_zoo(zoo, tmp_path, "resnet18", "running_var")
    code = cli(["recover", "--method", "prism", "--dataset", "digits", "--teachers", teachers, "--ipc", 1,
                "--iterations", 2, "--batch-size", 8, "--device", "cpu", "--out", tmp_path / "r"])
    one_line_error(capsys, code, "resnet18", key)


def test_non_finite_labels_and_fp16_overflow_refused():
    logits = torch.randn(4, 10)
    logits[2, 3] = float("nan")
    with pytest.raises(PrismError, match="teacher convnet gave NaN/inf logits on 1 of 4 views"):
        check_finite_labels(logits, ["convnet"], "relabel epoch 0")
    with pytest.raises(PrismError, match="--storage fp32"):
        pack_logits(torch.full((2, 10), 1e6), "fp16", 0)
    assert pack_logits(torch.full((2, 10), 1e6), "fp32", 0)["logits"].isfinite().all()


# ----------------------------------------------------------------------------- files on disk
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.slow
def test_orphan_tmp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    sub = tmp_path / "images" / "000"
    sub.mkdir(parents=True)
    orphan = sub / f".000_000.png.{dead.pid}.abcd1234.tmp"
    live = tmp_path / f".manifest.json.{os.getpid()}.abcd1234.tmp"
    orphan.write_bytes(b"half")
    live.write_bytes(b"writing")
    assert remove_orphans(tmp_path) == [orphan]
    assert live.exists() and not orphan.exists()


# ----------------------------------------------------------------------------- bad inputs: one line each
BAD_INPUTS = {
    "topk": (["relabel", "--topk", "-1"], ["--topk -1", ">= 0"]),
    "relabel epochs": (["relabel", "--epochs", "-3"], ["--epochs -3"]),
    "lr": (["validate", "--random-real", "--lr", "-1"], ["--lr -1"]),
    "seeds": (["validate", "--random-real", "--loss", "ce", "--seeds", "a,b"], ["--seeds 'a,b'"]),
    "squeeze epochs 0": (["squeeze", "--epochs", "0"], ["--epochs 0", "--pretrained"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_arguments_are_one_line(name, cli, capsys, tmp_path):
    argv, needles = BAD_INPUTS[name]
    one_line_error(capsys, cli(argv + ["--out", tmp_path / "o"]), *needles)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_recover_with_lr_nan_is_refused_before_any_image(cli, capsys, tmp_path):
    """`--lr nan` passes `minimum=0.0` (every comparison with NaN is false) and once made 10 black PNGs, rc 0."""
    code = cli(["recover", "--method", "sre2l", "--dataset", "digits", "--lr", "nan", "--iterations", 1,
                "--device", "cpu", "--out", tmp_path / "r"])
    one_line_error(capsys, code, "--lr nan: must be a finite number")
    assert not (tmp_path / "r").exists()
    one_line_error(capsys, cli(["recover", "--set", "crop_scale=0.08,inf", "--out", tmp_path / "r"]),
                   "--crop-scale inf: must be a finite number")


def config_classes() -> dict[str, type]:
    """Every stage, job and audit config class (each a subclass of CommonConfig)."""
    import importlib

    from prismdd.core.config import CommonConfig

    for module in ("squeeze", "recover", "relabel", "validate", "metrics"):
        importlib.import_module(f"prismdd.stages.{module}")
    importlib.import_module("prismdd.pipeline")
    importlib.import_module("prismdd.audit")

    found, todo = {}, [CommonConfig]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_every_float_option_of_every_config_refuses_non_finite_values(value):
    import dataclasses
    import re
    import typing

    from prismdd.core.config import build_config

    classes = config_classes()
    assert {"RecoverConfig", "SqueezeConfig", "RelabelConfig", "ValidateConfig", "MetricsConfig", "RunConfig",
            "AuditConfig"} <= set(classes)
    checked = 0
    for cls in classes.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "float" not in str(hints[f.name]):
                continue
            pair = typing.get_origin(hints[f.name]) is tuple
            flag = "--" + f.name.replace("_", "-")
            with pytest.raises(PrismError, match=re.escape(flag) + r" -?(nan|inf): must be a finite number"):
                build_config(cls, {f.name: f"0.5,{value}" if pair else value})
            checked += 1
    assert checked >= 45  # recover's 28, validate's 9, squeeze's 5, audit's 3, the job's 2, relabel's 2


def test_bad_config_files_are_one_line(cli, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"epochs: 1\n# \xff\xfe\n")
    one_line_error(capsys, cli(["relabel", "--config", bad, "--out", tmp_path / "o"]), str(bad), "UTF-8")
    one_line_error(capsys, cli(["relabel", "--config", tmp_path, "--out", tmp_path / "o"]), "directory")


def test_bad_teacher_folders_are_one_line(zoo, prism_run, tmp_path, cli, capsys):
    teachers = tmp_path / "nospec"
    shutil.copytree(zoo, teachers)
    card = read_json(teachers / "convnet" / "card.json")
    del card["spec"]
    (teachers / "convnet" / "card.json").write_text(json.dumps(card))
    code = cli(["relabel", "--distilled", prism_run, "--teachers", teachers, "--epochs", 1, "--out", tmp_path / "l"])
    one_line_error(capsys, code, "card.json", "no model spec")
    # a teacher of another class list (an ImageFolder with another class count, here: 9 names)
    card = read_json(zoo / "convnet" / "card.json")
    card.update(spec=read_json(zoo / "convnet" / "card.json")["spec"], class_names=card["class_names"][:9])
    (teachers / "convnet" / "card.json").write_text(json.dumps(card))
    code = cli(["relabel", "--distilled", prism_run, "--teachers", teachers, "--epochs", 1, "--out", tmp_path / "l"])
    one_line_error(capsys, code, "classes differ", "9 vs 10")
    # a teacher of another resolution
    card = read_json(zoo / "convnet" / "card.json")
    card["spec"]["resolution"] = 16
    (teachers / "convnet" / "card.json").write_text(json.dumps(card))
    code = cli(["validate", "--distilled", prism_run, "--teachers", teachers, "--epochs", 1, "--device", "cpu",
                "--out", tmp_path / "v"])
    one_line_error(capsys, code, "trained at 16 px", "8 px")


@pytest.mark.parametrize("case,needle", [("empty val", "the test split has no images"),
                                         ("empty class folder", "class 'c1' has no training images"),
                                         ("class missing from val", "class 'c1' has no test images"),
                                         ("one class", "classification needs at least 2 classes")])
def test_imagefolder_gaps_are_refused_before_training(tmp_path, cli, capsys, case, needle):
    from PIL import Image

    root = tmp_path / "if"
    for c in range(1 if case == "one class" else 2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(0 if (case == "empty class folder" and c == 1) else 3):
            Image.new("RGB", (8, 8), (40 * i, 100 * c, 0)).save(root / "train" / f"c{c}" / f"{i}.png")
        if case == "empty val" or (case == "class missing from val" and c == 1):
            continue
        (root / "val" / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (0, 100 * c, 0)).save(root / "val" / f"c{c}" / "0.png")
    (root / "val").mkdir(exist_ok=True)
    code = cli(["squeeze", "--dataset", "imagefolder", "--data-root", root, "--arch", "convnet", "--width", 0.25,
                "--epochs", 1, "--device", "cpu", "--out", tmp_path / "t"])
    one_line_error(capsys, code, needle)
    assert not list((tmp_path / "t").rglob("*.pt"))
    if case == "one class":  # check-data refuses it too, rather than passing a set no classifier can learn from
        one_line_error(capsys, cli(["check-data", "--dataset", "imagefolder", "--data-root", root]), needle)


def test_hidden_files_are_skipped_not_fatal(tmp_path, cli, capsys):
    """macOS leaves '._name.png' AppleDouble companions (metadata, not PNGs) beside every image it copies; squeeze
    skips them, and hidden folders, with one notice instead of stopping on the first one."""
    from PIL import Image

    root = tmp_path / "if"
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            Image.new("RGB", (8, 8), (0, 100 * c, 0)).save(root / split / f"c{c}" / "0.png")
            (root / split / f"c{c}" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (root / "train" / ".Trashes").mkdir()
    capsys.readouterr()
    assert cli(["squeeze", "--dataset", "imagefolder", "--data-root", root, "--arch", "convnet", "--width", 0.25,
                "--epochs", 1, "--device", "cpu", "--out", tmp_path / "t"]) == 0
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[data] imagefolder: skipped")]
    assert said == ["[data] imagefolder: skipped 4 hidden files and 1 hidden folder (names starting with '.', e.g. "
                    "macOS '._' companions): not images of the set"]


# ----------------------------------------------------------------------------- more reuse and finite cases
@pytest.mark.parametrize("flag,value", [("--seed", 1), ("--mix", "mixup"), ("--label-teachers", "resnet18"),
                                        ("--batch-size", 4), ("--topk", 2)])
def test_relabel_rerun_with_other_settings_refused(prism_run, zoo, tmp_path, cli, capsys, flag, value):
    args = ["relabel", "--distilled", prism_run, "--teachers", zoo, "--epochs", 1, "--out", tmp_path / "l"]
    assert cli(args) == 0
    capsys.readouterr()
    one_line_error(capsys, cli(args[:-2] + ["--epochs", 2, flag, value, "--out", tmp_path / "l"]),
                   "epoch_0000.safetensors", "other settings", "--force")


def test_labels_of_another_distilled_set_refused(prism_run, zoo, recover_run, tmp_path, cli, capsys):
    other = recover_run(tmp_path / "seed1", "prism", seed=1)
    labels = tmp_path / "labels"
    assert cli(["relabel", "--distilled", prism_run, "--teachers", zoo, "--epochs", 1, "--out", labels]) == 0
    code = cli(["validate", "--distilled", other, "--labels", labels, "--epochs", 1, "--device", "cpu",
                "--out", tmp_path / "eval"])
    one_line_error(capsys, code, f"--labels {labels}", "made for other images", f"--distilled {other}")


def test_overflowing_teacher_named_in_labels_and_loss(prism_run, zoo, tmp_path, cli, capsys):
    """Finite weights whose logits overflow: relabel refuses the labels, recover's loss names the teachers."""
    teachers = tmp_path / "hot"
    shutil.copytree(zoo, teachers)
    w = teachers / "convnet" / "model.safetensors"
    state = load_file(str(w))
    k = next(k for k in state if k.endswith("weight") and state[k].ndim == 2)  # the classifier
    state[k] = torch.full_like(state[k], 3e38)  # finite, but a sum of a few such terms is inf
    save_file(state, str(w))
    code = cli(["relabel", "--distilled", prism_run, "--teachers", teachers, "--epochs", 1, "--out", tmp_path / "l"])
    one_line_error(capsys, code, "teacher convnet gave NaN/inf logits")
    assert not list((tmp_path / "l").glob("epoch_*"))
    code = cli(["recover", "--method", "prism", "--dataset", "digits", "--teachers", teachers, "--ipc", 1,
                "--iterations", 2, "--batch-size", 8, "--device", "cpu", "--out", tmp_path / "r"])
    one_line_error(capsys, code, "loss became", "convnet")


def test_log_with_a_cut_off_last_line_is_read(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.write(epoch=1)
    log.write(epoch=2)
    with open(log.path, "a") as f:
        f.write('{"epoch": 3, "lo')  # killed mid-write
    assert [r["epoch"] for r in log.read()] == [1, 2]
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n{"ep\n{"epoch": 3}\n')
    with pytest.raises(PrismError, match="line 2"):
        log.read()


def test_validate_rerun_after_the_images_changed_is_refused(recover_run, tmp_path, cli, capsys):
    rec, out = tmp_path / "prism", tmp_path / "eval"
    recover_run(rec, "prism")
    args = ["validate", "--distilled", rec, "--loss", "ce", "--epochs", 1, "--student-width", 0.25, "--device", "cpu",
            "--out", out]
    assert cli(args) == 0
    assert cli(args) == 0  # unchanged: the finished student is reused
    recover_run(rec, "prism", iterations=4, force=True)
    capsys.readouterr()
    one_line_error(capsys, cli(args), f"--out {out}", "distilled images changed", "--force")
    assert cli(args + ["--force"]) == 0


def test_relabel_force_clears_every_old_epoch(prism_run, zoo, tmp_path, cli):
    labels = tmp_path / "labels"
    args = ["relabel", "--distilled", prism_run, "--teachers", zoo, "--out", labels]
    assert cli(args + ["--epochs", 3]) == 0
    assert cli(args + ["--epochs", 1, "--topk", 2, "--force"]) == 0
    assert sorted(p.name for p in labels.glob("epoch_*")) == ["epoch_0000.safetensors"]
