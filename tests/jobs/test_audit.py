"""The membership-inference audit: metric math on synthetic scores, LiRA on synthetic shadows, the two known
cases on real models (an overfit model leaks, a model that never saw the pool sits at chance) and the
end-to-end ``prismdd audit --dataset digits --quick`` run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prismdd.audit import ATTACKS, AuditConfig, NOTE, TARGETS, attack_scores, bootstrap_ci, canary_dataset, fit_gaussians, lira_scores, make_plan, roc_metrics, shadow_masks, tpr_at_fpr
from prismdd.core.training import example_scores
from prismdd.core.config import build_config

REQUIRED_ROW_KEYS = ("target", "attack", "auc", "auc_ci", "tpr_at_0.1pct_fpr", "tpr_at_0.1pct_fpr_ci",
                     "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci", "members", "non_members", "shadow_models")


def _labels(n_in: int, n_out: int) -> np.ndarray:
    return np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]


# ----------------------------------------------------------------------------- metrics
def test_perfect_separation_gives_auc_1_and_full_tpr_at_low_fpr():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.uniform(2, 3, 300), rng.uniform(0, 1, 300)]
    m = roc_metrics(scores, _labels(300, 300))
    assert m["auc"] == 1.0
    assert m["tpr_at_0.1pct_fpr"] == 1.0 and m["tpr_at_1pct_fpr"] == 1.0
    # reversed scores: the attack is always wrong
    m = roc_metrics(-scores, _labels(300, 300))
    assert m["auc"] == 0.0 and m["tpr_at_1pct_fpr"] == 0.0


def test_identical_distributions_sit_at_chance():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=20000)
    m = roc_metrics(scores, _labels(10000, 10000))
    assert abs(m["auc"] - 0.5) < 0.02
    assert m["tpr_at_0.1pct_fpr"] < 0.005  # chance: TPR = FPR
    assert m["tpr_at_1pct_fpr"] < 0.02


def test_tpr_at_fpr_interpolates_the_roc():
    fpr = np.array([0.0, 0.0, 0.5, 1.0])
    tpr = np.array([0.0, 0.4, 0.8, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.4  # top of the vertical step
    assert tpr_at_fpr(fpr, tpr, 0.25) == pytest.approx(0.6)
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_non_finite_scores_are_ranked_not_rejected():
    scores = np.array([np.inf, 5.0, 1.0, -np.inf, np.nan, 0.0])
    m = roc_metrics(scores, np.array([1, 1, 1, 0, 0, 0], bool))
    assert m["auc"] == 1.0


def test_bootstrap_ci_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(2)
    scores = np.r_[rng.normal(1.0, 1, 400), rng.normal(0, 1, 400)]
    y = _labels(400, 400)
    point = roc_metrics(scores, y)
    ci = bootstrap_ci(scores, y, n=200, seed=7)
    for k in ("auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi, (k, lo, point[k], hi)
    assert 0.05 < ci["auc"][1] - ci["auc"][0] < 0.15  # 800 examples: a few points of AUC either side
    assert ci == bootstrap_ci(scores, y, n=200, seed=7)
    assert ci != bootstrap_ci(scores, y, n=200, seed=8)
    assert bootstrap_ci(scores, y, n=0) == {}


# ----------------------------------------------------------------------------- LiRA
def _synthetic_shadows(n=2000, shadows=16, gap=1.5, seed=0):
    """phi = per-example difficulty d_i (spread widely) + gap when IN + unit noise: a global threshold is
    confused by the difficulty, a per-example test (LiRA) is not."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 4, n)
    inn = shadow_masks(n, shadows, seed)
    shadow_phi = d + gap * inn + rng.normal(0, 1, (shadows, n))
    member = rng.random(n) < 0.5
    target_phi = d + gap * member + rng.normal(0, 1, n)
    return target_phi, shadow_phi, inn, member


@pytest.mark.parametrize("variance", ["global", "per-example"])
def test_lira_calibrates_per_example_difficulty(variance):
    target_phi, shadow_phi, inn, member = _synthetic_shadows()
    global_thr = roc_metrics(target_phi, member)["auc"]
    online = roc_metrics(lira_scores(target_phi, shadow_phi, inn, online=True, variance=variance), member)
    offline = roc_metrics(lira_scores(target_phi, shadow_phi, inn, online=False, variance=variance), member)
    assert global_thr < 0.65
    assert online["auc"] > 0.8 and offline["auc"] > 0.8
    assert online["tpr_at_1pct_fpr"] > 0.1


