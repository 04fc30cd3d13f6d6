"""DD-Ranking's LRS and ARS: the formula on fixed accuracies worked by hand, the units ddranking 0.2.0's code uses,
missing inputs named instead of scored, the pipeline's rows, the students without augmentation, the report."""
from __future__ import annotations

import math

import pytest
import torch

from prismdd.core.augment import epoch_plan
from prismdd.core.scores import ars, lrs, missing_line, normalised, score_row
from prismdd.pipeline import _add_scores
from prismdd.report import print_table, scores_section
from prismdd.stages.validate import validate_config, view_config

E, E1 = math.e, math.exp(-1)


def test_normalisation_maps_minus_one_to_zero_and_one_to_one():
    assert normalised(-1.0) == pytest.approx(0.0, abs=1e-12)
    assert normalised(1.0) == pytest.approx(1.0)
    assert normalised(0.0) == pytest.approx((1 - E1) / (E - E1))  # 0.2689: no better than random, no hard gap


def test_lrs_on_fixed_accuracies_worked_by_hand():
    # full data 90 %, the set with hard labels 50 %, with soft labels 80 % against random real's 70 %
    r = lrs(90.0, 50.0, 80.0, 70.0)
    assert r["hlr"] == pytest.approx(40.0) and r["ior"] == pytest.approx(10.0)
    alpha = 0.5 * 0.10 - 0.5 * 0.40  # -0.15
    assert r["alpha"] == pytest.approx(alpha)
    assert r["score"] == pytest.approx(round((math.exp(alpha) - E1) / (E - E1), 4))
    assert r["score"] == pytest.approx(0.2097, abs=1e-4)  # (e^-0.15 - e^-1) / (e - e^-1)
    # the weight moves it: all on IOR
    assert lrs(90.0, 50.0, 80.0, 70.0, weight=1.0)["score"] == pytest.approx(round((math.exp(0.1) - E1) / (E - E1), 4))
    # a set equal to full data with hard labels and 100 points over random real is the top of the scale
    assert lrs(100.0, 100.0, 100.0, 0.0, weight=1.0)["score"] == pytest.approx(1.0)


def test_ars_on_fixed_accuracies_worked_by_hand():
    r = ars(80.0, 70.0, 60.0, 65.0)  # +10 with augmentation, -5 without
    assert (r["gap_aug"], r["gap_noaug"]) == (pytest.approx(10.0), pytest.approx(-5.0))
    beta = 0.5 * 0.10 + 0.5 * -0.05
    assert r["beta"] == pytest.approx(beta)
    assert r["score"] == pytest.approx(round((math.exp(beta) - E1) / (E - E1), 4))


def test_percent_units_reproduce_ddranking_020_code():
    # soft_label.py: alpha = lambda * (syn - rdm) - (1 - lambda) * (full - syn_hard) on percentages
    full, syn_hard, syn, rdm = 56.5, 21.3, 44.0, 42.0
    alpha = 0.5 * (syn - rdm) - 0.5 * (full - syn_hard)
    expected = (math.exp(alpha) - E1) / (E - E1)
    assert lrs(full, syn_hard, syn, rdm, units="percent")["score"] == pytest.approx(round(expected, 4))
    assert expected < 0  # outside [0, 1]: why prismdd uses fractions
    assert 0 <= lrs(full, syn_hard, syn, rdm)["score"] <= 1


def test_a_score_with_a_missing_input_names_it_and_is_not_computed():
    r = score_row({"full_hard": 80.0, "syn_soft": 75.0, "random_soft": 74.0, "syn_aug": 75.0, "random_aug": 74.0})
    assert r["lrs"]["score"] is None and r["lrs"]["missing"] == ["syn_hard"]
    assert r["ars"]["score"] is None and r["ars"]["missing"] == ["syn_noaug", "random_noaug"]
    assert "hard labels" in missing_line(r["lrs"]) and "--scores" in missing_line(r["ars"])
    full = score_row({"full_hard": 80.0, "syn_hard": 40.0, "syn_soft": 75.0, "random_soft": 74.0, "syn_aug": 75.0,
                      "random_aug": 74.0, "syn_noaug": 60.0, "random_noaug": 62.0})
    assert full["lrs"]["score"] == lrs(80.0, 40.0, 75.0, 74.0)["score"]
    assert full["ars"]["score"] == ars(75.0, 74.0, 60.0, 62.0)["score"]


def _rows():
    return [{"method": "prism", "top1": 75.0}, {"method": "sre2l", "top1": 60.0},
            {"method": "random-real", "top1": 74.0}, {"method": "full", "top1": 80.0}]


