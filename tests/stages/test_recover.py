"""recover: R_BN hooks, batch planning, budgets, teacher draws, the Adam step, and end-to-end runs on digits
with the session's tiny teacher zoo (every preset, resume, determinism, BN-free rejection, torchrun)."""
from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TINY_RECOVER, ZOO_ARCHS, png_array, png_files, run_torchrun
from prismdd.core.bn import bn_hooks, bn_loss_reference
from prismdd.core.data import class_indices, load_dataset
from prismdd.core.presets import METHODS
from prismdd.core.presets import preset_settings
from prismdd.methods import PLUGINS, Plugin
from prismdd.methods.engine import Engine, image_budget
from prismdd.stages.recover import (batch_teacher_sets, draw_teacher_sets, load_teachers, plan_batches,
                                    recover_config)
from prismdd.artifacts import image_path, load_distilled
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json


# ----------------------------------------------------------------------------- R_BN
class SmallBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv3 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        x = self.bn3(self.conv3(x)).relu()
        return self.head(x.mean((2, 3)))


@pytest.fixture
def bn_model():
    torch.manual_seed(0)
    m = SmallBN()
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            m(torch.randn(16, 2, 6, 6) * 3 + 1)
    return m.eval()


def _direct_rbn(m: SmallBN, x: torch.Tensor, first: float) -> torch.Tensor:
    """R_BN written out: inputs of each BN layer, mean / biased var over (N, H, W), L2 norms."""
    inputs = []
    h = m.conv1(x)
    inputs.append((h, m.bn1))
    h = m.conv2(m.bn1(h).relu())
    inputs.append((h, m.bn2))
    h = m.conv3(m.bn2(h).relu())
    inputs.append((h, m.bn3))
    total = 0
    for i, (inp, bn) in enumerate(inputs):
        mean = inp.mean(dim=(0, 2, 3))
        var = ((inp - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        term = torch.sqrt(((mean - bn.running_mean) ** 2).sum()) + torch.sqrt(((var - bn.running_var) ** 2).sum())
        total = total + (first if i == 0 else 1.0) * term
    return total


def _rbn_from_inputs(model: nn.Module, x: torch.Tensor, first: float) -> torch.Tensor:
    """R_BN of any model: capture every BN layer's input, then mean / biased var over all dims but C."""
    inputs = []
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [b.register_forward_pre_hook(lambda mod, inp: inputs.append((mod, inp[0]))) for b in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    total = 0
    for i, (bn, inp) in enumerate(inputs):
        flat = inp.transpose(0, 1).reshape(inp.shape[1], -1).double()
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        term = (mean - bn.running_mean.double()).norm() + (var - bn.running_var.double()).norm()
        total = total + (first if i == 0 else 1.0) * term
    return total.float()


@pytest.mark.parametrize("first", [10.0, 1.0, 0.0])
def test_bn_hooks_match_direct_computation(bn_model, first):
    x = torch.randn(6, 2, 5, 5, requires_grad=True)
    with bn_hooks(bn_model, first_bn_multiplier=first) as col:
        bn_model(x)
        got = col.total()
    assert len(col.terms) == 3
    want = _direct_rbn(bn_model, x, first)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_rbn_from_inputs(bn_model, x, first), want, rtol=1e-5, atol=1e-6)
    # and the gradient w.r.t. the pixels
    g_got, = torch.autograd.grad(got, x)
    g_want, = torch.autograd.grad(want, x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_bn_loss_reference_matches_direct_computation(bn_model):
    x = torch.randn(6, 2, 5, 5)
    torch.testing.assert_close(bn_loss_reference(bn_model, x, 10.0), _direct_rbn(bn_model, x, 10.0),
                               rtol=1e-5, atol=1e-6)


def test_bn_hooks_first_layer_weight_matters(bn_model):
    x = torch.randn(6, 2, 5, 5)
    with bn_hooks(bn_model, 10.0) as col:
        bn_model(x)
        t10 = [float(t.detach()) for t in col.terms]
    with bn_hooks(bn_model, 1.0) as col:
        bn_model(x)
        t1 = [float(t.detach()) for t in col.terms]
    assert t10[0] == pytest.approx(10 * t1[0], rel=1e-5) and t10[1:] == pytest.approx(t1[1:], rel=1e-6)


def test_bn_hooks_layer_reduce_mean_and_inactive(bn_model):
    x = torch.randn(6, 2, 5, 5)
    with bn_hooks(bn_model, 10.0, "sum") as col:
        bn_model(x)
        s = col.total()
    with bn_hooks(bn_model, 10.0, "mean") as col:
        bn_model(x)
        torch.testing.assert_close(col.total(), s / 3)
        col.reset()
        col.active = False
        bn_model(x)
        assert col.terms == []
        with pytest.raises(RuntimeError, match="no BatchNorm layer"):
            col.total()


def test_bn_hooks_batchnorm1d_reduces_over_batch_only():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).eval()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    x = torch.randn(7, 3)
    with bn_hooks(nn.Sequential(bn), 1.0) as col:
        bn(x)
        got = col.total()
    want = torch.linalg.vector_norm(x.mean(0) - 0.5) + torch.linalg.vector_norm(x.var(0, unbiased=False) - 2.0)
    torch.testing.assert_close(got, want)


def test_bn_hooks_removed_on_exit_and_on_exception(bn_model):
    bns = [bn_model.bn1, bn_model.bn2, bn_model.bn3]
    with bn_hooks(bn_model):
        assert all(len(b._forward_pre_hooks) == 1 for b in bns)
    assert all(not b._forward_pre_hooks for b in bns)
    with pytest.raises(ZeroDivisionError):
        with bn_hooks(bn_model):
            1 / 0
    assert all(not b._forward_pre_hooks for b in bns)
    with pytest.raises(RuntimeError):  # the reference removes its hooks when the forward fails
        bn_loss_reference(bn_model, torch.randn(2, 5, 4, 4))
    assert all(not b._forward_hooks for b in bns)
    with pytest.raises(ValueError, match="no BatchNorm"):
        with bn_hooks(nn.Sequential(nn.Conv2d(1, 1, 1))):
            pass


# ----------------------------------------------------------------------------- planning
def test_plan_batches_cross_class_ipc_major():
    batches = plan_batches(10, 3, 16)
    assert [len(b) for b in batches] == [16, 14]
    units = [u for b in batches for u in b]
    assert sorted(units) == sorted((c, k) for c in range(10) for k in range(3))  # every unit exactly once
    assert len(set(units)) == 30
    assert units == [(c, k) for k in range(3) for c in range(10)]  # IPC index major, classes inside
    assert all(len({c for c, _ in b}) == 10 for b in batches)  # each batch mixes all classes
    # batch size 1 and a batch larger than the work
    assert plan_batches(4, 2, 1) == [[(c, k)] for k in range(2) for c in range(4)]
    assert plan_batches(4, 2, 100) == [[(c, k) for k in range(2) for c in range(4)]]


def test_image_budget_early_late():
    cfg = recover_config("prism", iterations=4000, budget="early_late", early_late_step=0.125, early_late_cycle=8)
    assert [image_budget(cfg, k) for k in (0, 1, 2, 7, 8, 9, 15, 16)] == [4000, 3500, 3000, 500, 4000, 3500,
                                                                          500, 4000]
    const = recover_config("prism", iterations=4000, budget="constant")
    assert {image_budget(const, k) for k in range(20)} == {4000}
    tiny = recover_config("prism", iterations=3, budget="early_late", early_late_step=0.5, early_late_cycle=8)
    assert image_budget(tiny, 7) >= 1  # never below one iteration


POOL = ["convnet", "resnet18", "mobilenet_v2", "mnasnet1_0", "efficientnet_b0", "shufflenet_v2_x1_0"]


def _draws(selection, seed=0, n=60, primary="resnet18", pool=POOL, **kw):
    cfg = recover_config("prism", selection=selection, seed=seed, **kw)
    return draw_teacher_sets(cfg, primary, list(pool), n)


@pytest.mark.parametrize("selection", ["intra", "pre", "all", "single", "rotate"])
def test_draws_seeded_and_primary_first(selection):
    a, b = _draws(selection), _draws(selection)
    assert a == b and len(a) == 60
    for s in a:
        assert s[0] == "resnet18"
        assert len(set(s)) == len(s) and set(s) <= set(POOL)


@pytest.mark.parametrize("selection", ["intra", "pre"])
def test_draws_depend_on_seed(selection):
    seeds = {json.dumps(_draws(selection, seed=s)) for s in range(6)}
    assert len(seeds) > 1


def test_intra_draws():
    sets = _draws("intra", n=3000, slots=3, slot_prob=0.5)
    sizes = [len(s) for s in sets]
    assert min(sizes) == 1 and max(sizes) == 4
    assert np.mean(sizes) == pytest.approx(2.5, abs=0.08)  # 1 + slots * slot_prob
    assert len({tuple(s) for s in sets}) > 20  # really redrawn per batch
    members = [a for s in sets for a in s[1:]]
    counts = {a: members.count(a) for a in POOL if a != "resnet18"}
    assert min(counts.values()) > 0.7 * max(counts.values())  # every other pool member is drawn, evenly
    assert {len(s) for s in _draws("intra", slot_prob=0.0)} == {1}
    assert {len(s) for s in _draws("intra", slot_prob=1.0, slots=3)} == {4}
    assert {len(s) for s in _draws("intra", slot_prob=1.0, slots=9)} == {len(POOL)}  # pool exhausted


def test_pre_single_all_rotate_draws():
    pre = _draws("pre", n=20, slot_prob=0.5)
    assert all(s == pre[0] for s in pre)
    assert _draws("single", n=5) == [["resnet18"]] * 5
    whole = _draws("all", n=4)
    assert all(sorted(s) == sorted(POOL) and s[0] == "resnet18" for s in whole)
    # the primary is in every set even when the pool leaves it out
    assert all(s[0] == "convnet" for s in _draws("intra", primary="convnet", pool=POOL[1:]))
    rot = _draws("rotate", n=3)
    assert all(sorted(s) == sorted(POOL) for s in rot)


# ----------------------------------------------------------------------------- Adam
def _toy_grad(x, target):
    x = x.detach().requires_grad_(True)
    loss = (torch.sin(x * 3) + (x - target) ** 2).sum()
    g, = torch.autograd.grad(loss, x)
    return g


def test_adam_step_equals_torch_adam_with_cosine():
    torch.manual_seed(0)
    n_img, T, lr, betas = 4, 25, 0.05, (0.5, 0.9)
    fake = SimpleNamespace(cfg=SimpleNamespace(lr=lr))
    target = torch.randn(n_img, 2, 3, 3)
    x0 = torch.randn(n_img, 2, 3, 3)

    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    budgets = torch.full((n_img,), T)
    start = T - budgets
    ref = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=lr, betas=betas, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / T)))
    for it in range(T):
        Engine._adam_step(fake, x, _toy_grad(x, target), m, v, it, start, budgets, *betas)
        opt.zero_grad()
        ref.grad = _toy_grad(ref, target)
        opt.step()
        sched.step()
        torch.testing.assert_close(x, ref.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x, x0)


