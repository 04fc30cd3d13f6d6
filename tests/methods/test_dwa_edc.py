"""DWA and EDC recovery plug-ins: each defining mechanism against a literal re-statement of its reference code
on fixed inputs, weight restoration (also when a batch fails), and one tiny end-to-end recover each."""
from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_RECOVER
from prismdd.artifacts import WEIGHTS, file_digest, save_image
from prismdd.core.bn import bn_loss_reference
from prismdd.core.data import load_splits
from prismdd.core.io import load_tensors, read_json, save_tensors, tensors_metadata
from prismdd.methods.dwa import DWA, adjust_weights
from prismdd.methods.edc import EDC, batch_stats, category_target, edc_stats_file, layer_term
from prismdd.methods.stats import RealStats, layer_stats_path, real_data_pass, smoothed
from prismdd.stages.recover import load_teachers, recover, recover_config


class Tiny(nn.Module):
    def __init__(self, cin=1, k=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, k)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _tiny_model(seed=0, cin=1, k=3):
    torch.manual_seed(seed)
    m = Tiny(cin, k)
    with torch.no_grad():  # non-trivial running statistics
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    for p in m.parameters():
        p.requires_grad_(False)  # as the engine's teachers
    return m.eval()


def _redo_batch_gives_the_same_images(out, record, rerun):
    """Resume: a batch redone alone (its record and images removed) gives the same PNG bytes, so the plug-in's
    state is a function of (seed, batch index) only."""
    files = [out / "images" / f"{c:03d}" / f"{c:03d}_{k:03d}.png" for c, k in record["units"]]
    before = [f.read_bytes() for f in files]
    (out / "records" / f"batch_{record['batch']:05d}.json").unlink()
    for f in files:
        f.unlink()
    rerun()
    assert [f.read_bytes() for f in files] == before


# ----------------------------------------------------------------------------- DWA
def test_dwa_adjustment_is_the_reference_update():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    rho, steps = 0.3, 4
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    # literal re-statement of perterb.py first_step, `steps` times (distillation_imgnet.py:137-142)
    for _ in range(steps):
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in ref.parameters() if p.grad is not None]), p=2)
            scale = (rho / steps) / (grad_norm + 1e-12)
            for p in ref.parameters():
                if p.grad is not None:
                    p.add_(p.grad * scale)
                    p.grad = None
    before = [p.clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    norms = adjust_weights(model, x, y, rho, steps)
    assert len(norms) == steps
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - b)
                                                  for p, b in zip(model.parameters(), before)]))
    assert 0.5 * rho < moved <= rho * (1 + 1e-5)  # K steps of rho/K each
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), stats))  # running statistics untouched
    assert not any(p.requires_grad for p in model.parameters())  # flags restored


def _dwa_plugin(model, **over):
    cfg = recover_config("dwa", dataset="digits", primary="tiny", **over)
    info = SimpleNamespace(resolution=8)
    return DWA(cfg, info, None, {"tiny": SimpleNamespace(model=model)}, ["tiny"], torch.device("cpu"))


def test_dwa_restores_weights_bit_exactly_and_is_a_function_of_b():
    model = _tiny_model()
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    units = [(0, 0), (1, 0), (2, 0)]
    plugin = _dwa_plugin(model, dwa_rho=0.2, dwa_steps=3)
    adjusted = []
    for b in (5, 5, 6):
        plugin.begin_batch(b, units, x)
        adjusted.append([p.clone() for p in model.parameters()])
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        record = {}
        plugin.end_batch(b, record)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert 0 < record["dwa"]["displacement"] <= 0.2 * (1 + 1e-5) and len(record["dwa"]["grad_norms"]) == 3
    assert all(torch.equal(p, q) for p, q in zip(adjusted[0], adjusted[1]))  # same (seed, b): same adjustment
    assert not all(torch.equal(p, q) for p, q in zip(adjusted[0], adjusted[2]))  # another b: another view


def test_dwa_variance_weight_gives_the_reference_bn_term():
    model = _tiny_model()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    r_var, fbm, alpha = 2.0, 10.0, 0.01
    plugin = _dwa_plugin(model, dwa_rho=0.0, dwa_var_weight=r_var, first_bn_multiplier=fbm, alpha_bn=alpha)
    plugin.begin_batch(0, [(0, 0)], x)
    try:
        logits = model(x)
        engine = SimpleNamespace(collectors={"tiny": SimpleNamespace(active=True, scale=1.0)})
        extra = plugin.losses(engine, x, None, 0, 0, {"tiny": logits})["dwa_var"]
    finally:
        plugin.end_batch(0, {})
    # literal re-statement of utils.py BNFeatureHook.hook_fn + the rescaled sum (distillation_imgnet.py:149-158)
    terms = []
    inp = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, n=n: inp.__setitem__(n, i[0])) for n, bn in
             (("bn1", model.bn1), ("bn2", model.bn2))]
    model(x)
    for h in hooks:
        h.remove()
    for idx, (n, bn) in enumerate((("bn1", model.bn1), ("bn2", model.bn2))):
        i0 = inp[n]
        nch = i0.shape[1]
        mean = i0.mean([0, 2, 3])
        var = i0.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        r = torch.norm(bn.running_var.data - var, 2) * r_var + torch.norm(bn.running_mean.data - mean, 2)
        terms.append(r * (fbm if idx == 0 else 1.0))
    reference = alpha * torch.stack(terms).sum()
    ours = alpha * bn_loss_reference(model, x, fbm) + extra
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    assert not plugin.handles and not model.bn1._forward_pre_hooks  # hooks gone after the batch


