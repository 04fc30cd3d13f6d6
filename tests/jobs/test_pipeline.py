"""``prismdd run`` end to end on digits (smaller than --quick): results, report, figures, stage reuse and the
one-line errors for bad methods, datasets and observers."""
from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from prismdd.core.data import DATASETS
from prismdd.core.presets import METHODS
from prismdd.core.io import read_json

# smaller than --quick: the whole job takes well under a minute on one CPU thread
SMALL = ["--set", "teacher_steps=60", "--set", "observer_steps=60", "--set", "iterations=10",
         "--set", "student_epochs=6", "--set", "full_steps=30", "--set", "eval_every=3"]
STAGES = ["teachers", "observer", "recover-prism", "validate-prism", "recover-sre2l", "validate-sre2l",
          "validate-random-real", "full-kd", "metrics"]
METHOD_ROWS = ["prism", "sre2l", "random-real", "full"]


def run_cli(cli, argv) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(argv)
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), seconds=time.perf_counter() - t0)


def base_argv(out) -> list:
    return ["run", "--dataset", "digits", "--quick", "--out", out, "--device", "cpu", *SMALL]


def stage_manifests(out: Path) -> dict[str, int]:
    """``{stage folder name: manifest mtime}`` of every finished stage."""
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "stages").glob("*/manifest.json"))}


@pytest.fixture(scope="module")
def quick_run(cli, tmp_path_factory):
    """The first run, with a snapshot of what it wrote (later tests re-run into the same folder)."""
    out = tmp_path_factory.mktemp("run") / "demo"
    r = run_cli(cli, base_argv(out))
    assert r.code == 0, r.err[-3000:]
    r.dir = out
    r.results = read_json(out / "results.json")
    r.html = (out / "report.html").read_text(encoding="utf-8") if (out / "report.html").exists() else ""
    r.figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    r.stages = stage_manifests(out)
    return r


@pytest.mark.slow
def test_results_rows(quick_run):
    res = quick_run.results
    rows = res["rows"]
    assert [r["method"] for r in rows] == METHOD_ROWS
    for r in rows:
        for key in ("method", "top1", "top1_std", "intra_class_cos", "images", "seconds"):
            assert key in r, (r["method"], key)
        assert 0 <= r["top1"] <= 100 and r["top1_std"] == 0.0  # one seed
        assert r["seconds"] >= 0
    by = {r["method"]: r for r in rows}
    assert by["prism"]["images"] == by["sre2l"]["images"] == by["random-real"]["images"] == 100  # IPC 10 x 10
    assert by["full"]["images"] == 1437 and by["full"]["intra_class_cos"] is None
    for m in ("prism", "sre2l", "random-real"):
        assert -1 <= by[m]["intra_class_cos"] <= 1
        assert by[m]["intra_class_cos"] == pytest.approx(res["diversity"][m]["intra_class_cos"], abs=1e-4)
    # the result is the final epoch of the student (6 epochs, evaluated every 3)
    for m in ("prism", "sre2l", "random-real"):
        assert [c["epoch"] for c in by[m]["curve"]] == [3, 6] and by[m]["top1"] == by[m]["curve"][-1]["top1"]
    for m in ("prism", "sre2l"):
        assert Path(by[m]["distilled"]).parent == quick_run.dir / "stages"
        assert Path(by[m]["distilled"]).name.startswith(f"recover-{m}-")
    # the full baseline is the regime's (kd: the shared protocol) on all the data, capped at --full-steps steps
    assert by["full"]["protocol"]["loss"] == by["prism"]["protocol"]["loss"] == "mse+ce"
    assert by["full"]["reference"]["kd"]["converged"] is False and by["full"]["regimes"]["kd"]["top1"] == by["full"]["top1"]
    # one capped epoch: its LR must decay per step, the distilled sets' per epoch (reference)
    assert by["full"]["protocol"]["lr_every"] == "step" and by["prism"]["protocol"]["lr_every"] == "epoch"
    assert set(res["timings"]) >= set(STAGES)
    assert res["dataset"] == "digits" and res["ipc"] == 10 and "FINAL epoch" in res["protocol"]


@pytest.mark.slow
def test_config_and_manifest(quick_run):
    out = quick_run.dir
    assert (out / "config.yaml").exists()
    m = read_json(out / "manifest.json")
    assert m["stage"] == "run"
    c = m["config"]
    # --set wins over the --quick preset, which wins over the defaults
    assert (c["quick"], c["iterations"], c["student_epochs"], c["teacher_steps"], c["eval_every"]) == \
        (True, 10, 6, 60, 3)
    assert c["recover_batch_size"] == 100 and c["methods"] == "prism,sre2l"
    assert quick_run.results["config"]["iterations"] == 10
    # one finished folder per stage
    assert sorted(re.sub(r"-[0-9a-f]{10}$", "", s) for s in quick_run.stages) == sorted(STAGES)


