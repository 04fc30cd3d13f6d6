"""Fidelity to the reference code (FIDELITY.md): each test re-states the reference's formula or loop literally,
in the reference's own terms, and compares prismdd's implementation with it on fixed inputs.

References: github.com/Brian-Moser/prism @ a691b41 (PRISM), github.com/VILA-Lab/SRe2L @ 8d00cba (SRe2L, CDA).
"""
from __future__ import annotations

import math
import random
from itertools import product

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prismdd.stages.validate as V
from prismdd.core.augment import Views, apply_views, jitter, sample_views
from prismdd.core.bn import bn_hooks
from prismdd.core.io import read_json
from prismdd.core.training import combine_logits, lr_factor
from prismdd.methods.engine import crop_low
from prismdd.stages.recover import batch_teacher_sets, draw_teacher_sets, plan_batches, recover_config
from prismdd.stages.validate import student_loss, validate, validate_config

PAPER_RECOVER = ("prism", "prism-pre", "sre2l", "cda")


# ----------------------------------------------------------------------------- recovery augmentation
@pytest.mark.parametrize("method", PAPER_RECOVER)
def test_paper_presets_use_the_reference_recovery_protocol(method):
    cfg = recover_config(method)
    assert (cfg.crop_per, cfg.jitter_mode, cfg.pack) == ("batch", "reference", "ipc")
    assert cfg.iterations == 4000 and cfg.batch_size == 100  # recover_r18.sh / recover.sh / CDA README


def test_one_crop_and_one_flip_per_batch():
    # data_synthesis.py:92-96: RandomResizedCrop(224) and RandomHorizontalFlip() applied to the 4-D tensor:
    # torchvision draws get_params ONCE and one flip coin for the whole batch
    for seed in range(20):
        v = sample_views(7, torch.Generator().manual_seed(seed), (0.08, 1.0), per="batch")
        assert all(torch.equal(v.boxes[i], v.boxes[0]) for i in range(7))
        assert len(set(v.flips.tolist())) == 1
    flipped = [bool(sample_views(3, torch.Generator().manual_seed(s), per="batch").flips[0]) for s in range(40)]
    assert any(flipped) and not all(flipped)
    # the batch view equals cropping every image with that one box (what a 4-D crop does)
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    v = sample_views(5, torch.Generator().manual_seed(3), (0.08, 1.0), per="batch")
    out = apply_views(x, v)
    for i in range(5):
        one = apply_views(x[i:i + 1], Views(v.boxes[:1], v.flips[:1]))
        torch.testing.assert_close(out[i:i + 1], one)
    # prismdd's option: independent crops
    v = sample_views(7, torch.Generator().manual_seed(0), (0.08, 1.0), per="image")
    assert len({tuple(b.tolist()) for b in v.boxes}) == 7


def test_engine_draws_one_view_per_batch(recover_run, tmp_path, monkeypatch):
    import prismdd.methods.engine as R

    seen = []
    real = R.apply_views
    monkeypatch.setattr(R, "apply_views", lambda x, views: seen.append(views) or real(x, views))
    recover_run(tmp_path / "p", "prism", iterations=2, ipc=1)
    assert seen and all(torch.equal(v.boxes, v.boxes[:1].expand_as(v.boxes)) for v in seen)
    assert all(len(set(v.flips.tolist())) == 1 for v in seen)


def test_jitter_is_randint_zero_to_limit():
    # data_synthesis.py:99-101: off1 = random.randint(0, lim_0); off2 = random.randint(0, lim_1);
    # torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3)); random.randint includes both ends
    lim = 2
    random.seed(0)
    reference = {(random.randint(0, lim), random.randint(0, lim)) for _ in range(500)}
    assert reference == set(product(range(lim + 1), repeat=2))
    x = torch.arange(2 * 1 * 7 * 7, dtype=torch.float).view(2, 1, 7, 7)
    got = set()
    for s in range(300):
        y = jitter(x, lim, torch.Generator().manual_seed(s), "reference")
        match = [o for o in product(range(-lim, lim + 1), repeat=2) if torch.equal(y, torch.roll(x, o, (2, 3)))]
        assert len(match) == 1
        got.add(match[0])
    assert got == reference
    sym = set()
    for s in range(300):
        y = jitter(x, lim, torch.Generator().manual_seed(s), "symmetric")
        sym |= {o for o in product(range(-lim, lim + 1), repeat=2) if torch.equal(y, torch.roll(x, o, (2, 3)))}
    assert sym == set(product(range(-lim, lim + 1), repeat=2))