def test_dwa_recover_end_to_end_and_restores_after_a_failing_batch(zoo, tmp_path, monkeypatch):
    settings = dict(TINY_RECOVER, teachers=str(zoo), iterations=2)
    out = recover(recover_config("dwa", out=str(tmp_path / "dwa"), **settings))
    records = [read_json(p) for p in sorted((out / "records").glob("batch_*.json"))]
    assert len(records) == 4 and len(list((out / "images").rglob("*.png"))) == 20
    for r in records:
        assert len(r["dwa"]["grad_norms"]) == 15 and 0 < r["dwa"]["displacement"] <= 0.015 * (1 + 1e-5)
        assert r["bn_set"] == ["convnet"] and "dwa_var" in r["final_losses"]
    manifest = read_json(out / "manifest.json")
    assert manifest["inputs"]["plugin"] == {"name": "dwa", "teacher": "convnet", "rho": 0.015, "steps": 15,
                                            "var_weight": 2.0}
    _redo_batch_gives_the_same_images(out, records[1], lambda: recover(recover_config("dwa", out=str(out), **settings)))

    # a batch that fails after the adjustment: the teacher's weights are still restored (Engine.run_batch finally)
    seen = {}
    real_begin = DWA.begin_batch

    def begin(self, b, units, x):
        seen["plugin"], seen["before"] = self, [p.detach().clone() for p in self.model.parameters()]
        real_begin(self, b, units, x)
        seen["adjusted"] = [p.detach().clone() for p in self.model.parameters()]

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(DWA, "begin_batch", begin)
    monkeypatch.setattr(DWA, "losses", boom)
    with pytest.raises(RuntimeError, match="boom"):
        recover(recover_config("dwa", out=str(tmp_path / "fail"), **settings))
    model = seen["plugin"].model
    assert not all(torch.equal(p, q) for p, q in zip(seen["adjusted"], seen["before"]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), seen["before"]))
    assert not seen["plugin"].handles


def _engine_batch(plugin, b, units, x, views, extra=0.0):
    """The engine's calls for one batch (Engine.run_batch): begin_batch, then per iteration a loss on the view and the
    gradient of the pixels and of ``grad_wrt()`` (handed to ``take_grads``), end_batch. Returns the record."""
    y = torch.tensor([c for c, _ in units])
    x = x.clone().requires_grad_(True)
    plugin.begin_batch(b, units, x)
    record = {}
    try:
        for v in views:
            logits = plugin.model(x + v)
            total = F.cross_entropy(logits, y) + extra * logits.square().mean()
            wrt = plugin.grad_wrt()
            _, *more = torch.autograd.grad(total, [x, *wrt], allow_unused=bool(wrt))
            if wrt:
                plugin.take_grads(more)
    finally:
        plugin.end_batch(b, record)
    return record