def test_pipeline_rows_get_scores_from_their_own_students():
    rows = _rows()
    _add_scores(rows, {"prism": {"syn_hard": 40.0, "syn_noaug": 60.0}, "random-real": {"syn_noaug": 62.0}})
    by = {r["method"]: r for r in rows}
    assert by["prism"]["scores"]["lrs"]["score"] == lrs(80.0, 40.0, 75.0, 74.0)["score"]
    assert by["prism"]["scores"]["ars"]["score"] == ars(75.0, 74.0, 60.0, 62.0)["score"]
    assert by["sre2l"]["scores"]["lrs"]["missing"] == ["syn_hard"]  # no extra students for it: named, not scored
    assert "scores" not in by["random-real"] and "scores" not in by["full"]  # the references are not scored
    table = print_table(rows)
    assert "LRS x100" in table and f"{100 * by['prism']['scores']['lrs']['score']:.2f}" in table
    html = "".join(scores_section(rows, {"what": "w", "computed": True}))
    assert "DD-Ranking scores" in html and "needs the distilled set with hard labels" in html  # sre2l's cells
    # issue 36: a run without --scores shows one line, not a table of "needs ..." cells
    folded = scores_section(rows, {"what": "w", "computed": False})
    assert len(folded) == 2 and "<table" not in "".join(folded) and "--scores" in folded[1]


def test_without_random_real_or_full_no_score_is_made_up():
    rows = [r for r in _rows() if r["method"] == "prism"]
    _add_scores(rows, {"prism": {"syn_hard": 40.0, "syn_noaug": 60.0}})
    assert rows[0]["scores"]["lrs"]["missing"] == ["full_hard", "random_soft"]
    assert rows[0]["scores"]["ars"]["missing"] == ["random_aug", "random_noaug"]
    assert "LRS" not in print_table(rows)


def test_no_augmentation_means_whole_unflipped_unmixed_images():
    cfg = validate_config(random_real=True, augment=False, teachers="t")
    vc = view_config(cfg, 50)
    assert (vc.min_scale, vc.mix, vc.flip, vc.patch_shuffle, vc.rand_augment) == (1.0, "none", False, 0, "")
    for epoch in range(3):
        plan = epoch_plan(100, epoch, seed=0, vc=vc, resolution=28)
        assert torch.equal(plan.views.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(100, 4))
        assert not plan.views.flips.any() and all(m is None for m in plan.mixes)
    # with augmentation (the default), crops, flips and CutMix are drawn
    aug = epoch_plan(100, 0, 0, view_config(validate_config(random_real=True, teachers="t"), 50), 28)
    assert (aug.views.boxes[:, 2] < 1).any() and aug.views.flips.any() and aug.mixes[0] is not None


def test_validate_scores_trains_the_four_students_and_scores_from_them(recover_run, zoo, tmp_path):
    from prismdd.core.io import read_json
    from prismdd.stages.validate import validate

    rec = recover_run(tmp_path / "set")
    kw = dict(dataset="digits", device="cpu", student_width=0.25, epochs=2, distilled=str(rec), teachers=str(zoo),
              out=str(tmp_path / "eval"), scores=True)
    acc = validate(validate_config(**kw))
    subs = {p.name: read_json(p / "accuracy.json") for p in (tmp_path / "eval" / "scores").iterdir()}
    assert set(subs) == {"hard-labels", "no-augmentation", "random-real", "random-real-no-augmentation"}
    assert subs["hard-labels"]["protocol"]["loss"] == "ce" and subs["hard-labels"]["protocol"]["soft_labels"] == "hard labels"
    assert subs["no-augmentation"]["protocol"]["flip"] is False and subs["no-augmentation"]["protocol"]["mix"] == "none"
    assert subs["random-real"]["images"] == acc["images"]  # the same IPC as the set
    assert subs["random-real"]["protocol"]["soft_labels"] == acc["protocol"]["soft_labels"]  # the same teachers
    s = acc["scores"]
    assert s["lrs"]["score"] is None and s["lrs"]["missing"] == ["full_hard"]  # no --full-top1: named, not made up
    assert s["ars"]["score"] == ars(acc["top1"], subs["random-real"]["top1"], subs["no-augmentation"]["top1"],
                                    subs["random-real-no-augmentation"]["top1"])["score"]
    acc2 = validate(validate_config(**kw, full_top1=95.0))  # every student reused, LRS now computed
    assert acc2["scores"]["lrs"]["score"] == lrs(95.0, subs["hard-labels"]["top1"], acc["top1"],
                                                 subs["random-real"]["top1"])["score"]
    with pytest.raises(Exception, match="--scores: give --distilled DIR and --teachers DIR"):
        validate_config(random_real=True, teachers=str(zoo), scores=True)
