"""FRePo plug-in (methods/frepo.py): its pieces against direct re-statements (kernel ridge regression with an
explicit inverse, the label margin, optax.lamb, the cosine), the online step's torch.func gradient against plain
autograd, and end to end on digits without any teacher: determinism, kill -9 resume, refused resumes, and
validate --loss mse with the learned labels."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import png_files
from prismdd.artifacts import centred_onehot
from prismdd.core.augment import ViewConfig, epoch_plan, mix_partners
from prismdd.core.data import load_splits
from prismdd.core.errors import PrismError
from prismdd.core.io import load_tensors, read_json, tensors_metadata
from prismdd.methods import label_source
from prismdd.methods.frepo import (LEARNED, LEARNED_LABELS, STATE_FILE, FRePo, cosine_to, half_sse, krr_predict,
                                   label_margin, lamb_update)
from prismdd.stages.recover import recover, recover_config
from prismdd.stages.validate import _mix_vectors, validate, validate_config


def has_learned_labels(folder) -> bool:
    """What validate asks: the label-source registry finds FRePo's learned labels in ``folder``."""
    return label_source(folder) is LEARNED


# the tiny FRePo run of these tests: 20 images, a pool of 3 width-0.25 ConvNets, 32 real images per step
TINY = dict(dataset="digits", ipc=2, iterations=6, frepo_real_batch=32, frepo_width=0.25, frepo_pool=3,
            frepo_online_steps=4, device="cpu", seed=0)


def tiny_run(out, **overrides) -> Path:
    return recover(recover_config("frepo", **dict(TINY, out=str(out), **overrides)))


def image_bytes(folder) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in png_files(folder).items()}


@pytest.fixture(scope="module")
def frepo_run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("frepo_ref"))


# ----------------------------------------------------------------------------- the pieces
def test_krr_predict_matches_explicit_inverse():
    # the closed form K_TS (K_SS + lambda I)^-1 Y_S with lambda = reg * trace(K_SS) / |S|, in float64
    g = torch.Generator().manual_seed(0)
    fs, ft, ys = torch.randn(12, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(12, 4, generator=g)
    reg = 0.1
    fs64, ft64, ys64 = fs.double().numpy(), ft.double().numpy(), ys.double().numpy()
    kss = fs64 @ fs64.T
    lam = reg * np.trace(kss) / len(fs64)
    want = ft64 @ fs64.T @ np.linalg.inv(kss + lam * np.eye(len(fs64))) @ ys64
    got = krr_predict(fs, ft, ys, reg)
    assert got.shape == (5, 4)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(krr_predict(fs.double(), ft.double(), ys.double(), reg).numpy(), want, rtol=1e-10)
    # the ridge matters at this reg: without it the answer differs
    no_ridge = ft64 @ fs64.T @ np.linalg.pinv(kss) @ ys64
    assert np.abs(no_ridge - want).max() > 1e-2
    # lambda scales with the features: the prediction is invariant to scaling fs and ft together (up to 1/a^0)
    np.testing.assert_allclose(krr_predict(3 * fs.double(), 3 * ft.double(), ys.double(), reg).numpy(), want,
                               rtol=1e-9)
    # half_sse: half the squared error summed over classes, mean over examples
    t = torch.randn(5, 4, generator=g)
    assert torch.isclose(half_sse(got, t), 0.5 * ((got - t) ** 2).sum() / 5)


def test_label_margin_on_hand_values():
    # C = 4, 1/C = 0.25: row 0 margin 0.6 (clamped to 0.25), row 1 margin 0.1, row 2 a tie (0)
    labels = torch.tensor([[0.9, 0.3, 0.1, -0.2], [0.2, 0.3, 0.1, 0.0], [0.5, -0.1, 0.5, 0.0]])
    want = -(0.25 + 0.1 + 0.0) / 3
    assert torch.isclose(label_margin(labels), torch.tensor(want), atol=1e-7)
    # its gradient pushes only the unclamped rows' top-1 up and top-2 down
    x = labels.clone().requires_grad_(True)
    label_margin(x).backward()
    assert torch.all(x.grad[0] == 0)
    assert torch.isclose(x.grad[1, 1], torch.tensor(-1 / 3)) and torch.isclose(x.grad[1, 0], torch.tensor(1 / 3))


def ref_lamb(p, grads, lr, b1=0.9, b2=0.999, eps=1e-6):
    """optax.lamb(weight_decay=0): scale_by_adam (eps outside the sqrt, eps_root 0), scale_by_trust_ratio
    (||p|| / ||u||, 1 where either norm is 0), scale by -lr; float64, plain Python loop."""
    p = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
        pn, un = float(torch.sqrt((p * p).sum())), float(torch.sqrt((u * u).sum()))
        ratio = pn / un if pn > 0 and un > 0 else 1.0
        p = p - lr * ratio * u
    return p


@pytest.mark.parametrize("zero_start", [False, True])
def test_lamb_update_matches_optax_lamb(zero_start):
    # two steps, trust ratio ||p|| / ||u||; an all-zero tensor (p = 0) takes ratio 1 on its first step
    g = torch.Generator().manual_seed(1)
    p0 = torch.zeros(3, 5) if zero_start else torch.randn(3, 5, generator=g)
    # gradients of the size of eps: eps outside the sqrt (not inside) matters here
    grads = [torch.randn(3, 5, generator=g) * 1e-6, torch.randn(3, 5, generator=g) * 3e-6]
    lr = 0.05
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, gr in enumerate(grads, start=1):
        lamb_update(p, gr, m, v, t, lr)
    want = ref_lamb(p0, grads, lr)
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-7)
    if zero_start:  # ratio 1 at p = 0: a unit-size gradient moves every entry by ~lr (|u| ~ 1 at t = 1)
        one = p0.clone()
        lamb_update(one, torch.randn(3, 5, generator=g), torch.zeros_like(p0), torch.zeros_like(p0), 1, lr)
        torch.testing.assert_close(one.abs(), torch.full_like(one, lr), rtol=1e-4, atol=1e-6)