def test_cda_crop_floor_schedule():
    # recover_cda_in1k.py:56-66, milestone 1, cosine: min_crop = 0.08 + (1.0 - 0.08) * (1 + cos(pi * it / iters)) / 2
    cfg = recover_config("cda")
    iters = 40
    for it in (0, 1, 10, 20, 39):
        ref = 0.08 + (1.0 - 0.08) * (1 + math.cos(math.pi * it / (1 * iters))) / 2
        assert crop_low(cfg, it / iters) == pytest.approx(ref)


# ----------------------------------------------------------------------------- intra-distillation draws
def _reference_plan(num_classes, ipc, batch_size):
    """data_synthesis.py:398-399 + 56-61: for ipc_id: for start in range(0, classes, batch_size): chunk."""
    out = []
    for ipc_id in range(ipc):
        all_classes = list(range(num_classes))
        for start in range(0, len(all_classes), batch_size):
            out.append([(c, ipc_id) for c in all_classes[start:start + batch_size]])
    return out


def test_batches_stay_within_one_ipc_index():
    for c, k, b in ((25, 4, 10), (10, 2, 8), (1000, 3, 100), (7, 3, 100)):
        assert plan_batches(c, k, b, "ipc") == _reference_plan(c, k, b)


def test_one_bn_set_per_ipc_index_shared_by_its_batches():
    # data_synthesis.py:277-394: main_syn(ipc_id) draws the teacher set once, then get_images runs every class
    # chunk of that ipc_id with it
    pool = ["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5"]
    cfg = recover_config("prism", ipc=6, seed=3)
    batches = plan_batches(25, 6, 10, "ipc")
    sets = batch_teacher_sets(cfg, "resnet18", pool, batches)
    per_ipc = draw_teacher_sets(cfg, "resnet18", pool, 6)
    for units, s in zip(batches, sets):
        assert s == per_ipc[units[0][1]]
    assert len({tuple(s) for s in per_ipc}) > 1  # different IPC indices do draw again
    cross = batch_teacher_sets(recover_config("prism", ipc=6, seed=3, pack="cross"), "resnet18", pool,
                               plan_batches(25, 6, 10, "cross"))
    assert len(cross) == 15


def test_recorded_sets_shared_within_ipc_index(recover_run, tmp_path):
    out = recover_run(tmp_path / "p", "prism", iterations=1, ipc=3, batch_size=4)  # 3 batches per IPC index
    recs = [read_json(p) for p in sorted((out / "records").glob("batch_*.json"))]
    assert len(recs) == 9
    by_k = {}
    for r in recs:
        ks = {k for _, k in r["units"]}
        assert len(ks) == 1
        by_k.setdefault(ks.pop(), set()).add(tuple(r["bn_set"]))
    assert all(len(v) == 1 for v in by_k.values())


# ----------------------------------------------------------------------------- BN statistics under autocast
def test_bn_statistics_in_fp32_under_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    captured = []
    net[1].register_forward_pre_hook(lambda m, inp: captured.append(inp[0].detach()))
    x = torch.randn(6, 3, 9, 9)
    with bn_hooks(net, first_bn_multiplier=1.0) as col, torch.autocast("cpu", torch.bfloat16):
        net(x)
    term = col.terms[0]
    inp = captured[0]
    assert inp.dtype == torch.bfloat16  # autocast really fed the BN layer half precision
    assert term.dtype == torch.float32
    # recover/utils.py:96-100 (BNFeatureHook), in fp32 as the reference runs
    i = inp.float()
    nch = i.shape[1]
    mean = i.mean([0, 2, 3])
    var = i.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
    ref = torch.norm(net[1].running_var - var, 2) + torch.norm(net[1].running_mean - mean, 2)
    torch.testing.assert_close(term, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- student training
def _reference_lambda(step, epochs):
    """validate/train_FKD_parallel.py:287-291 (--cos)."""
    return 0.5 * (1. + math.cos(math.pi * step / (2.5 * epochs))) if step <= (epochs * 5 / 6) else 0.5 * (
        1. + math.cos(math.pi * 5 / (6 * 2.5))) * (6 * epochs - 6 * step) / (6 * epochs)


@pytest.mark.parametrize("epochs", [300, 12, 60])
def test_decayed_cosine_matches_train_fkd_parallel(epochs):
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _reference_lambda(s, epochs))
    for e in range(epochs):
        assert lr_factor("decayed_cosine", e / epochs) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    # the drop: 0.75 at the knee, 0.125 just after (no continuous ramp), then linear to 0
    assert lr_factor("decayed_cosine", 5 / 6) == pytest.approx(0.75)
    assert lr_factor("decayed_cosine", 5 / 6 + 1e-9) == pytest.approx(0.125, abs=1e-6)


