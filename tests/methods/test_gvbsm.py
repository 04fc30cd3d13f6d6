"""G-VBSM plug-in (methods/gvbsm.py) against literal re-statements of its reference code:
github.com/shaoshitong/G_VBSM_Dataset_Condensation @ 1ed80b0, Branch_full_ImageNet_1k/recover/
data_synthesis_with_svd_with_db_with_all_statistic.py (S) and utils.py (U)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prismdd.artifacts import WEIGHTS, file_digest, image_path, record_path
from prismdd.core.augment import apply_views, sample_views, scale_jitter
from prismdd.core.data import load_splits, normalize
from prismdd.core.io import load_tensors, save_tensors, tensors_metadata
from prismdd.core.runtime import make_generator
from prismdd.methods.gvbsm import GVBSM, STATS_BATCH, STATS_SEED, StatHook, densification_loss, hooked_layers
from prismdd.methods.stats import LAYER_STATS_FILE, layer_stats_path, patch_var_mean
from prismdd.stages.recover import load_teachers, recover, recover_config


# ----------------------------------------------------------------------------- literal re-statements
def ref_div_sixteen_mul(v):  # U:28-31
    v = int(v)
    m = v % 16
    return int(v // 16 * 16) + int(m > 0) * 16


def ref_patches(input_0):  # U:193-195, einops "b c (u h) (v w) -> (u v) (b c h w)" with h = w = 16
    new_h, new_w = ref_div_sixteen_mul(input_0.shape[2]), ref_div_sixteen_mul(input_0.shape[3])
    x = F.interpolate(input_0, [new_h, new_w], mode="bilinear")
    b, c = x.shape[:2]
    u, v = new_h // 16, new_w // 16
    return x.reshape(b, c, u, 16, v, 16).permute(2, 4, 0, 1, 3, 5).reshape(u * v, b * c * 16 * 16)


class RefBNFeatureHook:  # U:101-124
    def __init__(self, module, training_momentum=0.4):
        self.hook = module.register_forward_hook(self.hook_fn)
        self.dd_var = 0.
        self.dd_mean = 0.
        self.momentum = training_momentum

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        input_0 = input[0]
        mean = input_0.mean([0, 2, 3])
        var = (input_0.permute(1, 0, 2, 3).contiguous().reshape([nch, -1])).var(1, unbiased=False)
        with torch.no_grad():
            if isinstance(self.dd_var, int):
                self.dd_var, self.dd_mean = var, mean
            else:
                self.dd_var = self.momentum * self.dd_var + (1 - self.momentum) * var
                self.dd_mean = self.momentum * self.dd_mean + (1 - self.momentum) * mean
        self.r_feature = torch.norm(module.running_var.data - (self.dd_var + var - var.detach()), 2) + \
            torch.norm(module.running_mean.data - (self.dd_mean + mean - mean.detach()), 2)


class RefConvFeatureHook:  # U:203-234 (drop_rate 0: S:312 default, not set by recover.sh)
    def __init__(self, module, running, training_momentum=0.4):
        self.hook = module.register_forward_hook(self.post_hook_fn)
        self.dd_var = self.dd_mean = self.patch_var = self.patch_mean = 0.
        self.momentum = training_momentum
        self.running_dd_var, self.running_dd_mean = running["var"], running["mean"]
        self.running_patch_var, self.running_patch_mean = running["patch_var"], running["patch_mean"]

    def post_hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        input_0 = input[0]
        dd_mean = input_0.mean([0, 2, 3])
        dd_var = (input_0.permute(1, 0, 2, 3).contiguous().reshape([nch, -1])).var(1, unbiased=False)
        new_input_0 = ref_patches(input_0)
        patch_mean = new_input_0.mean([1])
        patch_var = new_input_0.var([1], unbiased=False)
        with torch.no_grad():
            m = self.momentum
            self.dd_var = m * self.dd_var + (1 - m) * dd_var
            self.dd_mean = m * self.dd_mean + (1 - m) * dd_mean
            self.patch_var = m * self.patch_var + (1 - m) * patch_var
            self.patch_mean = m * self.patch_mean + (1 - m) * patch_mean
        self.r_feature = torch.norm(self.running_dd_var - (self.dd_var + dd_var - dd_var.detach()), 2) + \
            torch.norm(self.running_dd_mean - (self.dd_mean + dd_mean - dd_mean.detach()), 2) + \
            torch.norm(self.running_patch_mean - (self.patch_mean + patch_mean - patch_mean.detach()), 2) + \
            torch.norm(self.running_patch_var - (self.patch_var + patch_var - patch_var.detach()), 2)


def ref_densification(inputs_jit, targets, tau=4.0):  # S:164-184 (one process: no gather)
    re_inputs_jit = nn.AdaptiveAvgPool2d((32, 32))(inputs_jit).reshape(inputs_jit.shape[0], -1)
    loss = 0.
    for i in set(targets.tolist()):
        sub = re_inputs_jit[targets == i]
        sub = sub @ sub.t()
        lam = torch.linalg.eigvals(sub).real.float()
        stu = lam.log_softmax(dim=-1)
        tea = (lam / tau).softmax(dim=-1)
        loss += nn.KLDivLoss(reduction="sum")(stu, tea.detach())
    return loss


# ----------------------------------------------------------------------------- tests
def test_round_robin_counter_carries_across_batches():
    """S:109, 147-148: ``id = counter % len(model_teacher); counter += 1`` over every iteration of every batch;
    prismdd's pick is a function of (b, it), so any batch order (resume, shards) gives the reference's picks."""
    pool = ["convnet", "resnet18", "mobilenet_v2"]
    iterations, n_batches = 5, 4  # 5 % 3 != 0: the counter's carry-over shows
    cfg = recover_config("gvbsm", dataset="digits", iterations=iterations)
    counter, expected = 0, {}
    for zz in range(n_batches):
        for iteration in range(iterations):
            expected[zz, iteration] = pool[counter % len(pool)]
            counter += 1
    plugin = GVBSM(cfg, None, None, {}, pool, torch.device("cpu"))
    for b in (2, 0, 3, 1):  # out of order: a resumed or sharded run
        for it in range(iterations):
            ce, bn_set = plugin.pick_teachers(b, it, "convnet", pool)
            assert (ce, bn_set) == (expected[b, it], [expected[b, it]])
    assert [expected[1, it] for it in range(iterations)] == ["mobilenet_v2", "convnet", "resnet18", "mobilenet_v2",
                                                             "convnet"]


def _tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("momentum", [0.4, 0.0])
def test_ema_straight_through_value_and_gradient(momentum):
    """U:101-124 and U:203-234, three consecutive iterations: the summed layer terms (first x10, S:154) and their
    gradient w.r.t. the input equal the reference hooks' (conv inputs 20x20 and 1x1: resized to 32 and 16 px)."""
    net = _tiny_net()
    gen = torch.Generator().manual_seed(1)
    layers = hooked_layers(net)
    assert [type(m).__name__ for _, m, _ in layers][:2] == ["Conv2d", "BatchNorm2d"]
    shapes = {}
    probes = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, i[0].shape)) for n, m, _ in layers]
    net(torch.zeros(2, 3, 20, 20))
    for h in probes:
        h.remove()
    assert [shapes[n][-1] for n, _, conv in layers if conv] == [20, 20, 1]  # resized to 32 (2 x 2 cells), 32, 16
    running = {}
    for name, m, conv in layers:
        if conv:
            cells = ref_patches(torch.zeros(shapes[name])).shape[0]
            running[name] = {"var": torch.rand(m.in_channels, generator=gen), "mean": torch.randn(m.in_channels, generator=gen),
                             "patch_var": torch.rand(cells, generator=gen), "patch_mean": torch.randn(cells, generator=gen)}
    assert running["0"]["patch_mean"].shape == (4,)
    ref = [RefConvFeatureHook(m, running[n], momentum) if conv else RefBNFeatureHook(m, momentum) for n, m, conv in layers]
    ours = [StatHook(m, conv, running.get(n), momentum) for n, m, conv in layers]
    weights = [10.0] + [1.0] * (len(layers) - 1)
    try:
        for step in range(3):
            x = (torch.randn(6, 3, 20, 20, generator=gen) * (1 + step)).requires_grad_(True)
            net(x)
            r_ref = sum(w * h.r_feature for w, h in zip(weights, ref))
            r_ours = sum(w * h.take() for w, h in zip(weights, ours))
            g_ref, = torch.autograd.grad(r_ref, x, retain_graph=True)
            g_ours, = torch.autograd.grad(r_ours, x)
            torch.testing.assert_close(r_ours, r_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    finally:
        for h in ref:
            h.hook.remove()
        for h in ours:
            h.remove()


def test_densification_loss_matches_the_reference():
    """S:164-184: per class, eigenvalues of the Gram matrix of 32x32-pooled views, KL(softmax(l/4) || softmax(l)),
    summed; value and gradient (the reference's eigvals vs prismdd's eigvalsh of the symmetric matrix)."""
    gen = torch.Generator().manual_seed(0)
    x = (0.05 * torch.randn(7, 3, 8, 8, generator=gen)).requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # classes of 3, 2, 1, 1 images
    ref = ref_densification(x, y)
    ours = densification_loss(x, y, 4.0, 32)
    assert float(ref.detach()) > 1e-3  # a non-trivial value: the test can fail
    g_ref, = torch.autograd.grad(ref, x)
    g_ours, = torch.autograd.grad(ours, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("side", [2, 5, 8, 9, 28])
def test_patch_statistics_match_the_resized_grid(side):
    """U:193-197 literally (resize, 16x16 cells) against prismdd's closed form (<= 8 px) and resizing path: values
    and gradients."""
    gen = torch.Generator().manual_seed(side)
    x = (2 * torch.rand(5, 3, side, side + 1, generator=gen)).requires_grad_(True)
    p = ref_patches(x)
    ref_var, ref_mean = p.var([1], unbiased=False), p.mean([1])
    var, mean = patch_var_mean(x)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    w = torch.arange(1.0, len(var) + 1)
    g_ref, = torch.autograd.grad((w * ref_var).sum() + ref_mean.sum(), x)
    g_ours, = torch.autograd.grad((w * var).sum() + mean.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_preset_carries_the_reference_hyper_parameters():
    """recover.sh (--batch-size 80 --lr 0.1 --iteration 4000 --l2-scale 0 --tv-l2 0 --r-loss 0.01 --nuc-norm 1.)
    and the argparse defaults it leaves (S:303-321: jitter 32, first multiplier 10, momentum 0.4, tau 4)."""
    cfg = recover_config("gvbsm", dataset="digits")
    assert (cfg.plugin, cfg.batch_size, cfg.lr, cfg.iterations, cfg.l2, cfg.tv_l2) == ("gvbsm", 80, 0.1, 4000, 0.0, 0.0)
    assert (cfg.gvbsm_r_loss, cfg.gvbsm_dd_weight, cfg.gvbsm_momentum, cfg.gvbsm_tau, cfg.first_bn_multiplier) == (
        0.01, 1.0, 0.4, 4.0, 10.0)
    assert (cfg.init, cfg.pack, cfg.crop_per, cfg.crop_scale, cfg.jitter_mode, tuple(cfg.betas), cfg.alpha_bn) == (
        "noise", "class", "batch", (0.08, 1.0), "reference", (0.5, 0.9), 0.0)
    assert scale_jitter(224) == 32 and cfg.jitter is None


def _teachers_copy(zoo, tmp_path, archs):
    """The zoo's teachers without any statistics file that another test (on the same xdist worker) left in the
    shared zoo, so each test starts from teachers that hold none."""
    dst = tmp_path / "teachers"
    for a in archs:
        shutil.copytree(zoo / a, dst / a, ignore=shutil.ignore_patterns(LAYER_STATS_FILE))
    return dst


def _plugin(cfg):
    train, _, info = load_splits(cfg)
    _, teachers, pool = load_teachers(cfg, info, torch.device("cpu"))
    return GVBSM(cfg, info, train, teachers, pool, torch.device("cpu")), train, info


def test_real_statistics_stored_reused_and_recomputed(zoo, tmp_path):
    """S:68-95 + U:186-201: per-batch conv-input statistics (batches of 256 of shuffled RandomResizedCrop+flip
    views) summed with weight bs / N; stored beside the teacher; reused while the teacher's weights digest and the
    settings match, recomputed when the teacher is retrained in place."""
    teachers = _teachers_copy(zoo, tmp_path, ["convnet"])
    cfg = recover_config("gvbsm", dataset="digits", teachers=str(teachers), primary="convnet", bn_pool="convnet",
                         device="cpu", gvbsm_stats_images=300, iterations=2)
    plugin, train, info = _plugin(cfg)
    prov = plugin.prepare(tmp_path / "out")
    assert prov["stats"]["convnet"]["computed"]
    path = layer_stats_path(teachers / "convnet")
    header = tensors_metadata(path)
    assert header["teacher_digest"] == file_digest(teachers / "convnet" / WEIGHTS)
    assert json.loads(header["images"]) == 300 and json.loads(header["dataset"]) == "digits"

    # the first conv layer sees the views themselves: the reference's accumulation, literally (300 = 256 + 44)
    first = hooked_layers(plugin.teachers["convnet"].model)[0][0]
    gen = make_generator(STATS_SEED, "gvbsm-stats")
    order = torch.randperm(len(train.targets), generator=gen)[:300]
    acc = {"var": 0., "mean": 0., "patch_var": 0., "patch_mean": 0.}
    for s in range(0, 300, STATS_BATCH):
        idx = order[s: s + STATS_BATCH]
        data = apply_views(normalize(train.get_images(idx), info), sample_views(len(idx), gen, (0.08, 1.0), flip=True))
        bs, nch = data.shape[:2]
        patches = ref_patches(data.double())
        acc["mean"] += data.double().mean([0, 2, 3]) * bs / 300
        acc["var"] += data.double().permute(1, 0, 2, 3).reshape([nch, -1]).var(1, unbiased=False) * bs / 300
        acc["patch_mean"] += patches.mean([1]) * bs / 300
        acc["patch_var"] += patches.var([1], unbiased=False) * bs / 300
    stored = load_tensors(path)
    for k, v in acc.items():
        torch.testing.assert_close(stored[f"{first}.{k}"], v.float(), rtol=1e-4, atol=1e-5)

    # reused: a marked file with the same header is loaded, not recomputed
    marked = dict(stored)
    marked[f"{first}.mean"] = stored[f"{first}.mean"] + 1.0
    save_tensors(marked, path, metadata=header)
    again, _, _ = _plugin(cfg)
    assert not again.prepare(tmp_path / "out")["stats"]["convnet"]["computed"]
    torch.testing.assert_close(again.real["convnet"][first]["mean"], marked[f"{first}.mean"])

    # other settings: recomputed
    other, _, _ = _plugin(recover_config("gvbsm", dataset="digits", teachers=str(teachers), primary="convnet",
                                         bn_pool="convnet", device="cpu", gvbsm_stats_images=200, iterations=2))
    assert other.prepare(tmp_path / "out")["stats"]["convnet"]["computed"]

    # the teacher retrained in place (new weights digest): recomputed, never the old numbers
    save_tensors(marked, path, metadata=header)
    weights = load_tensors(teachers / "convnet" / WEIGHTS)
    key = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 4)
    weights[key] = weights[key] * 1.5
    save_tensors(weights, teachers / "convnet" / WEIGHTS)
    changed, _, _ = _plugin(cfg)
    assert changed.prepare(tmp_path / "out")["stats"]["convnet"]["computed"]
    assert tensors_metadata(path)["teacher_digest"] == file_digest(teachers / "convnet" / WEIGHTS) != header["teacher_digest"]
    assert not torch.equal(load_tensors(path)[f"{first}.mean"], marked[f"{first}.mean"])


def test_tiny_gvbsm_recover_end_to_end_and_resume(zoo, tmp_path):
    """recover_config("gvbsm"): round-robin picks per batch as the reference's counter, both G-VBSM terms in the
    loss, stats stored then reused, and a resumed batch identical to the uninterrupted run's."""
    teachers = _teachers_copy(zoo, tmp_path, ["convnet", "resnet18", "mobilenet_v2"])
    out = tmp_path / "out"
    settings = dict(dataset="digits", ipc=2, iterations=4, batch_size=8, device="cpu", seed=0, teachers=str(teachers),
                    out=str(out), bn_pool="convnet,resnet18,mobilenet_v2", gvbsm_stats_images=256)
    recover(recover_config("gvbsm", **settings))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["plugin"]["name"] == "gvbsm"
    assert all(v["computed"] for v in manifest["inputs"]["plugin"]["stats"].values())
    pool = ["convnet", "resnet18", "mobilenet_v2"]
    records = manifest["outputs"]["batches"]
    assert len(records) == 3  # 20 units, class-major batches of 8
    counter = 0
    for r in records:
        picks = {}
        for _ in range(4):
            picks[pool[counter % 3]] = picks.get(pool[counter % 3], 0) + 1
            counter += 1
        assert r["gvbsm"]["teacher_counts"] == picks
        assert r["units"][:2] == [[r["units"][0][0], 0], [r["units"][0][0], 1]]  # class-major
        assert r["final_losses"]["gvbsm_stats"] > 0 and "gvbsm_dd" in r["final_losses"]
        assert r["final_losses"]["bn_mean"] == 0.0  # the engine's own BN term is off

    before = {p.name: p.read_bytes() for p in (out / "images").rglob("*.png")}
    redo = records[1]["units"]
    record_path(out, 1).unlink()
    for c, k in redo:
        image_path(out, c, k).unlink()
    recover(recover_config("gvbsm", **settings))
    manifest = json.loads((out / "manifest.json").read_text())
    assert not any(v["computed"] for v in manifest["inputs"]["plugin"]["stats"].values())  # stored stats reused
    after = {p.name: p.read_bytes() for p in (out / "images").rglob("*.png")}
    assert after == before


def test_read_only_teacher_folder_computes_without_storing(zoo, tmp_path, monkeypatch, capsys):
    """A shared zoo the user cannot write to: the statistics are used for this run and not stored (the check
    monkeypatches the write, since CI runs as root, which no file mode stops)."""
    import prismdd.methods.stats as S  # the shared store of G-VBSM's and EDC's statistics

    teachers = _teachers_copy(zoo, tmp_path, ["convnet"])
    cfg = recover_config("gvbsm", dataset="digits", teachers=str(teachers), primary="convnet", bn_pool="convnet",
                         device="cpu", gvbsm_stats_images=64, iterations=2)

    def refuse(folder, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(S, "save_layer_stats", refuse)
    plugin, _, _ = _plugin(cfg)
    assert plugin.prepare(tmp_path / "out")["stats"]["convnet"]["computed"] and plugin.real["convnet"]
    assert "read-only" in capsys.readouterr().out and not layer_stats_path(teachers / "convnet").exists()
