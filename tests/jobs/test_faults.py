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

import prismdd.core.io as io_mod
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


def test_lock_is_exclusive_reentrant_and_stale_after_death(tmp_path, capsys):
    folder = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:  # a lock whose owner runs: refused, naming it
        folder.mkdir()
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


# ----------------------------------------------------------------------------- full disk, permissions
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
    monkeypatch.setattr(io_mod, "save_file", failing_save)
    out = tmp_path / "labels"
    code = cli(["relabel", "--distilled", prism_run, "--teachers", zoo, "--epochs", 1, "--out", out,
                "--device", "cpu"])
    line = one_line_error(capsys, code, str(out / "epoch_0000.safetensors"), err.strerror)
    assert ("disk is full" if err.errno == errno.ENOSPC else "permission denied") in line
    assert not tmp_files(out)


def test_torch_save_failure_is_one_line(tmp_path, cli, capsys, monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(io_mod.torch, "save", failing)
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
                                         ("class missing from val", "class 'c1' has no test images")])
def test_imagefolder_gaps_are_refused_before_training(tmp_path, cli, capsys, case, needle):
    from PIL import Image

    root = tmp_path / "if"
    for c in range(2):
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