def test_mse_gt_uses_the_unmixed_hard_label():
    g = torch.Generator().manual_seed(0)
    out, soft = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    y2 = y[torch.tensor([3, 4, 5, 0, 1, 2])]
    lam = 0.3
    # train_FKD_parallel.py:366 (images mixed, target untouched) and :403 (mse_gt)
    ref = F.mse_loss(out, soft) + F.cross_entropy(out, y) * 0.1
    cfg = validate_config("prism", random_real=True, teachers="t")
    assert cfg.mix_ce == "own" and cfg.gamma == 0.1
    torch.testing.assert_close(student_loss(cfg, out, soft, y, y2, lam)["total"], ref)
    mixed = validate_config("prism", random_real=True, teachers="t", mix_ce="mixed")
    want = F.mse_loss(out, soft) + 0.1 * (lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y2))
    torch.testing.assert_close(student_loss(mixed, out, soft, y, y2, lam)["total"], want)


def test_sre2l_protocol_and_kl():
    # SRe2L/validate/train_FKD.sh: --batch-size 1024 --cos -T 20 --mix-type cutmix; train_FKD.py:112 scale (0.08, 1),
    # :163 cosine 0.5 (1 + cos(pi step / epochs)); :248-250 KL batchmean without T^2
    cfg = validate_config("sre2l", random_real=True, teachers="t")
    assert (cfg.batch_size, cfg.temperature, cfg.min_scale, cfg.schedule, cfg.loss, cfg.mix, cfg.epochs) == \
        (1024, 20.0, 0.08, "cosine", "kl", "cutmix", 300)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", 0.001, 0.01)
    for e in (0, 1, 150, 299):
        assert lr_factor("cosine", e / 300) == pytest.approx(0.5 * (1. + math.cos(math.pi * e / 300)))
    g = torch.Generator().manual_seed(1)
    out, soft = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ref = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(out / 20, dim=1), F.softmax(soft / 20, dim=1))
    y = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(student_loss(cfg, out, soft, y, y, 1.0)["total"], ref)
    sre2l = recover_config("sre2l")
    assert (sre2l.lr, sre2l.alpha_bn, sre2l.init, sre2l.selection) == (0.25, 0.01, "noise", "single")


def test_norm_matched_ensemble_uses_each_teachers_batch_norm():
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(5, 4, generator=g) * s for s in (1.0, 10.0, 3.0)]
    # relabel/generate_soft_label_r18.py:261-264, written out with plain Python sums
    fro = [math.sqrt(sum(float(v) ** 2 for v in t.flatten())) for t in logits]
    target = sum(fro) / len(fro)
    want = torch.zeros(5, 4)
    for t, n in zip(logits, fro):
        want += t / n * target
    want /= len(logits)
    torch.testing.assert_close(combine_logits(logits, "norm-matched"), want)
    # per-sample norms (prismdd's option) give something else on these logits
    assert not torch.allclose(combine_logits(logits, "norm-matched-sample"), want)


def test_every_random_stream_follows_the_student_seed(monkeypatch, tmp_path):
    calls = []
    real = V.epoch_plan
    monkeypatch.setattr(V, "epoch_plan", lambda n, epoch, seed, vc, res: calls.append(seed) or real(n, epoch, seed, vc, res))
    inits = []
    real_create = V.create_model
    monkeypatch.setattr(V, "create_model", lambda *a, **k: inits.append(torch.initial_seed()) or real_create(*a, **k))
    validate(validate_config("appendix-c", dataset="digits", device="cpu", random_real=True, ipc=1, seeds="3,5",
                             epochs=1, batch_size=10, student_width=0.25, out=str(tmp_path / "v")))
    # the first network is check_students' probe (built under a forked RNG before any output is written), then one
    # student per seed, each initialised from its own seed
    assert sorted(set(calls)) == [3, 5] and len(inits) == 3 and inits[1:] == [3, 5]


