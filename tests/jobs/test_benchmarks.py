"""Smoke runs of the benchmark scripts (CI runs only these tiny versions; the real tables are in BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # benchmark scripts in subprocesses: out of `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_recover_speed_smoke(tmp_path):
    out = _run(["benchmarks/recover_speed.py", "--iters", "2", "--repeats", "1", "--width", "0.25", "--res", "8",
                "--batch", "20", "--threads", "1"], tmp_path)
    lines = [l for l in out.splitlines() if "|" in l]
    names = [l.split("|")[0].strip() for l in lines[1:]]
    assert names == ["plain loop (reference structure)", "prismdd engine", "prismdd engine, contiguous"]
    for l in lines[1:]:
        assert float(l.split("|")[2]) > 0  # image-iterations per second


def test_quality_smoke(tmp_path):
    out = _run(["benchmarks/quality.py", "--smoke", "--only", "quality/ipc1", "--out", str(tmp_path), "--threads", "1"],
               tmp_path, timeout=600)
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| cell")]
    assert [r.split("|")[1].strip() for r in rows] == ["random-real", "sre2l", "cda", "delt", "gvbsm", "prism", "prism-pre",
                                                      "prism-strong-bn", "rded", "dwa", "edc",
                                                      "prism, BN set = primary alone"]
    assert (tmp_path / "digits" / "results.jsonl").exists()
    # IPC 1 has no image pairs within a class: the cosine column says so instead of printing nan
    assert all(r.split("|")[4].strip() == "n/a" for r in rows)
    # a method under its own protocol, beside random real under that protocol (the recovery above is reused)
    out = _run(["benchmarks/quality.py", "--smoke", "--only", "own-protocol/ipc1", "--cells", "protocol rded",
                "--out", str(tmp_path), "--threads", "1"], tmp_path, timeout=600)
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith(("| cell", "| method"))]
    assert [r.split("|")[1].strip() for r in rows] == ["rded, protocol rded", "random-real, protocol rded",
                                                      "rded, protocol rded"]
    # the paired row: the method's own-protocol mean minus random real's under the same protocol, seed by seed
    own, rr = (float(rows[i].split("|")[2].split("±")[0]) for i in (0, 1))
    diff = rows[2].split("|")
    assert float(diff[2]) == own and float(diff[3]) == rr
    assert abs(float(diff[4].split("(")[0]) - (own - rr)) < 0.011 and diff[5].strip() in ("0 of 1", "1 of 1")
    protocols = [json.loads(line)["protocol"]["protocol"] for line in (tmp_path / "digits" / "results.jsonl").read_text().splitlines()]
    assert protocols[-2:] == ["rded", "rded"]
    # --cells picks cells by name; the teachers trained above are reused from the same --out
    out = _run(["benchmarks/quality.py", "--smoke", "--only", "ablation/init", "--cells", "unoptimised",
                "--out", str(tmp_path), "--threads", "1"], tmp_path, timeout=600)
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| cell")]
    assert [r.split("|")[1].strip() for r in rows] == ["start low-loss, unoptimised",
                                                       "start 2x2 mosaic (random), unoptimised"]
    assert all(0 <= float(r.split("|")[2].split("±")[0]) <= 100 for r in rows)
    # FRePo (issue 21): its set under the shared protocol and with its own labels, random real under both, paired
    out = _run(["benchmarks/quality.py", "--smoke", "--only", "frepo/ipc1", "--skip", "not learned",
                "--out", str(tmp_path), "--threads", "1"], tmp_path, timeout=600)
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith(("| cell", "| method"))]
    assert [r.split("|")[1].strip() for r in rows] == [
        "frepo, protocol prism", "random-real, protocol prism", "frepo, protocol frepo", "random-real, protocol frepo",
        "frepo, protocol prism", "frepo, protocol frepo"]  # the last two: the paired rows of the two protocols
    last = [json.loads(line) for line in (tmp_path / "digits" / "results.jsonl").read_text().splitlines()][-4:]
    assert [r["protocol"]["soft_labels"].split(":")[0] for r in last] == ["online", "online", "learned",
                                                                           "centred one-hot"]
    # DD-Ranking's scores (issue 23): the four extra students and a full-data reference, then LRS/ARS per method
    out = _run(["benchmarks/quality.py", "--smoke", "--only", "scores/ipc1", "--cells", "full data,random-real,prism,",
                "--out", str(tmp_path), "--threads", "1"], tmp_path, timeout=600)
    rows = {r.split("|")[1].strip(): r.split("|") for r in out.splitlines() if r.startswith("| ")}
    assert {"full data, hard labels", "prism, hard labels", "random-real, no augmentation", "prism"} <= set(rows)
    top = {k: float(v[2].split("±")[0]) for k, v in rows.items() if k != "prism" and not k.startswith(("cell", "method"))}
    from prismdd.core.scores import ars, lrs
    want_lrs = lrs(top["full data, hard labels"], top["prism, hard labels"], top["prism, protocol"],
                   top["random-real, protocol"])
    want_ars = ars(top["prism, protocol"], top["random-real, protocol"], top["prism, no augmentation"],
                   top["random-real, no augmentation"])
    assert abs(float(rows["prism"][2]) - 100 * want_lrs["score"]) < 0.011
    assert abs(float(rows["prism"][5]) - 100 * want_ars["score"]) < 0.011


def test_dc_protocol_smoke(tmp_path):
    """benchmarks/dc_protocol.sh (BENCHMARKS.md 16.3) trains herding's IPC 1 folder, as the selection experiment recorded
    it, and random real under the hard cell with the options given; without that record it stops with one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp_path), PYTHON=sys.executable, DATASET="digits", EPOCHS="2",
               SEEDS="0")

    def script(*args):
        return subprocess.run(["bash", "benchmarks/dc_protocol.sh", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    res = script("noaug", "--no-augment")
    assert res.returncode != 0 and res.stderr.strip().splitlines() == [
        f"{tmp_path}/digits/results.jsonl: not found; run quality.py --only selection/ipc1 first (or set OUT)"]
    _run(["benchmarks/quality.py", "--smoke", "--only", "selection/ipc1", "--cells", "herding", "--skip", "soft,kd",
          "--out", str(tmp_path), "--threads", "1"], tmp_path, timeout=600)
    res = script("noaug", "--no-augment")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line.split() for line in res.stdout.splitlines()]
    assert [line[:3] for line in lines] == [["noaug", "herding", "0"], ["noaug", "random", "0"]]
    assert all(0 <= float(line[3]) <= 100 for line in lines)
    herding = json.loads((tmp_path / "digits" / "results.jsonl").read_text().splitlines()[-1])["distilled"]
    for name in ("herding", "random"):
        cfg = yaml.safe_load((tmp_path / "dc-protocol" / "noaug" / f"{name}-s0" / "config.yaml").read_text())
        # quality.py's hard cell with the given option on top; herding trains on the folder the experiment made
        assert (cfg["protocol"], cfg["student_width"], cfg["epochs"], cfg["augment"]) == ("hard", 0.5, 2, False)
        assert cfg["distilled"] == (herding if name == "herding" else None) and cfg["random_real"] == (name == "random")


def test_label_storage_bytes_smoke(tmp_path):
    # the byte check inside the script compares the file's label tensors with pack_logits' output, tail included
    out = _run(["benchmarks/label_storage.py", "--part", "bytes", "--classes", "20", "--ipc", "2", "--ks", "1,5",
                "--resolution", "32", "--label-epochs", "3", "--threads", "1"], tmp_path)
    rows = {l.split("|")[1].strip(): l.split("|")[2].strip() for l in out.splitlines() if l.startswith("| prismdd")}
    assert float(rows["prismdd `--topk 1` (fp16 values + int16 indices + fp16 tail mean)"]) == 1 * (2 + 2) + 2
    assert float(rows["prismdd default (`relabel`: storage fp16, topk 0)"]) == 20 * 2


def test_rand_augment_throughput_smoke(tmp_path):
    out = _run(["benchmarks/rand_augment.py", "--sizes", "1x8,3x16", "--workers", "0,2", "--batch", "6",
                "--repeats", "1"], tmp_path)
    rows = [l.split("|") for l in out.splitlines() if l.startswith("| ") and not l.startswith("| image")]
    assert [r[1].strip() for r in rows] == ["1 x 8 x 8", "3 x 16 x 16"]
    assert all(float(v.replace(",", "")) > 0 for r in rows for v in r[2:4])


def test_frepo_cost_smoke(tmp_path):
    out = _run(["benchmarks/frepo_cost.py", "--smoke"], tmp_path)
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| IPC")]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"]
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # seconds per step, read from the run's own log