def test_dwa_carried_gradient_is_the_reference_leftover(tmp_path):
    """dwa_carry_grad against distillation_imgnet.py re-stated literally for two batches of one IPC index: the
    teacher is never frozen, so every iteration's ``loss.backward()`` (:188) adds to ``.grad``; the image optimiser's
    ``zero_grad`` (:135) clears only the pixels and ``first_step(True)`` (perterb.py:20-32) clears ``.grad`` after
    using it, so the next batch's FIRST adjustment step follows g_CE + the previous batch's sum. prismdd restores the
    weights after each batch (FIDELITY.md D1), which the re-statement does too. The first batch of an IPC index
    (class 0 first) carries nothing; a new process continues from the stored sum; settings that cannot carry fail."""
    from prismdd.core.errors import PrismError

    gen = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen)
    views = [0.1 * torch.randn(1, 1, 8, 8, generator=gen) for _ in range(4)]
    first, second = [(0, 0), (1, 0), (2, 0)], [(1, 0), (2, 0)]  # second: not class 0, so the same IPC index goes on
    rho, steps, extra = 0.2, 3, 0.05
    settings = dict(dwa_rho=rho, dwa_steps=steps, dwa_carry_grad=True, iterations=len(views))

    model = _tiny_model()
    base = [p.detach().clone() for p in model.parameters()]
    plugin = _dwa_plugin(model, **settings)
    plugin.prepare(tmp_path)
    records = [_engine_batch(plugin, 0, first, x0, views, extra)]
    plugin.begin_batch(1, second, x1)
    ours = [p.detach().clone() for p in model.parameters()]
    plugin.end_batch(1, {})

    # the reference, literally (its views of the adjustment: prismdd's, FIDELITY.md DWA row 2)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)  # :212-216 never freezes the teacher

    def first_steps(x, units):
        y = torch.tensor([c for c, _ in units])
        for _ in range(steps):  # :137-142
            F.cross_entropy(ref(x), y).backward()
            with torch.no_grad():  # perterb.py first_step(zero_grad=True) with rho / steps
                grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in ref.parameters() if p.grad is not None]))
                for p in ref.parameters():
                    if p.grad is not None:
                        p.add_(p.grad * ((rho / steps) / (grad_norm + 1e-12)))
                        p.grad = None

    first_steps(plugin.view(0, x0), first)
    xr = x0.clone().requires_grad_(True)
    for v in views:  # :143-188: every iteration's backward adds to the teacher's .grad
        logits = ref(xr + v)
        (F.cross_entropy(logits, torch.tensor([0, 1, 2])) + extra * logits.square().mean()).backward()
    with torch.no_grad():  # prismdd's restore after the batch (D1); .grad stays
        for p, s in zip(ref.parameters(), base):
            p.copy_(s)
    first_steps(plugin.view(1, x1), second)
    for p, q in zip(ours, ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert records[0]["dwa"]["carried_from"] is None
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), base))  # restored
    assert not any(p.requires_grad for p in model.parameters())  # frozen again after the batch

    # without the option the second batch's first step is another one
    plain = _dwa_plugin(_tiny_model(), dwa_rho=rho, dwa_steps=steps, iterations=len(views))
    plain.begin_batch(1, second, x1)
    assert not all(torch.allclose(p, q) for p, q in zip(plain.model.parameters(), ours))
    plain.end_batch(1, {})
    # a new process (resume) continues from the stored sum: the same adjustment
    again = _dwa_plugin(_tiny_model(), **settings)
    again.prepare(tmp_path)
    again.begin_batch(1, second, x1)
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), ours))
    record = {}
    again.end_batch(1, record)
    assert record["dwa"]["carried_from"] == 0
    with pytest.raises(PrismError, match="continues the teacher gradient of batch 4"):
        again.begin_batch(5, second, x1)
    for over, need in ((dict(pack="cross"), "--pack ipc"), (dict(dwa_rho=0.0), "--dwa-rho"),
                       (dict(budget="early_late"), "--budget constant")):
        with pytest.raises(PrismError, match=f"--dwa-carry-grad needs {need}"):
            _dwa_plugin(_tiny_model(), **{**settings, **over})


def test_dwa_carry_grad_end_to_end_and_resume(zoo, tmp_path):
    """Through the engine: batches 1 and 3 (the second of IPC indices 0 and 1) continue batches 0 and 2, whose
    adjustments equal the run without the option; a batch redone alone continues the stored sum (same PNG bytes)."""
    settings = dict(TINY_RECOVER, teachers=str(zoo), iterations=2, batch_size=5)
    runs = {}
    for carry in (False, True):
        out = recover(recover_config("dwa", out=str(tmp_path / f"carry{carry}"), dwa_carry_grad=carry, **settings))
        runs[carry] = [read_json(p) for p in sorted((out / "records").glob("batch_*.json"))]
    assert [r["dwa"]["carried_from"] for r in runs[True]] == [None, 0, None, 2]
    for b, (plain, carried) in enumerate(zip(runs[False], runs[True])):
        same = plain["dwa"]["grad_norms"] == carried["dwa"]["grad_norms"]
        assert same == (b in (0, 2)), b
    assert sorted(p.name for p in (out / "dwa_carry").iterdir()) == ["batch_00002.safetensors",
                                                                     "batch_00003.safetensors"]
    assert read_json(out / "manifest.json")["inputs"]["plugin"]["carry_grad"] is True
    _redo_batch_gives_the_same_images(out, runs[True][3], lambda: recover(recover_config(
        "dwa", out=str(out), dwa_carry_grad=True, **settings)))


