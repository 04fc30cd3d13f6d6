"""A user's own ImageFolder through ``prismdd run`` (tiny: 10 classes of 12 px grey PNGs made from digits):
every stage and baseline, the up-front checks, file-backed --full, and stages that read the distilled
folder's dataset, data root and resolution from its manifest."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from prismdd.core.data import load_dataset
from prismdd.core.io import read_json

pytestmark = pytest.mark.slow  # whole `prismdd run` jobs: out of `pytest -m "not slow"`

# as tests/jobs/test_pipeline.py: smaller than --quick
SMALL = ["--set", "teacher_steps=60", "--set", "observer_steps=60", "--set", "iterations=10",
         "--set", "student_epochs=6", "--set", "full_steps=30", "--set", "eval_every=3"]


def run_cli(cli, argv) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli([str(a) for a in argv])
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("userdata")
    train, test, _ = load_dataset("digits")
    for split, ds, per_class in (("train", train, 16), ("val", test, 4)):
        seen: dict[int, int] = {}
        for i in range(len(ds)):
            x, y = ds[i]
            c = int(y)
            if seen.get(c, 0) < per_class:
                seen[c] = seen.get(c, 0) + 1
                d = root / split / f"digit_{c}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[0].numpy()).resize((12, 12), Image.BILINEAR).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def user_run(cli, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mine"
    r = run_cli(cli, ["run", "--dataset", "imagefolder", "--data-root", folder, "--quick", "--out", out,
                      "--device", "cpu", "--ipc", 2, *SMALL])
    assert r.code == 0, r.err[-3000:]
    r.dir = out
    return r


def test_run_on_imagefolder_finishes_with_report(user_run):
    res = read_json(user_run.dir / "results.json")
    assert [r["method"] for r in res["rows"]] == ["prism", "sre2l", "random-real", "full"]
    assert all(0 <= r["top1"] <= 100 for r in res["rows"])
    assert (user_run.dir / "report.html").exists()
    ds = read_json(user_run.dir / "manifest.json")["inputs"]["dataset"]
    assert (ds["name"], ds["resolution"], ds["channels"]) == ("imagefolder", 12, 1)  # inferred, not 224 RGB


def test_stages_read_dataset_from_the_distilled_manifest(cli, user_run, tmp_path):
    rec = next((user_run.dir / "stages").glob("recover-prism-*"))
    teachers = next((user_run.dir / "stages").glob("teachers-*"))
    out = tmp_path / "val"
    # no --dataset / --data-root / --resolution: all come from the recover folder's manifest
    r = run_cli(cli, ["validate", "--distilled", rec, "--teachers", teachers, "--epochs", 1, "--out", out,
                      "--device", "cpu", "--student-width", 0.25])
    assert r.code == 0, r.err[-2000:]
    made = read_json(out / "manifest.json")["config"]
    assert (made["dataset"], Path(made["data_root"]).name) == ("imagefolder", "userdata0")
    r = run_cli(cli, ["relabel", "--distilled", rec, "--teachers", teachers, "--epochs", 1, "--out", tmp_path / "lab",
                      "--device", "cpu"])
    assert r.code == 0, r.err[-2000:]
    assert read_json(tmp_path / "lab" / "manifest.json")["config"]["dataset"] == "imagefolder"


def test_full_baseline_on_file_backed_data(cli, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMDD_CACHE", "off")  # no decoded cache: every batch decodes its files
    r = run_cli(cli, ["validate", "--full", "--dataset", "imagefolder", "--data-root", folder, "--loss", "ce",
                      "--epochs", 1, "--steps-per-epoch", 2, "--student-width", 0.25, "--out", tmp_path, "--device",
                      "cpu"])
    assert r.code == 0, r.err[-2000:]
    acc = read_json(tmp_path / "accuracy.json")
    assert acc["images"] == 160 and 0 <= acc["top1"] <= 100


def test_run_checks_every_stage_before_computing(cli, folder, tmp_path):
    out = tmp_path / "bad"
    r = run_cli(cli, ["run", "--dataset", "imagefolder", "--data-root", folder, "--quick", "--out", out,
                      "--device", "cpu", "--ipc", 20, "--student", "alexnet", *SMALL])
    assert r.code == 2
    assert "nothing was computed" in r.err and "--ipc 20" in r.err and "random-real" in r.err
    assert "--student alexnet" in r.err  # AlexNet has no width multiplier (student width 0.5): found before training
    assert not out.exists()
    r = run_cli(cli, ["run", "--dataset", "imagefolder", "--data-root", folder, "--quick", "--out", out,
                      "--device", "cpu", "--label-teachers", "convnet,vgg11", *SMALL])
    assert r.code == 2 and "--label-teachers: vgg11 not in --teacher-archs" in r.err and not out.exists()