def test_appendix_timing_times_every_row_with_tiny_models(tmp_path):
    """gpu_check.sh section 6 on CPU: with a tiny CLIP and a tiny Stable Diffusion on disk every row is timed; with
    names that are not on this machine the CLIP and generator rows say why instead of failing."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_clip, save_tiny_sd

    clip, sd = save_tiny_clip(tmp_path / "clip"), save_tiny_sd(tmp_path / "sd")
    common = ["benchmarks/appendix_timing.py", "--res", "16", "--batch", "2", "--iters", "1", "--classes", "10",
              "--t2i-images", "2", "--t2i-steps", "2", "--threads", "1"]
    out = _run(common + ["--clip", str(clip), "--t2i", str(sd)], tmp_path)
    rows = {l.split("|")[1].strip(): l.split("|")[2:] for l in out.splitlines() if l.startswith("| ") and "---" not in l}
    for name in ("pixels", "--param multires (5 components)", "--param multires --view-noise 0.2",
                 f"--clip-prior {clip}"):
        assert float(rows[name][0]) > 0, out  # seconds per step
    assert float(rows[str(sd)][1]) > 0 and "'steps': 2" in rows[str(sd)][0], out  # seconds per image, its settings
    out = _run(common + ["--clip", str(tmp_path / "no-clip"), "--t2i", str(tmp_path / "no-sd")], tmp_path)
    for flag, name in (("--clip-prior", "no-clip"), ("--t2i-model", "no-sd")):
        assert f" not timed: {flag} {tmp_path / name}: not a local folder and not in the local Hugging Face cache" in out