def test_lira_without_signal_sits_at_chance():
    target_phi, shadow_phi, inn, member = _synthetic_shadows(gap=0.0)
    for online in (True, False):
        auc = roc_metrics(lira_scores(target_phi, shadow_phi, inn, online=online), member)["auc"]
        assert abs(auc - 0.5) < 0.05


def test_shadow_masks_are_complementary_pairs():
    m = shadow_masks(101, 4, seed=0)
    assert m.shape == (4, 101)
    assert (m.sum(0) == 2).all()  # every example IN for exactly half the shadows
    assert (m[0] == ~m[1]).all() and (m[2] == ~m[3]).all()
    assert (shadow_masks(101, 6, seed=0)[:4] == m).all()  # adding shadows keeps the earlier ones
    assert not (shadow_masks(101, 4, seed=1) == m).all()
    g = fit_gaussians(np.arange(8.0).reshape(4, 2), m[:, :2])
    assert (g["count_in"] == 2).all() and (g["count_out"] == 2).all()


# ----------------------------------------------------------------------------- plan and canaries
def test_plan_is_seeded_and_disjoint():
    cfg = build_config(AuditConfig, dict(dataset="digits", pool_size=600, background=100, canaries=20))
    a, b = make_plan(cfg, 1437, 10), make_plan(cfg, 1437, 10)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a["pool"]) == 600 and len(np.intersect1d(a["pool"], a["background"])) == 0
    assert a["target_in"].sum() == 300
    c = make_plan(build_config(AuditConfig, dict(dataset="digits", pool_size=600, seed=1)), 1437, 10)
    assert not np.array_equal(a["pool"], c["pool"])


def test_mislabel_canaries_change_exactly_their_labels():
    from prismdd.core.data import load_dataset

    cfg = build_config(AuditConfig, dict(dataset="digits", pool_size=300, canaries=25))
    plan = make_plan(cfg, 1437, 10)
    name = canary_dataset(cfg, plan)
    assert name != "digits" and canary_dataset(cfg, plan) == name  # registered once
    base, _, _ = load_dataset("digits")
    train, _, info = load_dataset(name)
    changed = np.flatnonzero((base.targets != train.targets).numpy())
    assert np.array_equal(changed, np.sort(plan["pool"][plan["canary_pos"]]))
    assert torch.equal(base.images, train.images) and info.name == name


# ----------------------------------------------------------------------------- known cases on real models
OVERFIT = dict(arch="convnet", width=0.25, epochs=150, batch_size=25, lr=0.01, schedule="step_half",
               weight_decay=0.0, min_scale=1.0, flip=False, device="cpu")  # memorise: no augmentation, no decay


def _overfit(out, dataset: str, members: np.ndarray):
    from prismdd.stages.squeeze import SqueezeConfig, squeeze
    from prismdd.artifacts import load_model

    np.save(out / "members.npy", np.sort(members))
    squeeze(build_config(SqueezeConfig, dict(OVERFIT, dataset=dataset, subset=str(out / "members.npy"), out=str(out))))
    return load_model(out / "convnet")[0]


def _threshold_metrics(model, dataset, idx_in, idx_out):
    from prismdd.core.data import load_dataset

    train, _, info = load_dataset(dataset)
    idx = torch.as_tensor(np.r_[idx_in, idx_out])
    stats = example_scores(model, train.get_images(idx), train.targets[idx], info, "cpu")
    return roc_metrics(attack_scores("threshold", stats, None, None), _labels(len(idx_in), len(idx_out)))


@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory):
    """ConvNet (width 0.25) overfit on 50 clean digits; returns (model, the permutation it was drawn from)."""
    perm = np.random.default_rng(0).permutation(1437)
    return _overfit(tmp_path_factory.mktemp("overfit"), "digits", perm[:50]), perm


