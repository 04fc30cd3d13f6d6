"""Student protocols of the paper-named methods (``--protocol cda|delt|gvbsm|rded|dwa|edc|d4m``) and the
mechanisms they added to validate/relabel: RDED's PatchShuffle, EDC's EMA evaluation, the half cosine of
RDED/DELT/EDC, RDED's IPC-dependent batch size, relabel ``--protocol``. FIDELITY.md "Student protocols"
names the reference line behind each check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from prismdd.artifacts import load_model
from prismdd.core.augment import EpochPlan, ViewConfig, Views, apply_views, default_view_batch, epoch_plan, shuffle_patches
from prismdd.core.config import build_config, config_hash
from prismdd.core.data import load_dataset
from prismdd.core.io import read_json
from prismdd.core.training import evaluate, fit, lr_factor
from prismdd.stages.relabel import RelabelConfig, relabel
from prismdd.stages.validate import validate, validate_config

STUDENT = dict(dataset="digits", device="cpu", student_width=0.25, lr=0.01)
NEW = ("cda", "delt", "gvbsm", "rded", "dwa", "edc", "d4m")


# ----------------------------------------------------------------------------- PatchShuffle
def reference_shuffle(img: torch.Tensor, cols: list[int], rows: list[int]) -> torch.Tensor:
    """RDED validation/utils.py ShufflePatches restated for one (C, H, W) image with given orders: strips
    of width W // f along the width (the remainder dropped), output strip j = strip cols[j]; then the same
    on the transposed image with the row order."""
    def strips(x, order):
        f = len(order)
        t = x.shape[-1] // f
        parts = [x[..., i * t:(i + 1) * t] for i in range(f)]
        return torch.cat([parts[k] for k in order], -1)
    img = strips(img, cols)
    return strips(img.transpose(1, 2), rows).transpose(1, 2)


def test_patch_shuffle_on_a_fixed_tensor():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = shuffle_patches(x, torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))
    # the two column halves swap, then the two row halves swap
    assert out[0, 0].tolist() == [[10, 11, 8, 9], [14, 15, 12, 13], [2, 3, 0, 1], [6, 7, 4, 5]]
    assert torch.equal(shuffle_patches(x, torch.tensor([[0, 1]]), torch.tensor([[0, 1]])), x)


def test_patch_shuffle_matches_the_reference_restatement():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 7, 9, generator=g)  # 7 x 9 with f = 2: row 6 and column 8 are dropped, as RDED's slicing
    cols = torch.tensor([[1, 0], [0, 1], [1, 0]])
    rows = torch.tensor([[0, 1], [1, 0], [1, 0]])
    out = shuffle_patches(x, cols, rows)
    assert out.shape == (3, 2, 6, 8)
    for b in range(3):
        assert torch.equal(out[b], reference_shuffle(x[b], cols[b].tolist(), rows[b].tolist()))
    x3 = torch.rand(2, 1, 9, 9, generator=g)
    c3, r3 = torch.tensor([[2, 0, 1], [1, 2, 0]]), torch.tensor([[1, 2, 0], [0, 2, 1]])
    for b, img in enumerate(shuffle_patches(x3, c3, r3)):
        assert torch.equal(img, reference_shuffle(x3[b], c3[b].tolist(), r3[b].tolist()))


def test_patch_shuffle_comes_before_the_crop_and_is_stored_with_the_views():
    x = torch.rand(2, 1, 8, 8)
    cols, rows = torch.tensor([[1, 0], [0, 1]]), torch.tensor([[1, 0], [1, 0]])
    whole = Views(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.zeros(2, dtype=torch.bool), cols, rows)
    torch.testing.assert_close(apply_views(x, whole), shuffle_patches(x, cols, rows))
    plain = epoch_plan(20, 3, 7, ViewConfig(8, 0.5, "cutmix"), 8)
    shuf = epoch_plan(20, 3, 7, ViewConfig(8, 0.5, "cutmix", patch_shuffle=2), 8)
    # drawn after everything else: the order, crops, flips and CutMix of a plan without it are unchanged
    assert torch.equal(plain.order, shuf.order) and torch.equal(plain.views.boxes, shuf.views.boxes)
    assert plain.views.cols is None and shuf.views.cols.shape == (20, 2)
    back = EpochPlan.from_tensors(shuf.to_tensors(), 8)
    assert torch.equal(back.views.cols, shuf.views.cols) and torch.equal(back.views.rows, shuf.views.rows)
    batches = list(back.batches(8))
    assert torch.equal(batches[1][3].cols, shuf.views.cols[8:16])
    other = epoch_plan(20, 4, 7, ViewConfig(8, 0.5, "cutmix", patch_shuffle=2), 8)
    assert not torch.equal(other.views.cols, shuf.views.cols)  # a new arrangement each epoch


# ----------------------------------------------------------------------------- EMA evaluation
def test_ema_eval_weights_follow_the_formula(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    d = 0.7
    seen, evals = [], []

    def loss_fn(_):
        seen.append(([p.detach().clone() for p in model.parameters()],
                     model[1].running_mean.clone()))
        return {"total": nn.functional.cross_entropy(model(x), y)}

    def evaluate_fn():
        evals.append(([p.detach().clone() for p in model.parameters()], model[1].running_mean.clone()))
        return {"top1": 0.0, "top5": 0.0}

    fit(model, opt, lambda e: range(3), loss_fn, epochs=2, steps_per_epoch=3, lr=0.5, schedule="cosine",
        evaluate_fn=evaluate_fn, eval_every=1, checkpoint=tmp_path / "c.pt", config_hash="h", resume=None, log=None,
        desc="t", is_main=True, ema_decay=d)
    # after k = 3 steps: ema = d^3 w0 + (1 - d) (d^2 w1 + d w2 + w3); w_i = the weights before step i + 1
    w = [s[0] for s in seen[:4]]
    for j, got in enumerate(evals[0][0]):
        want = d ** 3 * w[0][j] + (1 - d) * (d ** 2 * w[1][j] + d * w[2][j] + w[3][j])
        torch.testing.assert_close(got, want)
    # BatchNorm buffers are the live model's (EDC swaps parameters() only)
    assert torch.equal(evals[0][1], seen[3][1])
    # the model leaves fit with the weights its final accuracy was measured with
    for a, b in zip(model.parameters(), evals[1][0]):
        assert torch.equal(a.detach(), b)


def test_ema_eval_resumes_exactly(tmp_path):
    class Killed(Exception):
        pass

    def run(resume, ckpt, kill_at=None):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1, 1, 0])
        evals = []

        def evaluate_fn():  # the evaluation after epoch ``kill_at`` comes before its checkpoint: a kill there
            evals.append(1)
            if len(evals) == kill_at:
                raise Killed
            return {"top1": 0, "top5": 0}
        fit(model, opt, lambda e: range(2), lambda _: {"total": nn.functional.cross_entropy(model(x), y)},
            epochs=3, steps_per_epoch=2, lr=0.5, schedule="cosine", evaluate_fn=evaluate_fn,
            eval_every=1, checkpoint=ckpt, config_hash="h", resume=resume, log=None, desc="t", ema_decay=0.8)
        return model
    whole = run(None, tmp_path / "a.pt")
    with pytest.raises(Killed):
        run(None, tmp_path / "b.pt", kill_at=3)
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 2 and "ema" in state
    resumed = run(state, tmp_path / "b.pt")
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- schedules, batch rules
def test_half_cosine():
    assert lr_factor("half_cosine", 0.0) == 1.0
    assert lr_factor("half_cosine", 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("half_cosine", 1.0) == pytest.approx(0.5)  # RDED/DELT/EDC end at half the base LR


@pytest.mark.parametrize("n,classes,want", [(10000, 1000, 100), (1000, 1000, 20), (50000, 1000, 200),
                                            (100, 10, 50), (500, 10, 100), (1000, 100, 100), (2000, 200, 100),
                                            (20, 10, 20), (200, 10, 50)])
def test_rded_batch_rule(n, classes, want):
    # RDED argument.py:234-258: ImageNet-1K IPC 10 -> 50 x 2 = 100 (seed Table 2); capped at ipc * nclass
    assert default_view_batch(n, classes, "rded") == want


# ----------------------------------------------------------------------------- the presets
EXPECTED = {  # reference facts (FIDELITY.md "Student protocols"): loss, T, T^2, schedule, crop, batch, mechanism
    "cda": dict(loss="kl", temperature=20.0, kl_t2=False, schedule="cosine", min_scale=0.08, batch_size=128,
                grad_accum=2),
    "delt": dict(loss="kl", temperature=20.0, kl_t2=False, schedule="half_cosine", min_scale=0.25, batch_size=None,
                 batch_rule="rded", rand_augment="rand-m6-n2-mstd1.0", bn_double_update=True),
    "gvbsm": dict(loss="mse+ce", gamma=0.1, mix_ce="own", schedule="cosine", min_scale=0.08, batch_size=1024,
                  ensemble="norm-matched", label_teachers="resnet18,mobilenet_v2,efficientnet_b0,shufflenet_v2_x0_5"),
    "rded": dict(loss="kl", temperature=20.0, kl_t2=False, schedule="half_cosine", min_scale=0.5, patch_shuffle=2,
                 batch_rule="rded", bn_double_update=True),
    "dwa": dict(loss="kl", temperature=20.0, kl_t2=False, schedule="cosine", min_scale=0.08, batch_size=128),
    "edc": dict(loss="mse+ce", gamma=0.025, mix_ce="own", schedule="half_linear", min_scale=0.5, batch_size=100,
                ema_eval=0.99, ensemble="mean", patch_shuffle=0,
                label_teachers="resnet18,mobilenet_v2,shufflenet_v2_x0_5,alexnet"),
    "d4m": dict(loss="kl", temperature=20.0, kl_t2=False, schedule="cosine", min_scale=0.08, batch_size=1024,
                grad_accum=2),
}


@pytest.mark.parametrize("name", NEW)
def test_each_protocol_builds(name):
    cfg = validate_config(name, distilled="x", labels="y")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.decay_exempt, cfg.lr_every, cfg.epochs, cfg.mix) == (
        "adamw", 0.001, 0.01, "1d", "epoch", 300, "cutmix")
    assert cfg.grad_accum == EXPECTED[name].get("grad_accum", 1)
    assert cfg.bn_double_update == EXPECTED[name].get("bn_double_update", False)
    for k, v in EXPECTED[name].items():
        assert getattr(cfg, k) == v, (name, k)
    # relabel --protocol takes the shared fields: the views it stores are the ones validate trains on
    r = build_config(RelabelConfig, dict(protocol=name))
    for k in ("batch_size", "batch_rule", "min_scale", "mix", "patch_shuffle", "rand_augment", "label_teachers",
              "ensemble", "epochs"):
        assert getattr(r, k) == getattr(cfg, k), (name, k)


def test_protocol_options_shape_the_hash():
    # prism's own values leave its hash as it is; any other value of these options is another student
    cfg = validate_config("prism", distilled="x", labels="y")
    assert config_hash(cfg) == config_hash(cfg, patch_shuffle=0, ema_eval=0.0, batch_rule="seed", rand_augment="",
                                           bn_double_update=False)
    old = validate_config("sre2l", distilled="x", labels="y", decay_exempt="none", grad_accum=1)
    assert config_hash(old) != config_hash(old, decay_exempt="1d") != config_hash(old, grad_accum=2)
    assert config_hash(cfg) != config_hash(cfg, rand_augment="rand-m6-n2-mstd1.0")
    assert config_hash(cfg) != config_hash(cfg, patch_shuffle=2)
    assert config_hash(cfg) != config_hash(cfg, bn_double_update=True) != config_hash(cfg, ema_eval=0.5)
    r = build_config(RelabelConfig, {})
    assert config_hash(r) == config_hash(r, patch_shuffle=0, batch_rule="seed", protocol="rded", rand_augment="")


# ----------------------------------------------------------------------------- tiny end-to-end runs on digits
def test_patch_shuffle_stored_equals_online(prism_run, zoo, tmp_path):
    """relabel stores the shuffle with the views; validate replays it, and online labels on the same views
    train a bit-identical student (the teacher sees the shuffled, mixed inputs the student sees, as RDED)."""
    labels = relabel(build_config(RelabelConfig, dict(protocol="rded", dataset="digits", distilled=str(prism_run),
                                                      teachers=str(zoo), out=str(tmp_path / "l"), epochs=2,
                                                      batch_size=8, storage="fp32", device="cpu", seed=0,
                                                      patch_shuffle=2, min_scale=0.5)))
    assert read_json(labels / "manifest.json")["views"]["patch_shuffle"] == 2
    common = dict(STUDENT, distilled=str(prism_run), epochs=2, eval_every=1, seed=0, patch_shuffle=2, min_scale=0.5,
                  protocol="rded", lr=0.01)
    a = validate(validate_config(out=str(tmp_path / "stored"), labels=str(labels), **common))
    b = validate(validate_config(out=str(tmp_path / "online"), teachers=str(zoo), batch_size=8, **common))
    assert a["protocol"]["patch_shuffle"] == b["protocol"]["patch_shuffle"] == 2
    assert a["curve"] == b["curve"]
    from safetensors.torch import load_file
    sa = load_file(str(tmp_path / "stored" / "convnet_seed0" / "model.safetensors"))
    sb = load_file(str(tmp_path / "online" / "convnet_seed0" / "model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    validate(validate_config(out=str(tmp_path / "plain"), teachers=str(zoo), batch_size=8,
                             **dict(common, patch_shuffle=0)))
    sc = load_file(str(tmp_path / "plain" / "convnet_seed0" / "model.safetensors"))
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the shuffle did change the inputs


def test_edc_protocol_evaluates_and_saves_the_ema_student(prism_run, zoo, tmp_path):
    m = validate(validate_config("edc", **STUDENT, distilled=str(prism_run), teachers=str(zoo), label_teachers="convnet,resnet18",
                                 epochs=2, eval_every=1, out=str(tmp_path / "v"), ema_eval=0.5))
    assert m["protocol"]["ema_eval"] == 0.5 and m["protocol"]["schedule"] == "half_linear"
    # the saved student is the EMA one: evaluated again from disk it gives the reported accuracy
    model, _ = load_model(tmp_path / "v" / "convnet_seed0")
    _, test, info = load_dataset("digits")
    assert evaluate(model, test, info, "cpu")["top1"] == pytest.approx(m["top1"], abs=1e-3)
    # LR per epoch follows what EDC's code runs (LambdaLR stepped per epoch): 1e-2 * f(0), 1e-2 * f(1/2)
    lrs = [r["lr"] for r in map(__import__("json").loads, (tmp_path / "v" / "convnet_seed0" / "log.jsonl")
                                 .read_text().splitlines())]
    assert lrs == pytest.approx([0.01, 0.01 * lr_factor("half_linear", 0.5)]) == [0.01, 0.0075]


def test_batch_larger_than_the_set_and_rded_rule(prism_run, zoo, tmp_path):
    """CDA's batch 128 on 20 images: one batch of all 20 per epoch; RDED's rule at IPC 2 caps 50 at 20."""
    a = validate(validate_config("cda", **STUDENT, distilled=str(prism_run), teachers=str(zoo), epochs=1,
                                 out=str(tmp_path / "cda")))
    assert a["protocol"]["batch_size"] == 128
    assert len((tmp_path / "cda" / "convnet_seed0" / "log.jsonl").read_text().splitlines()) == 1
    b = validate(validate_config("delt", **STUDENT, distilled=str(prism_run), teachers=str(zoo), epochs=1,
                                 out=str(tmp_path / "delt")))
    assert b["protocol"]["batch_size"] == 20