def test_centred_onehot_and_cosine():
    # FRePo's label vectors and learning-rate factor
    y = torch.tensor([0, 2])
    c4 = centred_onehot(y, 4)
    assert torch.allclose(c4, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-0.25, -0.25, 0.75, -0.25]]))
    assert torch.allclose(centred_onehot(y, 4, scaled=True), c4 / math.sqrt(0.4))
    assert torch.allclose(centred_onehot(y, 10, scaled=True), centred_onehot(y, 10))  # sqrt(10/10) = 1
    c100 = centred_onehot(torch.tensor([5]), 100, scaled=True)
    assert math.isclose(float(c100[0, 5]), 0.99 / math.sqrt(10), rel_tol=1e-6)
    assert math.isclose(float(c100[0, 0]), -0.01 / math.sqrt(10), rel_tol=1e-6)
    assert torch.allclose(centred_onehot(y, 4).sum(1), torch.zeros(2), atol=1e-6)
    assert cosine_to(0, 100, 0.1) == pytest.approx(1.0)
    assert cosine_to(100, 100, 0.1) == pytest.approx(0.1)
    assert cosine_to(250, 100, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert cosine_to(50, 100, 0.1) == pytest.approx(0.55)


# ----------------------------------------------------------------------------- the online step
def test_online_step_gradient_and_batchnorm(tmp_path):
    # torch.func.grad over the parameter dict must equal plain autograd on a module loaded with that state, and
    # the BN running statistics (passed as buffers) must be updated in place like the module's own
    cfg = recover_config("frepo", **dict(TINY, out=str(tmp_path)))
    train, _, info = load_splits(cfg)
    plugin = FRePo(cfg, info, train, {}, [], torch.device("cpu"))
    plugin.prepare(tmp_path)
    g = torch.Generator().manual_seed(3)
    y = torch.arange(10).repeat_interleave(2)
    x0 = torch.randn(20, info.channels, info.resolution, info.resolution, generator=g)
    st = plugin._new_state(x0, y)
    st["labels"] = st["labels"] + 0.1 * torch.randn(st["labels"].shape, generator=g)  # not plain one-hot
    slot = 0
    assert int(st["ages"][slot]) < cfg.frepo_online_steps  # it trains (not re-initialised) this step
    before = {k: t.clone() for k, t in st["slots"][slot]["state"].items()}
    bn_keys = [k for k in before if k.endswith("running_mean")]
    assert bn_keys, "the pool network must have BatchNorm for this test"

    plain = plugin.net._build()
    plain.load_state_dict(before)
    plain.train()
    bn_inputs = {}
    for name, mod in plain.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.register_forward_pre_hook(lambda m, inp, name=name: bn_inputs.__setitem__(name, inp[0].detach()))
    loss = half_sse(plain(st["images"]), st["labels"])
    names = [n for n, _ in plain.named_parameters()]
    want = dict(zip(names, torch.autograd.grad(loss, [p for _, p in plain.named_parameters()])))
    plain_buffers = dict(plain.named_buffers())

    plugin._online_step(st, slot)
    after, s = st["slots"][slot]["state"], st["slots"][slot]
    assert int(st["slot_steps"][slot]) == 1 and int(st["ages"][slot]) == 1
    assert all(not torch.equal(after[k], before[k]) for k in plugin.net.param_names)
    for k in bn_keys:
        assert not torch.equal(after[k], before[k]), k
        torch.testing.assert_close(after[k], plain_buffers[k])
        torch.testing.assert_close(after[k.replace("running_mean", "running_var")],
                                   plain_buffers[k.replace("running_mean", "running_var")])
        # Flax momentum 0.1 (the reference): the running mean keeps 0.9 of the current batch's mean
        batch_mean = bn_inputs[k[: -len(".running_mean")]].mean(dim=(0, 2, 3))
        torch.testing.assert_close(after[k], 0.1 * before[k] + 0.9 * batch_mean, rtol=1e-4, atol=1e-6)
        nbt = k.replace("running_mean", "num_batches_tracked")
        assert int(after[nbt]) == int(before[nbt]) + 1, nbt
    lr = cfg.frepo_online_lr
    for k in plugin.net.param_names:
        # Adam's first step: m = 0.1 g, v = 0.001 g^2, p -= lr * g / (|g| + eps)
        torch.testing.assert_close(s["m"][k], 0.1 * want[k], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(s["v"][k], 0.001 * want[k] ** 2, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(after[k], before[k] - lr * want[k] / (want[k].abs() + 1e-8), rtol=1e-5,
                                   atol=1e-7)


def test_online_step_reinitialises_past_its_limit(tmp_path):
    # a network older than frepo_online_steps gets fresh weights of its next generation and is not trained
    cfg = recover_config("frepo", **dict(TINY, out=str(tmp_path)))
    train, _, info = load_splits(cfg)
    plugin = FRePo(cfg, info, train, {}, [], torch.device("cpu"))
    plugin.prepare(tmp_path)
    st = plugin._new_state(torch.zeros(20, 1, 8, 8), torch.arange(10).repeat_interleave(2))
    old = {k: t.clone() for k, t in st["slots"][1]["state"].items()}
    st["ages"][1] = cfg.frepo_online_steps
    plugin._online_step(st, 1)
    assert int(st["ages"][1]) == 0 and int(st["generations"][1]) == 1 and int(st["slot_steps"][1]) == 0
    new = st["slots"][1]["state"]
    assert not torch.equal(new[plugin.net.param_names[0]], old[plugin.net.param_names[0]])
    assert all(torch.count_nonzero(t) == 0 for t in st["slots"][1]["m"].values())


# ----------------------------------------------------------------------------- end to end
def test_end_to_end_without_teachers_and_deterministic(frepo_run, tmp_path):
    # FRePo needs no teacher; the set, its learned labels and the whole state are written; same seed, same bytes
    out = frepo_run
    assert len(png_files(out)) == 20
    assert (out / STATE_FILE).exists() and has_learned_labels(out)
    manifest = read_json(out / "manifest.json")
    assert manifest["inputs"]["plugin"]["name"] == "frepo"
    assert manifest["inputs"]["teachers"] == {}
    d = load_tensors(out / LEARNED_LABELS)
    start = centred_onehot(d["class"], 10, scaled=True)
    assert d["labels"].shape == (20, 10) and torch.isfinite(d["labels"]).all()
    assert not torch.allclose(d["labels"], start)  # the labels were learned
    assert d["class"].tolist() == [c for c in range(10) for _ in range(2)]
    assert tensors_metadata(out / STATE_FILE)["step"] == "6"
    again = tiny_run(tmp_path / "again")
    assert image_bytes(again) == image_bytes(out)
    assert torch.equal(load_tensors(again / LEARNED_LABELS)["labels"], d["labels"])


KILL_ARGS = ["recover", "--method", "frepo", "--dataset", "digits", "--ipc", "2", "--iterations", "300",
             "--frepo-checkpoint-every", "10", "--frepo-real-batch", "32", "--frepo-width", "0.25",
             "--device", "cpu"]


def prismdd(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "prismdd", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(tmp_path):
    # the whole state (images, labels, moments, pool networks, BN buffers, ages) must survive a kill -9
    a, b = tmp_path / "A", tmp_path / "B"
    ref = prismdd(KILL_ARGS + ["--out", b])  # the uninterrupted run, alongside
    proc = prismdd(KILL_ARGS + ["--out", a])
    state, step, deadline = a / STATE_FILE, 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                step = int(tensors_metadata(state)["step"])
            except (PrismError, KeyError):
                step = 0
            if step >= 20:
                break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed (step {step}): {err[-2000:]}"
    assert step >= 20
    assert not (a / LEARNED_LABELS).exists() and not (a / "manifest.json").exists()
    killed_at = int(tensors_metadata(state)["step"])
    assert 20 <= killed_at < 300
    again = prismdd(KILL_ARGS + ["--out", a])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming at step {killed_at}" in out + err
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    assert image_bytes(a) == image_bytes(b) and len(image_bytes(a)) == 20
    la, lb = load_tensors(a / LEARNED_LABELS), load_tensors(b / LEARNED_LABELS)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    sa, sb = load_tensors(a / STATE_FILE), load_tensors(b / STATE_FILE)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_with_other_settings_is_refused(tmp_path, cli, capsys):
    # a state made with another frepo_reg must not be continued silently, finished or partial
    out = tiny_run(tmp_path / "run")
    with pytest.raises(PrismError, match="--force"):
        tiny_run(out, frepo_reg=0.5)
    # partial: the state is there, the batch record and manifest are not (a run killed mid-way)
    (out / "records" / "batch_00000.json").unlink()
    (out / "manifest.json").unlink()
    (out / LEARNED_LABELS).unlink()
    with pytest.raises(PrismError, match="--force"):
        tiny_run(out, frepo_reg=0.5)
    capsys.readouterr()
    args = ["recover", "--method", "frepo", *[x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", v)],
            "--frepo-reg", 0.5, "--out", out]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prismdd: error:") and "--force" in err[0]
    # --force starts anew
    tiny_run(out, frepo_reg=0.5, force=True)
    assert tensors_metadata(out / STATE_FILE)["step"] == "6" and has_learned_labels(out)


# ----------------------------------------------------------------------------- validate
def test_validate_with_learned_labels(frepo_run, tmp_path):
    # --protocol frepo trains on the learned labels with the MSE; the protocol names them
    acc = validate(validate_config("frepo", distilled=str(frepo_run), labels=str(frepo_run), epochs=3,
                                   student_width=0.25, device="cpu", out=str(tmp_path / "v")))
    proto = read_json(tmp_path / "v" / "accuracy.json")["protocol"]
    assert proto["soft_labels"] == f"learned:{frepo_run}" and proto["loss"] == "mse"
    assert 0 <= acc["top1"] <= 100


def test_validate_uses_a_distilled_folders_own_learned_labels(frepo_run, tmp_path, capsys):
    # --protocol frepo without --labels on a FRePo folder must not silently fall back to one-hot targets
    validate(validate_config("frepo", distilled=str(frepo_run), epochs=2, student_width=0.25, device="cpu",
                             out=str(tmp_path / "v")))
    assert "learned labels of" in capsys.readouterr().out
    assert read_json(tmp_path / "v" / "accuracy.json")["protocol"]["soft_labels"] == f"learned:{frepo_run}"


def test_warmup_cosine_runs_its_cosine_over_the_rest():
    # FRePo's eval schedule: linear warm-up, then a cosine from 1 to 0.01 over what is left (no jump after warm-up)
    from prismdd.core.training import lr_factor

    assert lr_factor("warmup_cosine", 0.125, 0.25) == pytest.approx(0.5)
    assert lr_factor("warmup_cosine", 0.25, 0.25) == pytest.approx(1.0)
    assert lr_factor("warmup_cosine", 0.625, 0.25) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor("warmup_cosine", 1.0, 0.25) == pytest.approx(0.01)


def test_validate_mse_refuses_folders_without_learned_labels(frepo_run, tmp_path):
    # --loss mse reads learned labels only; a folder of other labels is an error, not a silent one-hot
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(PrismError, match="learned labels"):
        validate(validate_config("frepo", distilled=str(frepo_run), labels=str(plain), epochs=1,
                                 student_width=0.25, device="cpu", out=str(tmp_path / "v1")))


def test_validate_learned_labels_refuse_other_losses(frepo_run, tmp_path):
    # learned label vectors are not soft-label logits: mse+ce on them is refused
    with pytest.raises(PrismError, match="--loss mse"):
        validate(validate_config("frepo", distilled=str(frepo_run), labels=str(frepo_run), loss="mse+ce",
                                 epochs=1, student_width=0.25, device="cpu", out=str(tmp_path / "v")))


def test_validate_random_real_mse_centred_onehot_under_cutmix(tmp_path, monkeypatch):
    # without learned labels the targets are centred one-hot vectors, mixed with the same lambda as the images
    import prismdd.stages.validate as V

    seen = []
    original = V.student_loss

    def spy(cfg, out, soft, y, y2, lam):
        seen.append((soft.detach().clone(), y.clone(), y2.clone(), lam))
        return original(cfg, out, soft, y, y2, lam)

    monkeypatch.setattr(V, "student_loss", spy)
    validate(validate_config("frepo", random_real=True, ipc=2, dataset="digits", loss="mse", mix="cutmix",
                             epochs=2, student_width=0.25, device="cpu", out=str(tmp_path / "v")))
    proto = read_json(tmp_path / "v" / "accuracy.json")["protocol"]
    assert proto["soft_labels"] == "centred one-hot" and proto["mix"] == "cutmix"
    assert seen and any(lam < 1 for *_, lam in seen)
    for soft, y, y2, lam in seen:
        want = lam * centred_onehot(y, 10) + (1 - lam) * centred_onehot(y2, 10)
        torch.testing.assert_close(soft, want)


def test_mix_vectors_of_a_cutmix_plan():
    # the label vector of a CutMix image is lam * its own + (1 - lam) * its partner's
    vc = ViewConfig(8, 0.64, "cutmix")
    plan = epoch_plan(8, 0, 0, vc, 8)
    (_, _, idx, _, mix), = list(plan.batches(8))
    vec = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    got = _mix_vectors(vec, mix)
    _, lam = mix_partners(torch.arange(8), mix)
    assert 0 < lam < 1 and lam == mix.lam
    for i in range(8):
        torch.testing.assert_close(got[i], lam * vec[i] + (1 - lam) * vec[int(mix.perm[i])])
    torch.testing.assert_close(_mix_vectors(vec, (mix.perm, 0.3)), 0.3 * vec + 0.7 * vec[mix.perm])


# ----------------------------------------------------------------------------- listing
def test_methods_lists_frepo(cli, capsys):
    # `prismdd methods` shows the paper and the code snapshot the plug-in follows
    from prismdd import list_methods

    row = next(r for r in list_methods() if r["name"] == "frepo")
    assert "Zhou" in row["paper"] and "2022" in row["paper"]
    assert "yongchao97/FRePo" in row["code_full"] and "9b98c65" in row["code_full"]
    assert cli(["methods"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("frepo"))
    assert "Zhou" in line
    assert cli(["methods", "frepo"]) == 0
    text = capsys.readouterr().out
    assert "yongchao97/FRePo @ 9b98c65beac9baa851aeab7f1c8ca71ca74bb886" in text and "NeurIPS 2022" in text


def test_frepo_on_an_rgb_imagefolder_of_odd_images(tmp_path):
    # a user's own data: RGB, mixed sizes and formats, read at native size; FRePo distils and validates with its labels
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate(("cat", "dog", "owl")):
            d = tmp_path / "data" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                w, h = (20, 20) if i % 3 else (26, 21)  # most common shorter side: 20 px
                arr = (rng.random((h, w, 3)) * 80 + c * 60).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
    out = recover(recover_config("frepo", dataset="imagefolder", data_root=str(tmp_path / "data"), ipc=2,
                                 iterations=4, frepo_real_batch=8, frepo_width=0.25, frepo_pool=2, device="cpu",
                                 out=str(tmp_path / "fr")))
    m = read_json(out / "manifest.json")
    assert m["inputs"]["dataset"]["resolution"] == 20 and m["inputs"]["dataset"]["channels"] == 3
    assert len(png_files(out)) == 6 and has_learned_labels(out)
    acc = validate(validate_config("frepo", distilled=str(out), epochs=2, student_width=0.25, device="cpu",
                                   out=str(tmp_path / "v")))
    assert acc["protocol"]["soft_labels"] == f"learned:{out}"