def test_adam_step_early_late_freezes_then_runs_own_schedule():
    torch.manual_seed(1)
    T, late, lr, betas = 12, 5, 0.05, (0.5, 0.9)
    fake = SimpleNamespace(cfg=SimpleNamespace(lr=lr))
    target = torch.randn(2, 1, 2, 2)
    x0 = torch.randn(2, 1, 2, 2)
    budgets = torch.tensor([T, T - late])
    start = T - budgets  # image 1 joins at iteration `late`
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    ref = x0[1:].clone().requires_grad_(True)  # image 1 alone, with its own budget
    opt = torch.optim.Adam([ref], lr=lr, betas=betas, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / (T - late))))
    for it in range(T):
        Engine._adam_step(fake, x, _toy_grad(x, target), m, v, it, start, budgets, *betas)
        if it < late:
            assert torch.equal(x[1], x0[1]) and not m[1].any() and not v[1].any()
            continue
        opt.zero_grad()
        ref.grad = _toy_grad(ref, target[1:])
        opt.step()
        sched.step()
        torch.testing.assert_close(x[1:], ref.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- engine with real teachers
def test_engine_losses_run_each_teacher_once(zoo):
    cfg = recover_config("prism", **dict(TINY_RECOVER, teachers=str(zoo), primary="convnet"))
    _, _, info = load_dataset("digits")
    primary, teachers, pool = load_teachers(cfg, info, torch.device("cpu"))
    assert sorted(pool) == sorted(ZOO_ARCHS) and primary.arch == "convnet"
    calls = {a: 0 for a in teachers}
    for a, t in teachers.items():
        t.model.register_forward_hook(lambda *_, a=a: calls.__setitem__(a, calls[a] + 1))
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8)
    with ExitStack() as stack:
        eng = Engine(cfg, info, primary, teachers, torch.device("cpu"), stack)
        terms = eng.losses(x, y, "convnet", ["convnet", "resnet18"], None)
    assert calls == {"convnet": 1, "resnet18": 1, "mobilenet_v2": 0}
    assert set(terms) == {"ce", "bn/convnet", "bn/resnet18", "bn_mean", "total"}
    ce = nn.functional.cross_entropy(teachers["convnet"].model(x), y)
    torch.testing.assert_close(terms["ce"], ce)
    for a in ("convnet", "resnet18"):
        ref = _rbn_from_inputs(teachers[a].model, x, cfg.first_bn_multiplier)
        torch.testing.assert_close(terms[f"bn/{a}"], ref, rtol=1e-4, atol=1e-5)
    mean = (terms["bn/convnet"] + terms["bn/resnet18"]) / 2  # averaged, not summed
    torch.testing.assert_close(terms["bn_mean"], mean)
    torch.testing.assert_close(terms["total"].detach(), ce + cfg.alpha_bn * mean)
    for t in teachers.values():  # hooks were removed with the ExitStack
        assert not any(m._forward_pre_hooks for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))