# ----------------------------------------------------------------------------- EDC
def _ref_patches(x, per_image):
    """U:380-385 / 392-395 re-stated with explicit loops over the 16x16 cells (row-major (u v)) after the
    bilinear resize to multiples of 16 (div_sixteen_mul)."""
    up = lambda v: int(v // 16 * 16) + int(v % 16 > 0) * 16
    r = F.interpolate(x, [up(x.shape[2]), up(x.shape[3])], mode="bilinear")
    means, vars_ = [], []
    for u in range(r.shape[2] // 16):
        for v in range(r.shape[3] // 16):
            cell = r[:, :, u * 16:(u + 1) * 16, v * 16:(v + 1) * 16]
            flat = cell.reshape(cell.shape[0], -1) if per_image else cell.reshape(1, -1)
            means.append(flat.mean(1))
            vars_.append(flat.var(1, unbiased=False))
    m, v = torch.stack(means, -1), torch.stack(vars_, -1)  # (B or 1, cells)
    return (m, v) if per_image else (m[0], v[0])


@pytest.mark.parametrize("conv,hw", [(False, (20, 18)), (True, (20, 18)), (True, (3, 5))])
def test_edc_category_aware_term_is_the_reference_formula(conv, hw):
    g = torch.Generator().manual_seed(4)
    C, K = 3, 4
    # 20 x 18 -> resized to 32 x 32: 4 cells (resized in memory); 3 x 5 -> one 16 x 16 cell (closed form)
    x = (torch.randn(6, C, *hw, generator=g) + 0.7).requires_grad_(True)
    y = torch.tensor([0, 2, 2, 3, 1, 0])
    keys = ("var", "mean", "patch_mean", "patch_var") if conv else ("var", "mean")
    n_cells = (-(-hw[0] // 16)) * (-(-hw[1] // 16))
    size = {"var": C, "mean": C, "patch_mean": n_cells, "patch_var": n_cells}
    glob = {k: torch.rand(size[k], generator=g) + 0.5 for k in keys}  # running (BN) or real-data (conv) statistics
    cls = {k: torch.rand(K, size[k], generator=g) + 0.5 for k in keys}
    ema = {k: torch.rand(size[k], generator=g) for k in keys}
    momentum = 0.8

    # literal re-statement of U:462-503 (conv) / U:205-226 (BN), category_aware == "global"
    nch = x.shape[1]
    cur = {"mean": x.mean([0, 2, 3]),
           "var": (x.permute(1, 0, 2, 3).contiguous().reshape([nch, -1])).var(1, unbiased=False)}
    if conv:
        cur["patch_mean"], cur["patch_var"] = _ref_patches(x, per_image=False)
    with torch.no_grad():
        dd = {k: momentum * ema[k] + (1 - momentum) * cur[k] for k in keys}
    st = {k: dd[k] + cur[k] - cur[k].detach() for k in keys}
    r_ref = sum(torch.norm(glob[k] - st[k], 2) for k in keys) * 0.5
    r_ref = r_ref + sum(torch.norm(cls[k][y.long()].mean(0) - st[k], 2) for k in keys) * 0.5
    g_ref, = torch.autograd.grad(r_ref, x)

    stats, new = {}, {}
    for k, s in batch_stats(x, conv).items():
        stats[k], new[k] = smoothed(s, ema[k], momentum)
    assert set(stats) == set(keys)
    r = layer_term(stats, glob, category_target(cls, y), 0.5)
    g_ours, = torch.autograd.grad(r, x)
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    for k in keys:
        torch.testing.assert_close(new[k], dd[k])
    # the EMA state starts at 0 (the reference's ``self.dd_var = 0.``): first value = (1 - momentum) * s
    first, _ = smoothed(cur["var"], None, momentum)
    torch.testing.assert_close(first, (1 - momentum) * cur["var"].detach())


@pytest.mark.parametrize("hw", [(16, 16), (1, 1), (4, 6)])
def test_edc_real_data_statistics_are_the_reference_accumulators(hw):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 2, *hw, generator=g), torch.tensor([1, 0, 1, 2, 1, 0, 0])
    col = RealStats(True, total=7, num_classes=3)
    col.y = y
    col(None, (x,))
    # literal re-statement of U:373-403 (pre_hook_fn) for one batch of a 7-image pass
    bs, nch = x.shape[:2]
    torch.testing.assert_close(col.glob["mean"].float(), x.mean([0, 2, 3]) * bs / 7)
    torch.testing.assert_close(col.glob["var"].float(),
                               x.permute(1, 0, 2, 3).reshape(nch, -1).var(1, unbiased=False) * bs / 7)
    pm, pv = _ref_patches(x, per_image=False)
    torch.testing.assert_close(col.glob["patch_mean"].float(), pm)
    torch.testing.assert_close(col.glob["patch_var"].float(), pv)
    dd_mean, dd_var = x.mean([2, 3]), x.view(bs, nch, -1).var(2, unbiased=False)
    p_mean, p_var = _ref_patches(x, per_image=True)
    for c in range(3):
        sel = y == c
        torch.testing.assert_close(col.sums["mean"][c].float(), dd_mean[sel].sum(0))
        torch.testing.assert_close(col.sums["var"][c].float(), dd_var[sel].sum(0))
        torch.testing.assert_close(col.sums["patch_mean"][c].float(), p_mean[sel].sum(0))
        torch.testing.assert_close(col.sums["patch_var"][c].float(), p_var[sel].sum(0))


def test_edc_class_statistics_and_the_patch_swap():
    cfg = recover_config("edc", dataset="digits", edc_stats_images=60, primary="tiny")
    train, _, info = load_splits(cfg)
    model = _tiny_model(k=10)
    plugin = EDC(cfg, info, train, {"tiny": SimpleNamespace(model=model)}, ["tiny"], torch.device("cpu"))
    prov = plugin.prepare(None)
    assert prov["statistics"]["images"] == {"tiny": 60}
    layers = plugin.targets["tiny"]
    assert [type(m).__name__ for m, *_ in layers] == ["Conv2d", "BatchNorm2d", "Conv2d", "BatchNorm2d"]
    bn_glob = layers[1][2]
    assert bn_glob["var"] is model.bn1.running_var and bn_glob["mean"] is model.bn1.running_mean
    swapped = layers[0][3]
    plain, _ = EDC(recover_config("edc", dataset="digits", edc_stats_images=60, primary="tiny",
                                  edc_swap_patch_targets=False), info, train,
                   {"tiny": SimpleNamespace(model=model)}, ["tiny"], torch.device("cpu")).real_statistics(model)
    assert torch.equal(swapped["patch_mean"], plain[0][3]["patch_var"])
    assert torch.equal(swapped["patch_var"], plain[0][3]["patch_mean"])
    assert torch.equal(swapped["var"], plain[0][3]["var"])
    assert (plain[1][3]["var"] > 0).all() and plain[1][3]["var"].shape == (10, 4)  # (classes, channels)


def _reference_picks(aux_teacher, n_batches, iterations, gpus):
    """recover.py:170-221 re-stated: each of the ``gpus`` processes keeps ONE counter (:170), advanced once per
    iteration (:216, 221) and never reset; process ``gpu`` optimises its share of every 80-image batch ``zz``, which
    is prismdd's batch zz * gpus + gpu (20 images, class-major). Returns prismdd batch -> the backbone of each
    iteration."""
    picks = {}
    for gpu in range(gpus):
        counter = 0
        for zz in range(-(-n_batches // gpus)):
            ids = []
            for iteration in range(iterations):
                id = counter % len(aux_teacher)
                counter += 1
                ids.append(aux_teacher[id])
            if zz * gpus + gpu < n_batches:
                picks[zz * gpus + gpu] = ids
    return picks


def _counts(picks):
    return {a: picks.count(a) for a in sorted(set(picks))}


def test_edc_recover_end_to_end(zoo, tmp_path, capsys):
    teachers = _edc_teachers(zoo, tmp_path, ("convnet", "resnet18", "mobilenet_v2"))  # statistics are stored there
    settings = dict(TINY_RECOVER, teachers=str(teachers), iterations=5, batch_size=4, edc_stats_images=100)
    out = recover(recover_config("edc", out=str(tmp_path / "edc"), **settings))
    assert "starts from a rded run's images; without --init-from" in capsys.readouterr().out  # says so, once
    records = [read_json(p) for p in sorted((out / "records").glob("batch_*.json"))]
    assert len(records) == 5 and len(list((out / "images").rglob("*.png"))) == 20
    # the preset's order (recover.py:386) for the backbones it names, then the rest of the pool
    expected = _reference_picks(["resnet18", "mobilenet_v2", "convnet"], 5, 5, gpus=4)
    for r in records:
        assert [u[0] for u in r["units"]] == sorted(u[0] for u in r["units"])  # class-major packing
        assert r["edc_rotation_counts"] == _counts(expected[r["batch"]])  # round-robin, a function of (b, it)
        assert r["final_losses"]["edc_stats"] > 0 and r["final_losses"]["bn_mean"] == 0
    m = read_json(out / "manifest.json")
    assert m["inputs"]["plugin"]["statistics"]["images"] == {a: 100 for a in ("convnet", "resnet18", "mobilenet_v2")}
    _redo_batch_gives_the_same_images(out, records[2], lambda: recover(recover_config("edc", out=str(out), **settings)))


def test_edc_rotates_five_backbones_one_bn_free_as_the_reference_counts(zoo, tmp_path):
    """EDC's pool is five backbones, the fifth (AlexNet) without BatchNorm (recover.py:386); with every Conv2d hooked
    (recover.py:93-103) AlexNet takes part through its conv statistics. Here convnet_in (instance norm: BN-free)
    stands in for AlexNet, fifth in the reference's order. The picks equal recover.py's per-process counter re-stated
    literally, with 7 iterations (not a multiple of 5, where b * iterations + it would differ); every iteration has a
    statistics term, the BN-free backbone's included; its real-data statistics are made and stored like the others'.
    BN-free teachers stay refused as BN teachers (prism) and by edc without conv statistics."""
    from prismdd.core.config import build_config
    from prismdd.core.errors import PrismError
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    teachers = _edc_teachers(zoo, tmp_path, ("resnet18", "mobilenet_v2"))
    for arch, width in (("efficientnet_b0", 0.25), ("shufflenet_v2_x0_5", 1.0), ("convnet_in", 0.25)):
        squeeze(build_config(SqueezeConfig, dict(dataset="digits", arch=arch, width=width, epochs=1, batch_size=256,
                                                 out=str(teachers), device="cpu")))
    pool = ["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "convnet_in"]
    # --bn-pool in another order: the rotation follows the preset's edc_order (the reference's list)
    settings = dict(TINY_RECOVER, teachers=str(teachers), primary="resnet18", bn_pool=",".join(pool[::-1]),
                    iterations=7, batch_size=4, edc_stats_images=64, log_every=1)
    out = recover(recover_config("edc", out=str(tmp_path / "edc5"), **settings))
    records = {r["batch"]: r for r in map(read_json, (out / "records").glob("batch_*.json"))}
    expected = _reference_picks(pool, 5, 7, gpus=4)
    assert len(records) == 5
    for b, r in records.items():
        assert sorted(r["bn_set"]) == sorted(pool)
        assert r["edc_rotation_counts"] == _counts(expected[b])
    assert any(_counts(expected[b]) != _counts([pool[(b * 7 + it) % 5] for it in range(7)]) for b in records)
    assert sum(r["edc_rotation_counts"]["convnet_in"] for r in records.values()) == 5
    logged = [json.loads(line) for line in (out / "logs" / "rank0.jsonl").read_text().splitlines()]
    by_step = {(e["batch"], e["iteration"]): e for e in logged if "iteration" in e}
    bn_free_steps = [(b, it) for b in records for it in range(7) if expected[b][it] == "convnet_in"]
    assert len(by_step) == 35 and len(bn_free_steps) == 5
    assert all(e["edc_stats"] > 0 for e in by_step.values())  # the BN-free backbone's conv term too
    stats = read_json(out / "manifest.json")["inputs"]["plugin"]["statistics"]
    assert set(stats["images"]) == set(pool) and stats["stored"]["convnet_in"]["computed"]
    assert layer_stats_path(teachers / "convnet_in", edc_stats_file(0)).exists()

    _, _, info = load_splits(recover_config("edc", dataset="digits"))
    for method, over in (("prism", {}), ("edc", dict(edc_conv=False))):
        cfg = recover_config(method, dataset="digits", teachers=str(teachers), primary="resnet18",
                             bn_pool=",".join(pool), device="cpu", **over)
        with pytest.raises(PrismError, match="convnet_in has no BatchNorm"):
            load_teachers(cfg, info, torch.device("cpu"))


# ----------------------------------------------------------------------------- EDC: stored statistics
def _edc_teachers(zoo, tmp_path, archs=("convnet",)):
    """A writable copy of the zoo's teachers without statistics files (other tests may have stored some there)."""
    for arch in archs:
        shutil.copytree(zoo / arch, tmp_path / "teachers" / arch, ignore=shutil.ignore_patterns("*_stats*"))
    return tmp_path / "teachers"


def _edc_plugin(teachers, **over):
    cfg = recover_config("edc", **{**dict(dataset="digits", teachers=str(teachers), primary="convnet",
                                          bn_pool="convnet", device="cpu", edc_stats_images=64), **over})
    train, _, info = load_splits(cfg)
    _, loaded, pool = load_teachers(cfg, info, torch.device("cpu"))
    return EDC(cfg, info, train, loaded, pool, torch.device("cpu"))


def _edc_targets(plugin):
    return [(conv, {k: v.clone() for k, v in glob.items()}, {k: v.clone() for k, v in cls.items()})
            for _, conv, glob, cls in plugin.targets["convnet"]]


def test_edc_statistics_stored_reused_and_recomputed(zoo, tmp_path, monkeypatch):
    """G-VBSM's mechanism for EDC: the statistics file beside the teacher is reused (no second real-data pass, the
    same targets bit for bit) while the teacher's weights and the header's settings match; another cap, conv
    setting or seed, or a retrained teacher, recompute. The patch swap is applied after loading (not in the header)."""
    import prismdd.methods.edc as E

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real_data_pass(*args, **kwargs)

    monkeypatch.setattr(E, "real_data_pass", counting)
    teachers = _edc_teachers(zoo, tmp_path)
    first = _edc_plugin(teachers)
    prov = first.prepare(None)["statistics"]
    path = layer_stats_path(teachers / "convnet", edc_stats_file(0))
    assert prov["stored"]["convnet"]["computed"] and len(calls) == 1 and path.exists()
    header = tensors_metadata(path)
    assert header["teacher_digest"] == file_digest(teachers / "convnet" / WEIGHTS)
    assert json.loads(header["images"]) == 64 and json.loads(header["seed"]) == 0 and json.loads(header["conv"])
    made = _edc_targets(first)

    again = _edc_plugin(teachers)
    assert not again.prepare(None)["statistics"]["stored"]["convnet"]["computed"] and len(calls) == 1
    for (conv, glob, cls), (conv2, glob2, cls2) in zip(made, _edc_targets(again)):
        assert conv == conv2 and glob.keys() == glob2.keys() and cls.keys() == cls2.keys()
        assert all(torch.equal(v, glob2[k]) for k, v in glob.items())
        assert all(torch.equal(v, cls2[k]) for k, v in cls.items())
    plain = _edc_plugin(teachers, edc_swap_patch_targets=False)  # reused, unswapped
    assert not plain.prepare(None)["statistics"]["stored"]["convnet"]["computed"] and len(calls) == 1
    conv_layer = next(i for i, (conv, _, _) in enumerate(made) if conv)
    assert torch.equal(plain.targets["convnet"][conv_layer][3]["patch_mean"], made[conv_layer][2]["patch_var"])

    for over, n in ((dict(edc_stats_images=32), 2), (dict(edc_conv=False), 3)):
        assert _edc_plugin(teachers, **over).prepare(None)["statistics"]["stored"]["convnet"]["computed"]
        assert len(calls) == n
    other_seed = _edc_plugin(teachers, seed=1)  # a file of its own: seed 0's stays
    assert other_seed.prepare(None)["statistics"]["stored"]["convnet"]["computed"] and len(calls) == 4
    assert layer_stats_path(teachers / "convnet", edc_stats_file(1)).exists() and path.exists()

    # the teacher retrained in place (new weights digest): recomputed, with the settings of the stored file
    assert _edc_plugin(teachers).prepare(None)["statistics"]["stored"]["convnet"]["computed"] and len(calls) == 5
    assert not _edc_plugin(teachers).prepare(None)["statistics"]["stored"]["convnet"]["computed"] and len(calls) == 5
    header = tensors_metadata(path)
    weights = load_tensors(teachers / "convnet" / WEIGHTS)
    key = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 4)
    weights[key] = weights[key] * 1.5
    save_tensors(weights, teachers / "convnet" / WEIGHTS)
    assert _edc_plugin(teachers).prepare(None)["statistics"]["stored"]["convnet"]["computed"] and len(calls) == 6
    now = file_digest(teachers / "convnet" / WEIGHTS)
    assert tensors_metadata(path)["teacher_digest"] == now != header["teacher_digest"]


def test_edc_read_only_teacher_folder_computes_without_storing(zoo, tmp_path, monkeypatch, capsys):
    """A zoo the user cannot write to (EROFS here; CI runs as root, which no file mode stops): used for the run,
    a notice, no file."""
    import errno

    import prismdd.methods.stats as S

    def refuse(folder, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(S, "save_layer_stats", refuse)
    teachers = _edc_teachers(zoo, tmp_path)
    plugin = _edc_plugin(teachers)
    assert plugin.prepare(None)["statistics"]["stored"]["convnet"]["computed"] and plugin.targets["convnet"]
    assert "read-only" in capsys.readouterr().out
    assert not layer_stats_path(teachers / "convnet", edc_stats_file(0)).exists()


def test_edc_reused_statistics_give_the_same_images(zoo, tmp_path, monkeypatch):
    """A second run (another --out) loads the stored statistics instead of the real-data pass and recovers the same
    images as the run that computed them: the float images before 8-bit saving equal bit for bit."""
    import prismdd.stages.recover as R

    made = {}

    def keep(path, x, info):
        made[(path.parent.parent.parent.name, path.name)] = x.detach().clone()
        return save_image(path, x, info)

    monkeypatch.setattr(R, "save_image", keep)
    teachers = _edc_teachers(zoo, tmp_path)
    settings = dict(TINY_RECOVER, teachers=str(teachers), primary="convnet", bn_pool="convnet", iterations=3,
                    edc_stats_images=64)
    computed = []
    for name in ("first", "second"):
        out = recover(recover_config("edc", out=str(tmp_path / name), **settings))
        stored = read_json(out / "manifest.json")["inputs"]["plugin"]["statistics"]["stored"]
        computed.append(stored["convnet"]["computed"])
    assert computed == [True, False]
    first = {k[1]: v for k, v in made.items() if k[0] == "first"}
    second = {k[1]: v for k, v in made.items() if k[0] == "second"}
    assert len(first) == 20 and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- EDC: starts from another run's images
def test_init_from_starts_each_image_from_a_seeded_image_of_its_class(zoo, tmp_path):
    """EDC's init (recover.py ``random_img_sample`` + flip): every image starts from a random image of its class in
    another recover folder (an RDED run), drawn from (seed, c, k): the same start for any batch size; with lr 0 the
    saved image IS that start (flipped or not); the source's digest guards a resume."""
    from prismdd.artifacts import load_distilled
    from prismdd.core.errors import PrismError
    src = recover(recover_config("rded", out=str(tmp_path / "rded"), dataset="digits", teachers=str(zoo), ipc=3,
                                 primary="convnet", device="cpu", rded_mipc=20, rded_num_crop=3))
    source = load_distilled(src)
    runs = []
    for bs in (4, 10):
        out = recover(recover_config("sre2l", out=str(tmp_path / f"from{bs}"), **dict(
            TINY_RECOVER, teachers=str(zoo), primary="convnet", init_from=str(src), iterations=1, lr=0.0, batch_size=bs)))
        m = read_json(out / "manifest.json")
        assert m["inputs"]["init_from"]["method"] == "rded" and m["inputs"]["init_from"]["folder"] == str(src)
        made = load_distilled(out)
        picks = {(e["class"], e["ipc_index"]): e["init_from"] for e in m["outputs"]["images"].values()}
        flips = 0
        for (c, k), i in picks.items():
            assert int(source.targets[i]) == c
            img = made.images[int((made.targets == c).nonzero()[k])]
            same, flipped = torch.equal(img, source.images[i]), torch.equal(img, source.images[i].flip(-1))
            assert same or flipped
            flips += flipped and not same
        assert 0 < flips < len(picks)  # the flip is drawn
        runs.append(picks)
    assert runs[0] == runs[1]
    # another source under the same --out: refused, not mixed in
    other = recover(recover_config("rded", out=str(tmp_path / "rded2"), dataset="digits", teachers=str(zoo), ipc=3,
                                   primary="convnet", device="cpu", rded_mipc=20, rded_num_crop=3, seed=1))
    with pytest.raises(PrismError, match="init_from"):
        recover(recover_config("sre2l", out=str(tmp_path / "from4"), **dict(
            TINY_RECOVER, teachers=str(zoo), primary="convnet", init_from=str(other), iterations=1, lr=0.0,
            batch_size=4)))
    # a folder of another size (here: this run's info at 16 px), or one that lacks a class: one line naming the option
    import dataclasses
    from prismdd.methods.starts import init_source
    cfg = recover_config("sre2l", **dict(TINY_RECOVER, teachers=str(zoo), init_from=str(src)))
    with pytest.raises(PrismError, match="--init-from .* at 8 px.* at 16 px"):
        init_source(cfg, dataclasses.replace(source.info, resolution=16))
    from prismdd.artifacts import SET_DIGEST, seal_distilled
    m = read_json(src / "manifest.json")  # a set without class 0, sealed as such (recover's own digests)
    m["outputs"]["images"] = {k: e for k, e in m["outputs"]["images"].items() if e["class"] != 0}
    m["outputs"][SET_DIGEST] = seal_distilled(src, m["outputs"]["images"])
    (src / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PrismError, match="--init-from .*no image of class"):
        init_source(cfg, source.info)


def test_the_stage_runner_starts_edc_from_an_rded_run(zoo, tmp_path):
    """`prismdd run` and the benchmarks compose stages through ``Stages``: EDC's preset says ``starts_from: rded``, so
    the runner makes (or reuses) the RDED run with the same teachers, IPC and batch settings and passes it as
    ``--init-from``; one given explicitly wins."""
    from prismdd.pipeline import Stages
    teachers = _edc_teachers(zoo, tmp_path, ("convnet",))
    stages = Stages(tmp_path / "job")
    common = dict(dataset="digits", device="cpu", seed=0)
    small = dict(primary="convnet", bn_pool="convnet", ipc=1, iterations=2, batch_size=10, edc_stats_images=64)
    edc = stages.recover("edc", common, teachers, **small)
    rded = [p for p in (tmp_path / "job" / "stages").iterdir() if p.name.startswith("recover-rded-")]
    assert len(rded) == 1
    m = read_json(edc / "manifest.json")
    assert m["config"]["init_from"] == str(rded[0]) and m["inputs"]["init_from"]["method"] == "rded"
    assert all("init_from" in e for e in m["outputs"]["images"].values())
    # the same call again reuses both stages
    assert stages.recover("edc", common, teachers, **small) == edc
    assert len([p for p in (tmp_path / "job" / "stages").iterdir() if p.name.startswith("recover-")]) == 2