def test_known_case_overfit_model_leaks(overfit_model):
    model, perm = overfit_model
    m = _threshold_metrics(model, "digits", perm[:50], perm[50:450])
    # clean digits are easy: many non-members are as confident as the members, so a global threshold
    # separates well on average (AUC) but not at low FPR; that is what LiRA and canaries are for
    assert m["auc"] > 0.85, m


def test_known_case_overfit_on_mislabelled_canaries_gives_high_tpr_at_low_fpr(tmp_path):
    cfg = build_config(AuditConfig, dict(dataset="digits", pool_size=1437, canaries=450))
    plan = make_plan(cfg, 1437, 10)
    canaries = plan["pool"][plan["canary_pos"]]
    members, non_members = canaries[:50], canaries[50:]
    model = _overfit(tmp_path, canary_dataset(cfg, plan), members)
    m = _threshold_metrics(model, canary_dataset(cfg, plan), members, non_members)
    assert m["auc"] > 0.95, m
    # 400 non-members resolve FPRs down to 0.25 %: 1 % is the lowest rate measured, not interpolated
    assert m["tpr_at_1pct_fpr"] > 0.8, m


def test_known_case_model_that_never_saw_the_pool_sits_at_chance(overfit_model):
    model, perm = overfit_model
    pool = perm[450:]  # disjoint from the 50 images the model saw; "members" are an arbitrary half
    m = _threshold_metrics(model, "digits", pool[: len(pool) // 2], pool[len(pool) // 2:])
    assert abs(m["auc"] - 0.5) < 0.1, m
    assert m["tpr_at_1pct_fpr"] < 0.1, m


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_audit(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    # every target, FRePo's set included (not a default target: its recovery costs minutes per pipeline on a CPU)
    assert cli(["audit", "--dataset", "digits", "--quick", "--out", out, "--device", "cpu",
                "--targets", ",".join(TARGETS)]) == 0
    return out


@pytest.mark.slow
def test_quick_audit_writes_every_target(quick_audit):
    result = json.loads((quick_audit / "audit.json").read_text())
    rows = result["targets"]
    assert {r["target"] for r in rows} == set(TARGETS)
    for r in rows:
        for k in REQUIRED_ROW_KEYS:
            assert k in r, (r["target"], r["attack"], k)
        assert r["attack"] in ATTACKS
        assert 0.0 <= r["auc"] <= 1.0 and r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
        assert r["shadow_models"] == (0 if r["attack"] == "threshold" else 2)
    pool_rows = [r for r in rows if r["examples"] == "pool"]
    assert len(pool_rows) == len(TARGETS) * len(ATTACKS)
    assert all(r["members"] == result["members"] == len(result["member_indices"]) for r in pool_rows)
    assert sum(r["best"] for r in rows) == len(TARGETS)  # one best attack per target
    assert result["note"] == NOTE and "not a differential-privacy guarantee" in result["note"]
    assert not set(result["member_indices"]) & set(result["non_member_indices"])
    assert (quick_audit / "audit_roc.png").stat().st_size > 0
    # the members whose pixels a student saw, read from what recover and validate recorded: 10 classes x IPC 10
    models = result["models"]
    assert models["prism"]["direct_members"] == models["random-real"]["direct_members"] == 100
    assert "direct_members" not in models["sre2l"] and "direct_members" not in models["teacher"]  # noise init
    assert json.loads((quick_audit / "manifest.json").read_text())["stage"] == "audit"


@pytest.mark.slow
def test_quick_audit_resumes_identically_and_refuses_other_settings(quick_audit, cli):
    before = json.loads((quick_audit / "audit.json").read_text())["targets"]
    assert cli(["audit", "--dataset", "digits", "--quick", "--out", quick_audit, "--device", "cpu",
                "--targets", ",".join(TARGETS)]) == 0
    assert json.loads((quick_audit / "audit.json").read_text())["targets"] == before
    assert cli(["audit", "--dataset", "digits", "--quick", "--teacher-epochs", "3", "--out", quick_audit,
                "--device", "cpu"]) == 2


def test_bad_settings_are_one_line_errors(cli, tmp_path):
    assert cli(["audit", "--dataset", "digits", "--targets", "teacher,nope", "--out", tmp_path]) == 2
    assert cli(["audit", "--dataset", "digits", "--attacks", "lira", "--out", tmp_path]) == 2