# ----------------------------------------------------------------------------- end to end
def _check_run(out: Path, cfg, zoo):
    """Images, records and manifest of a tiny digits run (10 classes x ipc 2; batch size 8: batches 8/2/8/2 when
    batches stay within one IPC index (pack=ipc, the reference), 8/8/4 across indices (pack=cross))."""
    files = png_files(out)
    assert sorted(files) == sorted(f"images/{c:03d}/{c:03d}_{k:03d}.png" for c in range(10) for k in range(2))
    for c in range(10):
        for k in range(2):
            assert image_path(out, c, k) == out / f"images/{c:03d}/{c:03d}_{k:03d}.png"
    from PIL import Image

    with Image.open(files["images/003/003_001.png"]) as im:
        assert im.mode == "L" and im.size == (8, 8)
    m = read_json(out / "manifest.json")
    assert m["stage"] == "recover" and m["outputs"]["num_images"] == 20 and m["world_size"] in (1, 2)
    assert (out / "config.yaml").exists()
    plan = plan_batches(10, 2, 8, cfg.pack)
    records = [read_json(out / "records" / f"batch_{b:05d}.json") for b in range(len(plan))]
    assert [len(r["units"]) for r in records] == ([8, 2, 8, 2] if cfg.pack == "ipc" else [8, 8, 4])
    assert [[tuple(u) for u in r["units"]] for r in records] == plan
    pool = m["inputs"]["bn_pool"]
    assert sorted(pool) == sorted(ZOO_ARCHS)
    expected_sets = batch_teacher_sets(cfg, cfg.primary, pool, plan)  # seeded: the run's draws can be recomputed
    images = m["outputs"]["images"]
    assert len(images) == 20
    for r in records:
        assert r["primary"] == cfg.primary == "convnet"
        if cfg.selection != "rotate":
            assert r["bn_set"] == expected_sets[r["batch"]]
        assert r["iterations"] == max(r["budgets"]) and set(r["final_losses"]) >= {"ce", "bn_mean", "total"}
        for i, (c, k) in enumerate(r["units"]):
            e = images[f"{c}_{k}"]
            assert (e["class"], e["ipc_index"], e["batch"], e["primary"]) == (c, k, r["batch"], "convnet")
            assert e["file"] == f"images/{c:03d}/{c:03d}_{k:03d}.png"
            assert e["iterations"] == r["budgets"][i] == image_budget(cfg, k)
            if cfg.selection == "rotate":
                assert e["teachers"] == sorted(r["rotation_counts"])
                assert sum(r["rotation_counts"].values()) == r["iterations"]
                assert set(e["teachers"]) <= set(pool)
            else:
                assert e["teachers"] == r["bn_set"]  # the per-image record agrees with its batch
                assert e["teachers"][0] == "convnet"
    if cfg.selection == "single":
        assert all(e["teachers"] == ["convnet"] for e in images.values())
    if cfg.selection == "pre":
        assert len({tuple(r["bn_set"]) for r in records}) == 1
    assert sorted(m["inputs"]["teachers"]) == sorted(ZOO_ARCHS)
    log = [json.loads(line) for line in (out / "logs" / "rank0.jsonl").read_text().splitlines()]
    assert {rec["batch"] for rec in log} == set(range(len(plan))) and all("total" in rec for rec in log)
    return m, records