def test_imagenet_configs_match_the_reference_scripts():
    import yaml
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    rec = yaml.safe_load((root / "imagenet1k-prism-recover.yaml").read_text())
    # recover_r18.sh: --batch-size 100 --lr 0.05 --iteration 4000 --r-bn 0.01; data_synthesis.py:243 jitter 32,
    # :281 small_models (AlexNet left out: no BatchNorm), no autocast anywhere
    assert (rec["batch_size"], rec["lr"], rec["iterations"], rec["alpha_bn"], rec["jitter"]) == (100, 0.05, 4000, 0.01, 32)
    assert rec["bn_pool"].split(",") == ["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5"]
    assert rec["amp"] is False and (rec["crop_per"], rec["jitter_mode"], rec["pack"]) == ("batch", "reference", "ipc")
    val = yaml.safe_load((root / "imagenet1k-validate.yaml").read_text())
    # train_FKD_10_r18.sh: --batch-size 50 --cos --loss-type mse_gt --ce-weight 0.1 --mix-type cutmix
    assert (val["batch_size"], val["schedule"], val["loss"], val["gamma"], val["mix"], val["mix_ce"]) == \
        (50, "decayed_cosine", "mse+ce", 0.1, "cutmix", "own")


# ----------------------------------------------------------------------------- DELT (github.com/VILA-Lab/DELT @ f2f81ca)
def _delt_budget(ipc, iteration, round_iterations, img_indx):
    """recover/recover.py:41-51 (get_round_imgs_indx) and :98-104: the rounds an image takes part in."""
    import numpy as np

    class_rounds = iteration // round_iterations
    round_imgs_indx = np.ones(class_rounds, dtype=int) * int(ipc // class_rounds)
    round_imgs_indx[:ipc % class_rounds] += 1
    round_imgs_indx = np.cumsum(round_imgs_indx)
    start_round = (img_indx < round_imgs_indx).nonzero()[0][0]
    return (len(round_imgs_indx) - start_round) * round_iterations


@pytest.mark.parametrize("ipc", [2, 10, 13, 50])
def test_delt_budgets_per_ipc_index(ipc):
    cfg = recover_config("delt", ipc=ipc)
    assert (cfg.iterations, cfg.early_late_step, cfg.lr, cfg.jitter, cfg.budget) == (4000, 0.125, 0.25, 0, "rounds")
    from prismdd.methods.engine import image_budget

    assert [image_budget(cfg, k) for k in range(ipc)] == [_delt_budget(ipc, 4000, 500, k) for k in range(ipc)]


def test_delt_medium_selection():
    from prismdd.methods.starts import delt_medium

    g = torch.Generator().manual_seed(0)
    prob = torch.rand(37, generator=g).numpy()
    # data_selection.py:247-262 (store_medium): sort by score ascending, mid = ceil(n/2), alternate around it
    ranked = sorted(range(len(prob)), key=lambda i: prob[i])
    mid_indx = math.ceil(len(ranked) / 2)
    pos_neg, want = -1, []
    for indx in range(9):
        img_indx = mid_indx + int(pos_neg * (indx + 1) / 2)
        pos_neg = pos_neg * -1
        want.append(ranked[img_indx])
    assert delt_medium(prob, 9).tolist() == want


def test_delt_batches_are_class_major():
    # recover.py:260-269: ImageFolder(ipc, shuffle=False) lists class by class; DataLoader(batch_size, shuffle=False)
    units = [(c, i) for c in range(25) for i in range(6)]
    want = [units[s:s + 100] for s in range(0, len(units), 100)]
    assert plan_batches(25, 6, 100, "class") == want


def test_delt_adam_is_one_torch_adam_over_the_batch():
    # recover.py:92-93, 111-112, 166-168: torch.optim.Adam([inputs]) + lr_cosine_policy(lr, 0, iterations) per
    # iteration; images outside the current round get no gradient
    from types import SimpleNamespace
    from prismdd.methods.engine import Engine

    torch.manual_seed(0)
    n_iter, lr = 12, 0.25
    start = torch.tensor([0, 0, 4, 8])
    ref = torch.randn(4, 2, 3, 3)
    ours = ref.clone()
    opt = torch.optim.Adam([ref.requires_grad_(True)], lr=lr, betas=[0.5, 0.9], eps=1e-8)
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    fake = SimpleNamespace(cfg=SimpleNamespace(lr=lr))
    for it in range(n_iter):
        g = torch.randn(4, 2, 3, 3) * (start <= it).float().view(-1, 1, 1, 1)
        for group in opt.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * it / n_iter)) * lr
        opt.zero_grad()
        ref.grad = g.clone()
        opt.step()
        Engine._adam_step_global(fake, ours, g, m, v, it, n_iter, 0.5, 0.9)
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)


