"""`prismdd run --methods herding,bps,...`: selection methods are a method list like any other. The run makes the
training split's scores once (every kind its methods read), each selector writes a folder of real training images,
and every row trains under the regimes asked for, beside random real."""
from __future__ import annotations

import pytest

from prismdd.artifacts import load_distilled, load_scores, read_manifest
from prismdd.core.data import load_splits
from prismdd.core.io import read_json
from prismdd.stages.validate import validate_config

SMALL = ["--set", "teacher_steps=40", "--set", "observer_steps=30", "--set", "iterations=5",
         "--set", "student_epochs=4", "--set", "full_steps=20", "--set", "eval_every=4"]


@pytest.mark.slow
def test_a_run_of_selection_methods_makes_one_score_folder_and_real_image_rows(cli, tmp_path):
    out = tmp_path / "sel"
    code = cli(["run", "--dataset", "digits", "--quick", "--out", out, "--device", "cpu", "--ipc", "2",
                "--methods", "herding,bps,forgetting,random", "--regimes", "hard,soft,kd", "--baselines", "random-real",
                *SMALL])
    assert code == 0
    res = read_json(out / "results.json")
    assert [r["method"] for r in res["rows"]] == ["herding", "bps", "forgetting", "random", "random-real"]
    # one score folder holds every kind the three scored methods read, and each of them chose by it
    folders = sorted((out / "stages").glob("scores-*"))
    assert len(folders) == 1
    train, _, info = load_splits(validate_config(dataset="digits", distilled="-", protocol="hard"))
    scores = load_scores(folders[0], ["embedding", "entropy", "dynamics"], targets=train.targets)
    assert scores.correct.shape[:2] == (1, 2)  # the quick preset: one recorded run of two epochs
    for method in ("herding", "bps", "forgetting", "random"):
        rec = next((out / "stages").glob(f"recover-{method}-*"))
        prov = read_manifest(rec, "recover")
        used = prov["inputs"]["plugin"]["scores"]
        assert (used["folder"] == str(folders[0].resolve())) if method != "random" else used is None, (method, used)
        ds = load_distilled(rec)
        assert len(ds) == 2 * info.num_classes
        # every image is a training image, bit for bit, of its own class
        records = [read_json(p) for p in sorted((rec / "records").glob("batch_*.json"))]
        index = [i[0] for r in records for i in r["start_indices"]]
        assert len(set(index)) == len(index) == len(ds)
        assert all(int(train.targets[i]) == c for r in records for (c, _), i in
                   zip(r["units"], (s[0] for s in r["start_indices"])))
    # a selected folder trains under all three regimes, random real beside it
    for row in res["rows"]:
        assert set(row["regimes"]) == {"hard", "soft", "kd"}, row
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "herding, bps, forgetting, random: real training images chosen by a selection method, bit for bit." in html