def _optimises(method: str) -> bool:
    """False for presets whose plug-in makes images without optimising (RDED, D4M: tested in their own files)."""
    plugin = PLUGINS.get(preset_settings("recover", method)[1].get("plugin", "none"))
    return plugin.synthesize is Plugin.synthesize


@pytest.mark.parametrize("method", [m for m in METHODS.names() if _optimises(m)])
def test_recover_every_preset(method, recover_run, zoo, tmp_path):
    _, settings = preset_settings("recover", method)
    # iterations 8: early-late budgets visible (8 for IPC index 0, 7 for index 1)
    out = recover_run(tmp_path / method, method, iterations=8)
    cfg = recover_config(method, **dict(TINY_RECOVER, teachers=str(zoo), out=str(out), iterations=8))
    assert cfg.selection == settings["selection"]
    m, records = _check_run(out, cfg, zoo)
    assert m["config"]["method"] == method and m["config"]["selection"] == settings["selection"]
    budgets = {k: image_budget(cfg, k) for k in range(2)}
    assert budgets == ({0: 8, 1: 7} if settings["budget"] in ("early_late", "rounds") else {0: 8, 1: 8})
    # the images moved away from their starting point
    train, _, info = load_dataset("digits")
    per_class = class_indices(train.targets, 10)
    if settings["init"] == "real":
        real = train.images[int(per_class[4][1]), 0].numpy()
        assert np.abs(png_array(out / "images/004/004_001.png").astype(int) - real).max() > 0
    ds = load_distilled(out)
    assert len(ds) == 20 and ds.images.shape == (20, 1, 8, 8)