def test_delt_forwards_only_the_joined_images(recover_run, tmp_path, monkeypatch):
    import prismdd.methods.engine as R

    sizes = []
    real = R.apply_views
    monkeypatch.setattr(R, "apply_views", lambda x, views: sizes.append(len(x)) or real(x, views))
    out = recover_run(tmp_path / "d", "delt", iterations=8, ipc=2, batch_size=10)  # batches of 5 classes x 2
    # IPC index 1 joins in round 1 (recover.py:136: inputs[slicing_list[round_indx]])
    assert sizes[:8] == [5] + [10] * 7
    recs = [read_json(p) for p in sorted((out / "records").glob("batch_*.json"))]
    assert [sorted({c for c, _ in r["units"]}) for r in recs] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_fit_steps_the_lr_once_per_epoch_like_the_reference_lambdalr(tmp_path):
    """lr_every='epoch' (the prism and sre2l protocols): every step of epoch e uses the LambdaLR value of e."""
    from prismdd.core.training import fit

    epochs, steps = 12, 3
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def loss_fn(batch):
        seen.append(opt.param_groups[0]["lr"])
        return {"total": model(batch).sum() * 0}

    fit(model, opt, lambda e: (torch.ones(1, 2) for _ in range(steps)), loss_fn, epochs=epochs,
        steps_per_epoch=steps, lr=0.1, schedule="decayed_cosine", lr_every="epoch",
        evaluate_fn=lambda: {"top1": 0.0, "top5": 0.0}, eval_every=epochs, checkpoint=tmp_path / "ck.pt",
        config_hash="x", resume=None, log=None, desc="t")
    want = [0.1 * _reference_lambda(e, epochs) for e in range(epochs) for _ in range(steps)]
    assert seen == pytest.approx(want, abs=1e-12)
    assert validate_config("prism", random_real=True, teachers="t").lr_every == "epoch"
    assert validate_config("sre2l", random_real=True, teachers="t").lr_every == "epoch"


# ----------------------------------------------------------------------------- ImageNet preprocessing
@pytest.mark.parametrize("eval_crop, expect_crop", [("auto", True), ("imagenet", True), ("none", False)])
def test_real_starts_at_224_get_resize_256_centre_crop_224(eval_crop, expect_crop):
    """PRISM recover/data_synthesis.py:379-383 (and validate/train_FKD_parallel.py:214-221 for the test split):
    transforms.Resize(256) then transforms.CenterCrop(224). Re-stated with torchvision on the 224-px decode."""
    import torchvision.transforms as T

    from prismdd.core.data import DatasetInfo, TensorImages, normalize
    from prismdd.methods.starts import initial_images

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 224, 224), generator=g, dtype=torch.uint8)
    train = TensorImages(images, torch.zeros(4, dtype=torch.long))
    info = DatasetInfo("toy", ["a"], 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "-")
    cfg = recover_config("prism", dataset="digits", eval_crop=eval_crop)
    got = initial_images(cfg, 0, [(0, 0), (0, 1)], train, info, [[2], [3]])
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])
    want = torch.stack([reference(images[i].float()).round().clamp(0, 255) for i in (2, 3)])
    want = normalize(want, info) if expect_crop else normalize(images[[2, 3]], info)
    # bilinear + antialias both ways; uint8 rounding in prismdd's cache costs at most one grey level
    assert (got - want).abs().max() <= 1.01 / 255 / 0.224