@pytest.mark.slow
def test_report_is_self_contained(quick_run):
    html = quick_run.html
    assert html.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'\bsrc\s*=\s*"([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    for m in METHOD_ROWS:
        if m == "full":  # the full row is named for what it is: all the data, its regime, a capped budget
            assert re.search(r"<td>full data \(reference: kd \d+ steps of 256, not converged\)</td>", html), m
        else:
            assert f"<td>{m}</td>" in html or f">{m}<" in html, m
    # the figures are written beside the page, one image grid per distilled set
    assert {"accuracy.png", "curves.png", "embedding.png", "grid_prism.png", "grid_sre2l.png"} <= set(quick_run.figures)
    for name in quick_run.figures:
        assert (quick_run.dir / "figures" / name).stat().st_size > 0


@pytest.mark.slow
def test_rerun_reuses_every_stage(cli, quick_run):
    r = run_cli(cli, base_argv(quick_run.dir))
    assert r.code == 0, r.err[-3000:]
    for stage in STAGES:
        assert re.search(rf"\[run\] {stage}: reusing ", r.out), stage
    assert " -> " not in "".join(line for line in r.out.splitlines() if line.startswith("[run]") and "report" not in line)
    assert stage_manifests(quick_run.dir) == quick_run.stages  # nothing rewritten
    assert r.seconds < 0.75 * quick_run.seconds, (r.seconds, quick_run.seconds)
    rows = read_json(quick_run.dir / "results.json")["rows"]
    assert [(x["method"], x["top1"]) for x in rows] == [(x["method"], x["top1"]) for x in quick_run.results["rows"]]


@pytest.mark.slow
def test_changed_recovery_setting_redoes_only_what_depends_on_it(cli, quick_run):
    r = run_cli(cli, base_argv(quick_run.dir) + ["--set", "iterations=11"])
    assert r.code == 0, r.err[-3000:]
    for stage in ("teachers", "observer", "validate-random-real", "full-kd"):
        assert re.search(rf"\[run\] {stage}: reusing ", r.out), stage
    for stage in ("recover-prism", "validate-prism", "recover-sre2l", "validate-sre2l", "metrics"):
        assert re.search(rf"\[run\] {stage} -> ", r.out), stage
        assert not re.search(rf"\[run\] {stage}: reusing", r.out), stage
    after = stage_manifests(quick_run.dir)
    for name, mtime in quick_run.stages.items():  # the first run's stages are kept untouched
        assert after[name] == mtime
    assert len(after) == len(quick_run.stages) + 5
    res = read_json(quick_run.dir / "results.json")
    assert res["config"]["iterations"] == 11
    recovered = read_json(Path(res["rows"][0]["distilled"]) / "manifest.json")
    assert recovered["config"]["iterations"] == 11


# ----------------------------------------------------------------------------- bad input
def _error(r) -> str:
    lines = r.err.strip().splitlines()
    assert r.code == 2, r.err
    assert len(lines) == 1 and lines[0].startswith("prismdd: error:"), r.err
    return lines[0]


def test_unknown_method(cli, tmp_path):
    r = run_cli(cli, ["run", "--dataset", "digits", "--quick", "--methods", "prism,bogus", "--out", tmp_path / "o",
                      "--device", "cpu"])
    msg = _error(r)
    assert "bogus" in msg
    for name in METHODS.names():
        assert name in msg
    assert not (tmp_path / "o" / "stages").exists()  # rejected before any training


def test_unknown_baseline(cli, tmp_path):
    msg = _error(run_cli(cli, ["run", "--dataset", "digits", "--baselines", "full,everything", "--out", tmp_path / "o"]))
    assert "everything" in msg and "random-real" in msg


def test_unknown_dataset(cli, tmp_path):
    msg = _error(run_cli(cli, ["run", "--dataset", "nope", "--quick", "--out", tmp_path / "o", "--device", "cpu"]))
    assert "nope" in msg
    for name in DATASETS.names():
        assert name in msg
    assert not (tmp_path / "o" / "stages").exists()


def test_observer_must_not_be_a_teacher(cli, tmp_path):
    msg = _error(run_cli(cli, ["run", "--dataset", "digits", "--quick", "--observer", "convnet",
                               "--out", tmp_path / "o", "--device", "cpu"]))
    assert "observer" in msg and "convnet" in msg
    assert not (tmp_path / "o" / "stages").exists()