def test_recorded_intra_sets_vary_across_batches(recover_run, tmp_path):
    # batch 1 image per batch: 20 batches, enough for the per-batch redraw (pack=cross) to show
    out = recover_run(tmp_path / "intra", "prism", batch_size=1, iterations=1, ipc=2, pack="cross")
    sets = [read_json(p)["bn_set"] for p in sorted((out / "records").glob("batch_*.json"))]
    assert len(sets) == 20 and len({tuple(s) for s in sets}) > 1
    images = read_json(out / "manifest.json")["outputs"]["images"]
    for r in (read_json(p) for p in (out / "records").glob("batch_*.json")):
        (c, k), = r["units"]
        assert images[f"{c}_{k}"]["teachers"] == r["bn_set"]


def test_load_distilled(prism_run):
    ds = load_distilled(prism_run)
    assert len(ds) == 20 and ds.images.dtype == torch.uint8 and ds.images.shape == (20, 1, 8, 8)
    assert ds.targets.tolist() == [c for c in range(10) for _ in range(2)]
    assert ds.info.name == "digits" and ds.info.num_classes == 10 and ds.info.resolution == 8
    assert ds.manifest["stage"] == "recover"
    np.testing.assert_array_equal(ds.images[7, 0].numpy(), png_array(prism_run / "images/003/003_001.png"))


def test_load_distilled_errors(tmp_path, prism_run):
    with pytest.raises(PrismError, match="no manifest"):
        load_distilled(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prism_run, copy)
    (copy / "images/002/002_000.png").write_bytes(b"junk")
    with pytest.raises(PrismError, match="002_000.png"):
        load_distilled(copy)


def test_determinism_same_seed_same_pngs(prism_run, recover_run, tmp_path):
    again = recover_run(tmp_path / "again", "prism")
    a, b = png_files(prism_run), png_files(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes(), k
    other = recover_run(tmp_path / "seed1", "prism", seed=1)
    diff = [k for k in a if not np.array_equal(png_array(a[k]), png_array(png_files(other)[k]))]
    assert len(diff) > 10  # another seed gives other images


def test_resume_redoes_only_the_missing_batch(prism_run, recover_run, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(prism_run, out)
    # the prism preset packs within IPC indices (pack=ipc): batches of 8, 2, 8, 2 images
    records = {b: read_json(out / "records" / f"batch_{b:05d}.json") for b in range(4)}
    victim = [image_path(out, c, k) for c, k in records[1]["units"]]
    (out / "records" / "batch_00001.json").unlink()
    for p in victim:
        p.unlink()
    before = {k: p.stat().st_mtime_ns for k, p in png_files(out).items()}
    assert len(before) == 18
    capsys.readouterr()
    recover_run(out, "prism")
    assert "resuming: 3 of 4 batches already finished" in capsys.readouterr().out
    after = png_files(out)
    assert len(after) == 20 and (out / "records" / "batch_00001.json").exists()
    for k, t in before.items():
        assert after[k].stat().st_mtime_ns == t, f"{k} was rewritten"
    ref = png_files(prism_run)
    for k in ref:
        np.testing.assert_array_equal(png_array(after[k]), png_array(ref[k]), err_msg=k)
    new = read_json(out / "records" / "batch_00001.json")
    assert new["bn_set"] == records[1]["bn_set"] and new["units"] == records[1]["units"]
    m = read_json(out / "manifest.json")
    assert m["outputs"]["num_images"] == 20
    # a second re-run has nothing to do
    recover_run(out, "prism")
    assert "resuming: 4 of 4" in capsys.readouterr().out
    assert all(after[k].stat().st_mtime_ns == p.stat().st_mtime_ns for k, p in png_files(out).items())


def test_resume_refuses_or_redoes_other_config(prism_run, recover_run, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(prism_run, out)
    try:
        recover_run(out, "prism", seed=1)
    except PrismError:
        return  # refusing is fine
    fresh = recover_run(tmp_path / "fresh_seed1", "prism", seed=1)
    for k, p in png_files(fresh).items():
        np.testing.assert_array_equal(png_array(out / k), png_array(p), err_msg=k)


def test_force_redoes_everything(prism_run, recover_run, tmp_path):
    out = tmp_path / "force"
    shutil.copytree(prism_run, out)
    before = {k: p.stat().st_mtime_ns for k, p in png_files(out).items()}
    recover_run(out, "prism", force=True)
    after = png_files(out)
    assert all(after[k].stat().st_mtime_ns != t for k, t in before.items())
    assert all(after[k].read_bytes() == (prism_run / k).read_bytes() for k in after)


@pytest.fixture(scope="module")
def zoo_with_bn_free(zoo, tmp_path_factory):
    """A copy of the zoo plus a ConvNet with instance norm (BN-free)."""
    from prismdd.core.config import build_config
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    folder = tmp_path_factory.mktemp("zoo_in") / "zoo"
    shutil.copytree(zoo, folder)
    squeeze(build_config(SqueezeConfig, dict(dataset="digits", arch="convnet_in", width=0.25, epochs=1,
                                             batch_size=256, out=str(folder), device="cpu")))
    return folder


def test_bn_free_teacher_rejected_from_bn_pool(zoo_with_bn_free, recover_run, tmp_path, cli, capsys):
    with pytest.raises(PrismError, match="convnet_in has no BatchNorm"):
        recover_run(tmp_path / "x", "prism", teachers=str(zoo_with_bn_free), bn_pool="convnet,convnet_in,resnet18")
    assert not (tmp_path / "x" / "images").exists()
    # the default pool is every teacher found, so the BN-free one is rejected there too (loudly, not skipped)
    with pytest.raises(PrismError, match="convnet_in"):
        recover_run(tmp_path / "y", "prism", teachers=str(zoo_with_bn_free))
    # via the CLI: exit code 2, one line
    capsys.readouterr()
    code = cli(["recover", "--dataset", "digits", "--teachers", zoo_with_bn_free, "--out", tmp_path / "z",
                "--bn-pool", "convnet,convnet_in", "--ipc", 1, "--iterations", 1, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "convnet_in" in err and len(err.strip().splitlines()) == 1


def test_bn_free_primary_needs_alpha_bn_zero(zoo_with_bn_free, recover_run, tmp_path):
    with pytest.raises(PrismError, match="--primary convnet_in"):
        recover_run(tmp_path / "p", "sre2l", teachers=str(zoo_with_bn_free), primary="convnet_in", bn_pool="convnet")
    out = recover_run(tmp_path / "ok", "sre2l", teachers=str(zoo_with_bn_free), primary="convnet_in",
                      bn_pool="convnet", alpha_bn=0.0, iterations=1)
    assert len(png_files(out)) == 20


def test_missing_teacher_in_pool(recover_run, tmp_path):
    with pytest.raises(PrismError, match="no trained teacher for efficientnet_b0") as ei:
        recover_run(tmp_path / "m", "prism", bn_pool="resnet18,efficientnet_b0")
    assert "squeeze --arch efficientnet_b0" in str(ei.value)
    with pytest.raises(PrismError, match="no finished teachers"):
        recover_run(tmp_path / "n", "prism", teachers=str(tmp_path))


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(prism_run, zoo, tmp_path):
    out = tmp_path / "ddp"
    run_torchrun(["recover", "--method", "prism", "--dataset", "digits", "--teachers", zoo, "--out", out,
                  "--ipc", "2", "--iterations", "3", "--batch-size", "8", "--device", "cpu", "--seed", "0"])
    m = read_json(out / "manifest.json")
    assert m["world_size"] == 2 and m["outputs"]["num_images"] == 20
    # batches (8, 2, 8, 2 images: pack=ipc) are dealt round-robin: rank 0 did batches 0 and 2, rank 1 1 and 3
    for rank, want in ((0, {0, 2}), (1, {1, 3})):
        log = (out / "logs" / f"rank{rank}.jsonl").read_text().splitlines()
        assert {json.loads(line)["batch"] for line in log} == want
    a, b = png_files(prism_run), png_files(out)
    assert a.keys() == b.keys()
    # same seed, same per-batch random streams, one thread each: the pixels are identical
    for k in a:
        np.testing.assert_array_equal(png_array(b[k]), png_array(a[k]), err_msg=k)
    ref = read_json(prism_run / "manifest.json")["outputs"]["images"]
    assert {k: e["teachers"] for k, e in m["outputs"]["images"].items()} == {k: e["teachers"] for k, e in ref.items()}


# ----------------------------------------------------------------------------- real starts: selection and tiles
def test_tile_places_each_image_in_its_cell():
    from prismdd.methods.starts import tile

    imgs = torch.stack([torch.full((1, 6, 6), float(v)) for v in (1, 2, 3, 4)])
    out = tile(imgs, 2)
    assert out.shape == (1, 1, 6, 6)
    assert out[0, 0, :3, :3].eq(1).all() and out[0, 0, :3, 3:].eq(2).all()
    assert out[0, 0, 3:, :3].eq(3).all() and out[0, 0, 3:, 3:].eq(4).all()
    odd = tile(torch.stack([torch.full((1, 7, 7), float(v)) for v in range(1, 10)]), 3)  # 7 px into 3 cells
    assert odd.shape == (1, 1, 7, 7) and set(odd.unique().tolist()) == set(range(1, 10))
    assert tile(imgs, 1) is imgs


@pytest.mark.parametrize("select", ["first", "random", "low-loss", "mid-loss"])
def test_choose_starts(select, zoo):
    from prismdd.core.training import example_scores
    from prismdd.methods.starts import choose_starts
    from prismdd.artifacts import load_model

    train, _, info = load_dataset("digits")
    model = load_model(zoo / "convnet")[0]
    members = class_indices(train.targets, 10)
    # candidates = the whole class, so the loss ranking can be checked against every member
    cfg = recover_config("prism", **dict(TINY_RECOVER, ipc=2, init_tiles=2, init_select=select, init_candidates=10_000))
    starts = choose_starts(cfg, train, info, model, torch.device("cpu"))
    again = choose_starts(cfg, train, info, model, torch.device("cpu"))
    for c, s in enumerate(starts):
        assert len(s) == 8 and len(set(s.tolist())) == 8 and set(s.tolist()) <= set(members[c].tolist())
        assert torch.equal(s, again[c])
        if select == "first":
            assert torch.equal(s, members[c][:8])
        if select in ("low-loss", "mid-loss"):
            scores = example_scores(model, train.get_images(members[c]), torch.full((len(members[c]),), c), info, "cpu")
            loss = dict(zip(members[c].tolist(), scores["loss"].tolist()))
            ranked = sorted(loss.values())
            chosen = sorted(loss[i] for i in s.tolist())
            lo = 0 if select == "low-loss" else (len(ranked) - 8) // 2
            assert chosen == pytest.approx(ranked[lo:lo + 8])
    other = choose_starts(recover_config("prism", **dict(TINY_RECOVER, ipc=2, init_select=select, seed=1,
                                                         init_candidates=20)), train, info, model, "cpu")
    if select != "first":
        assert any(not torch.equal(a[:2], b) for a, b in zip(starts, other))


def test_tiled_start_recorded_and_unoptimised_image_is_the_mosaic(recover_run, tmp_path):
    from prismdd.methods.starts import tile

    out = recover_run(tmp_path / "tiles", "prism", init_tiles=2, init_select="random", iterations=1, lr=0.0)
    train, _, info = load_dataset("digits")
    images = read_json(out / "manifest.json")["outputs"]["images"]
    assert len(images) == 20
    for key, e in images.items():
        idx = e["start_indices"]
        assert len(idx) == 4 and all(int(train.targets[i]) == e["class"] for i in idx)
        want = tile(train.get_images(torch.tensor(idx)).float(), 2)[0, 0].numpy()
        assert np.abs(png_array(out / e["file"]).astype(float) - want).max() <= 1  # 8-bit rounding only


def test_start_settings_refused():
    with pytest.raises(PrismError, match="--init-tiles"):
        recover_config("prism", **dict(TINY_RECOVER, init_tiles=0))
    with pytest.raises(PrismError, match="--init-select"):
        recover_config("prism", **dict(TINY_RECOVER, init_select="best"))


def test_too_many_starts_named(recover_run, tmp_path):
    with pytest.raises(PrismError, match="init-tiles"):
        recover_run(tmp_path / "big", "prism", ipc=10, init_tiles=8)
