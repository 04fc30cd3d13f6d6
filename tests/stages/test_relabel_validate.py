"""relabel + validate: replayable views, stored vs online soft labels, top-k storage, ensembles, LR schedules,
the validate stage (final-epoch result, seeds, baselines, protocols, resume, errors) and torchrun (gloo, CPU).

Everything runs on the session's tiny digits zoo and the 20-image reference PRISM run (``prism_run``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import prismdd.stages.validate as V
from conftest import run_torchrun
from prismdd.core.augment import CutMix
from prismdd.core.config import build_config
from prismdd.core.data import load_dataset
from prismdd.artifacts import load_distilled
from prismdd.core.augment import EpochPlan, ViewConfig, epoch_plan, make_inputs
from prismdd.stages.relabel import RelabelConfig, relabel
from prismdd.core.training import SoftLabeler, combine_logits
from prismdd.artifacts import StoredLabels, epoch_file, load_labelers, pack_logits, unpack_logits
from prismdd.core.training import lr_factor
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json
from prismdd.stages.validate import validate, validate_config

CPU = torch.device("cpu")
# the tiny student every validate run here trains: 20 distilled images, batches of 8, 8, 4
STUDENT = dict(dataset="digits", device="cpu", student_width=0.25, lr=0.01)


def do_relabel(distilled, zoo, out, **kw) -> Path:
    # the primary alone, by mean, unless a test says otherwise: the labeller these tests rebuild by hand (relabel's
    # own default is validate's protocol, prism: primary and pool, norm-matched; tests/stages/test_label_flows.py)
    settings = dict(dataset="digits", distilled=str(distilled), teachers=str(zoo), out=str(out), epochs=3,
                    batch_size=8, storage="fp32", device="cpu", seed=0, label_teachers=None, ensemble="mean")
    settings.update(kw)
    return relabel(build_config(RelabelConfig, settings))


def _run(cli, capsys, argv):
    capsys.readouterr()
    code = cli(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def student_state(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def labels_fp32(prism_run, zoo, tmp_path_factory) -> Path:
    return do_relabel(prism_run, zoo, tmp_path_factory.mktemp("labels_fp32"), epochs=4)


@pytest.fixture(scope="module")
def distilled(prism_run):
    return load_distilled(prism_run)


# ----------------------------------------------------------------------------- replayable views
def assert_plans_equal(a: EpochPlan, b: EpochPlan):
    assert torch.equal(a.order, b.order)
    assert torch.equal(a.views.boxes, b.views.boxes)
    assert torch.equal(a.views.flips, b.views.flips)
    assert len(a.mixes) == len(b.mixes)
    for ma, mb in zip(a.mixes, b.mixes):
        if ma is None:
            assert mb is None
        elif isinstance(ma, CutMix):
            assert isinstance(mb, CutMix)
            assert torch.equal(ma.perm, mb.perm) and torch.equal(ma.box, mb.box)
            assert ma.lam == mb.lam
        else:
            assert not isinstance(mb, CutMix) and mb is not None
            assert torch.equal(ma[0], mb[0]) and ma[1] == mb[1]


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_stored_views_replay_exactly(prism_run, zoo, distilled, tmp_path, mix):
    out = do_relabel(prism_run, zoo, tmp_path / "labels", epochs=2, mix=mix, min_scale=0.3)
    m = read_json(out / "manifest.json")
    assert m["views"] == {"batch_size": 8, "min_scale": 0.3, "mix": mix, "seed": 0}
    info = distilled.info
    vc = ViewConfig(8, 0.3, mix)
    plans = []
    for e in range(2):
        d = load_file(str(epoch_file(out, e)))
        stored = EpochPlan.from_tensors(d, 8)
        fresh = epoch_plan(len(distilled), e, 0, vc, info.resolution)
        assert_plans_equal(stored, fresh)
        assert sorted(stored.order.tolist()) == list(range(20))
        assert len(stored.mixes) == 3  # 8 + 8 + 4
        if mix == "cutmix":
            assert [len(c.perm) for c in stored.mixes] == [8, 8, 4]
        batches = list(zip(stored.batches(8), fresh.batches(8)))
        assert len(batches) == 3
        for (_, _, ia, va, ma), (_, _, ib, vb, mb) in batches:
            xa = make_inputs(distilled.images[ia], info, va, ma, CPU)
            xb = make_inputs(distilled.images[ib], info, vb, mb, CPU)
            assert torch.equal(xa, xb)
        plans.append(stored)
    # another epoch draws other views (the test above must be able to tell plans apart)
    assert not torch.equal(plans[0].views.boxes, plans[1].views.boxes)
    assert not torch.equal(plans[0].order, plans[1].order)
    # ... and another seed too
    assert not torch.equal(epoch_plan(20, 0, 1, vc, 8).views.boxes, plans[0].views.boxes)


def test_cutmix_lam_roundtrip_at_28px():
    vc = ViewConfig(8, 0.25, "cutmix")
    for epoch in range(3):
        plan = epoch_plan(20, epoch, 0, vc, 28)
        assert_plans_equal(EpochPlan.from_tensors(plan.to_tensors(), 8), plan)


def test_validate_stored_equals_online_at_28px(tmp_path):
    from prismdd.stages.recover import recover, recover_config
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    common = dict(dataset="digits", device="cpu", resolution=28, seed=0)
    squeeze(build_config(SqueezeConfig, dict(common, arch="convnet", width=0.25, epochs=1, batch_size=256,
                                             out=str(tmp_path / "zoo"))))
    rec = recover(recover_config("prism", **common, ipc=2, iterations=2, batch_size=8, teachers=str(tmp_path / "zoo"),
                                 out=str(tmp_path / "rec")))
    labels = do_relabel(rec, tmp_path / "zoo", tmp_path / "labels", epochs=2, resolution=28)
    kw = dict(STUDENT, distilled=str(rec), epochs=2, eval_every=1, resolution=28)
    validate(validate_config(out=str(tmp_path / "stored"), labels=str(labels), **kw))
    validate(validate_config(out=str(tmp_path / "online"), teachers=str(tmp_path / "zoo"), batch_size=8, **kw))
    assert_same_state(student_state(tmp_path / "stored" / "convnet_seed0"),
                      student_state(tmp_path / "online" / "convnet_seed0"))


# ----------------------------------------------------------------------------- stored vs online labels
@pytest.mark.parametrize("teachers,ensemble", [(None, "mean"), ("convnet,resnet18", "norm-matched")])
def test_stored_fp32_logits_equal_online(prism_run, zoo, distilled, tmp_path, teachers, ensemble):
    out = do_relabel(prism_run, zoo, tmp_path / "l", label_teachers=teachers, ensemble=ensemble)
    m = read_json(out / "manifest.json")
    assert m["inputs"]["label_teachers"] == (teachers.split(",") if teachers else ["convnet"])  # the primary
    info = distilled.info
    labeler = load_labelers(str(zoo), teachers, "convnet", info, ensemble, 0.5, CPU)
    stored = StoredLabels(out, info.num_classes)
    for e in range(3):
        plan, logits = stored.epoch(e)
        fresh = epoch_plan(len(distilled), e, 0, ViewConfig(8, 0.25, "cutmix"), info.resolution)
        online = torch.cat([labeler(make_inputs(distilled.images[idx], info, v, mix, CPU))
                            for _, _, idx, v, mix in fresh.batches(8)])
        assert logits.dtype == torch.float32 and logits.shape == (20, 10)
        assert torch.equal(logits, online)
    with pytest.raises(PrismError, match="relabel with --epochs"):
        stored.epoch(3)


def test_stored_fp16_logits_within_rounding(prism_run, zoo, distilled, tmp_path):
    out = do_relabel(prism_run, zoo, tmp_path / "l16", storage="fp16", epochs=2)
    info = distilled.info
    labeler = load_labelers(str(zoo), None, "convnet", info, "mean", 0.5, CPU)
    for e in range(2):
        d = load_file(str(epoch_file(out, e)))
        assert d["logits"].dtype == torch.float16
        plan = EpochPlan.from_tensors(d, 8)
        online = torch.cat([labeler(make_inputs(distilled.images[idx], info, v, mix, CPU))
                            for _, _, idx, v, mix in plan.batches(8)])
        stored = unpack_logits(d, 10)
        assert torch.equal(stored, online.half().float())  # exactly the fp16 rounding of the online logits
        torch.testing.assert_close(stored, online, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("teachers,ensemble", [(None, "mean"), ("convnet,resnet18", "norm-matched")])
def test_validate_stored_equals_online(prism_run, zoo, tmp_path, teachers, ensemble):
    labels = do_relabel(prism_run, zoo, tmp_path / "l", label_teachers=teachers, ensemble=ensemble)
    common = dict(STUDENT, distilled=str(prism_run), epochs=3, eval_every=1, seed=0, label_teachers=teachers,
                  ensemble=ensemble)
    a = validate(validate_config(out=str(tmp_path / "stored"), labels=str(labels), **common))
    b = validate(validate_config(out=str(tmp_path / "online"), teachers=str(zoo), batch_size=8, **common))
    assert a["protocol"]["soft_labels"].startswith("stored:") and b["protocol"]["soft_labels"].startswith("online:")
    assert a["protocol"]["batch_size"] == b["protocol"]["batch_size"] == 8
    assert (a["top1"], a["top5"], a["curve"]) == (b["top1"], b["top5"], b["curve"])
    # the students themselves are bit-identical, not just their accuracy
    assert_same_state(student_state(tmp_path / "stored" / "convnet_seed0"),
                      student_state(tmp_path / "online" / "convnet_seed0"))


# ----------------------------------------------------------------------------- storage
def test_pack_unpack_topk_exact():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g) * 3
    v, i = logits.topk(3, dim=1)
    d = pack_logits(logits, "fp32", 3)
    assert set(d) == {"values", "indices", "tail"} and d["indices"].dtype == torch.int16
    assert torch.equal(d["values"], v) and torch.equal(d["indices"].long(), i)
    out = unpack_logits(d, 10)
    assert out.shape == (6, 10)
    assert torch.equal(out.gather(1, i), v)  # the top-k values, at their classes, exactly
    assert torch.equal(out.argmax(1), logits.argmax(1))
    rest = torch.ones_like(out, dtype=torch.bool).scatter_(1, i, False)
    tail = (logits.sum(1, keepdim=True) - v.sum(1, keepdim=True)) / 7
    torch.testing.assert_close(out[rest].view(6, 7), tail.expand(6, 7))  # the rest: the mean of the left-out logits
    old = {"values": d["values"], "indices": d["indices"]}  # files written before the tail was stored
    assert torch.equal(unpack_logits(old, 10)[rest].view(6, 7), v[:, -1:].expand(6, 7))
    # fp16: values rounded to fp16, indices still exact
    d16 = pack_logits(logits, "fp16", 3)
    assert d16["values"].dtype == torch.float16 and torch.equal(d16["indices"].long(), i)
    assert torch.equal(unpack_logits(d16, 10).gather(1, i), v.half().float())
    # full storage
    full = pack_logits(logits, "fp16", 0)
    assert set(full) == {"logits"} and torch.equal(unpack_logits(full, 10), logits.half().float())
    assert torch.equal(unpack_logits(pack_logits(logits, "fp32", 10), 10), logits)  # k >= K: everything


@pytest.mark.parametrize("storage,topk,per_image", [("fp16", 3, 3 * (2 + 2) + 2), ("fp16", 0, 10 * 2),
                                                    ("fp32", 0, 10 * 4)])
def test_label_bytes_in_manifest(prism_run, zoo, distilled, tmp_path, storage, topk, per_image):
    out = do_relabel(prism_run, zoo, tmp_path / "l", storage=storage, topk=topk, epochs=2)
    o = read_json(out / "manifest.json")["outputs"]
    assert o["bytes_per_image_epoch"] == per_image
    assert o["label_bytes"] == per_image * 20 * 2
    if topk:
        d = load_file(str(epoch_file(out, 1)))
        labeler = load_labelers(str(zoo), None, "convnet", distilled.info, "mean", 0.5, CPU)
        plan = EpochPlan.from_tensors(d, 8)
        online = torch.cat([labeler(make_inputs(distilled.images[idx], distilled.info, v, mix, CPU))
                            for _, _, idx, v, mix in plan.batches(8)])
        v, i = online.topk(topk, 1)
        assert torch.equal(d["indices"].long(), i) and torch.equal(d["values"], v.half())


# ----------------------------------------------------------------------------- ensembles
def test_combine_logits():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(5, 4, generator=g) * s for s in (1.0, 10.0, 3.0))
    torch.testing.assert_close(combine_logits([a, b, c], "mean"), (a + b + c) / 3)
    # norm-matched-sample (prismdd's option; the reference's batch-norm version is tested in test_fidelity.py):
    # every teacher rescaled (per sample) to the mean L2 norm of the teachers, then averaged
    na, nb, nc = (t.norm(dim=1, keepdim=True) for t in (a, b, c))
    target = (na + nb + nc) / 3
    want = (a / na * target + b / nb * target + c / nc * target) / 3
    got = combine_logits([a, b, c], "norm-matched-sample")
    torch.testing.assert_close(got, want)
    for t in (a, b, c):  # every teacher contributes with the same norm per sample
        torch.testing.assert_close((t / t.norm(dim=1, keepdim=True) * target).norm(dim=1, keepdim=True), target)
    torch.testing.assert_close(combine_logits([a, b, c], "weighted", 0.6), 0.6 * a + 0.2 * b + 0.2 * c)
    torch.testing.assert_close(combine_logits([a, b], "weighted"), 0.5 * a + 0.5 * b)
    assert torch.equal(combine_logits([a], "norm-matched"), a)
    with pytest.raises(PrismError, match="mean, norm-matched, norm-matched-sample, weighted"):
        combine_logits([a, b], "median")
    labeler = SoftLabeler([torch.nn.Identity(), torch.nn.Identity()], ["x", "y"], "mean")
    assert torch.equal(labeler(a), a)


def test_validate_rejects_unknown_ensemble(zoo, prism_run, tmp_path):
    with pytest.raises(PrismError, match="ensemble"):
        validate_config(**STUDENT, distilled=str(prism_run), teachers=str(zoo), ensemble="norm-mached",
                        out=str(tmp_path / "v"))


# ----------------------------------------------------------------------------- LR schedules
def test_lr_factor_schedules():
    approx = pytest.approx
    assert lr_factor("cosine", 0) == approx(1) and lr_factor("cosine", 0.5) == approx(0.5)
    assert lr_factor("cosine", 1) == approx(0, abs=1e-12)
    assert lr_factor("cosine", 0.25) == approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [lr_factor("linear", p) for p in (0, 0.25, 1)] == [approx(1), approx(0.75), approx(0)]
    assert [lr_factor("step_half", p) for p in (0, 0.49, 0.5, 1)] == [1.0, 1.0, approx(0.1), approx(0.1)]
    # clamped outside [0, 1]
    assert lr_factor("linear", -1) == approx(1) and lr_factor("linear", 2) == approx(0)
    # decayed_cosine (its reference formula is tested against train_FKD_parallel.py in test_fidelity.py): the
    # stretched cosine up to the knee at 5/6, where it has fallen to cos(pi/3) = 3/4, then 0.75 (1 - p)
    knee = 5 / 6
    for p in np.linspace(0, knee, 11):
        assert lr_factor("decayed_cosine", p) == approx(0.5 * (1 + math.cos(math.pi * p / 2.5)))
    assert lr_factor("decayed_cosine", knee) == approx(0.75)
    assert lr_factor("decayed_cosine", (knee + 1) / 2) == approx(0.75 * (1 - (knee + 1) / 2))
    assert lr_factor("decayed_cosine", 1) == approx(0, abs=1e-12)
    ps = np.linspace(0, 1, 601)
    vals = [lr_factor("decayed_cosine", p) for p in ps]
    assert all(x >= y - 1e-12 for x, y in zip(vals, vals[1:]))  # monotone non-increasing
    # warm-up: linear from 0 up to the schedule's value
    assert lr_factor("cosine", 0.0, warmup=0.1) == 0.0
    assert lr_factor("cosine", 0.05, warmup=0.1) == approx(0.5)
    assert lr_factor("cosine", 0.5, warmup=0.1) == approx(0.5)
    assert lr_factor("linear", 0.2, warmup=0.1) == approx(0.8)
    with pytest.raises(PrismError, match="cosine"):
        lr_factor("step", 0.5)


# ----------------------------------------------------------------------------- validate: results
def fake_evaluate(values):
    """An ``evaluate`` stand-in returning the given top-1 values in turn."""
    it = iter(values)

    def ev(*args, **kwargs):
        t1 = next(it)
        return {"top1": t1, "top5": min(100.0, t1 + 20), "loss": 1.0, "n": 360}

    return ev


def test_result_is_final_epoch(prism_run, zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(V, "evaluate", fake_evaluate([50.0, 80.0, 30.0]))
    m = validate(validate_config(**STUDENT, distilled=str(prism_run), teachers=str(zoo), epochs=5, eval_every=2,
                                 out=str(tmp_path / "v")))
    # evaluated at epochs 2, 4 and the final 5; the result is epoch 5, not the best (epoch 4)
    assert [c["epoch"] for c in m["curve"]] == [2, 4, 5]
    assert m["top1"] == 30.0 and m["top5"] == 50.0 and m["best_top1"] == 80.0
    run = m["students"]["convnet"]["runs"][0]
    assert run["best_epoch"] == 4 and run["top1"] == 30.0
    assert m["protocol"]["result"] == "final epoch"
    on_disk = read_json(tmp_path / "v" / "accuracy.json")
    assert on_disk["top1"] == 30.0 and on_disk["best_top1"] == 80.0


def test_metrics_json_fields(prism_run, labels_fp32, tmp_path):
    out = tmp_path / "v"
    validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(labels_fp32), epochs=3, eval_every=1,
                             out=str(out)))
    m = read_json(out / "accuracy.json")
    for key in ("top1", "top5", "top1_std", "best_top1", "curve", "protocol"):
        assert key in m, key
    assert 0 <= m["top1"] <= m["top5"] <= 100 and m["top1_std"] == 0.0
    assert m["top1"] == m["curve"][-1]["top1"] and m["curve"][-1]["epoch"] == 3
    assert m["best_top1"] == max(c["top1"] for c in m["curve"])
    p = m["protocol"]
    assert p["loss"] == "mse+ce" and p["gamma"] == 0.1 and p["optimizer"] == "adamw" and p["epochs"] == 3
    assert p["schedule"] == "decayed_cosine" and p["batch_size"] == 8 and p["mix"] == "cutmix"
    assert m["images"] == 20 and m["source"]["source"] == "distilled"
    assert read_json(out / "manifest.json")["stage"] == "validate"
    log = [json.loads(line) for line in (out / "convnet_seed0" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert not (out / "convnet_seed0" / "checkpoint.pt").exists()  # removed once the student finished


def test_protocol_reports_stored_views_min_scale(prism_run, zoo, tmp_path):
    labels = do_relabel(prism_run, zoo, tmp_path / "l", min_scale=0.5, epochs=1)
    m = validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(labels), epochs=1,
                                 out=str(tmp_path / "v")))
    assert m["protocol"]["min_scale"] == 0.5


def test_several_seeds_mean_and_std(prism_run, labels_fp32, tmp_path):
    out = tmp_path / "v"
    m = validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(labels_fp32), epochs=4,
                                 eval_every=2, seeds="0,1", out=str(out)))
    runs = [read_json(out / f"convnet_seed{s}" / "result.json") for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1] and m["seeds"] == [0, 1]
    t1 = np.array([r["top1"] for r in runs])
    assert t1[0] != t1[1]  # the seeds train different students (else the std check below is vacuous)
    assert m["top1"] == pytest.approx(t1.mean(), abs=1e-3)
    assert m["top1_std"] == pytest.approx(t1.std(ddof=1), abs=1e-3)
    assert m["top5"] == pytest.approx(np.mean([r["top5"] for r in runs]), abs=1e-3)
    assert m["best_top1"] == pytest.approx(np.mean([r["best_top1"] for r in runs]), abs=1e-3)
    assert [c["top1"] for c in m["curve"]] == pytest.approx(
        [np.mean([r["curve"][i]["top1"] for r in runs]) for i in range(2)], abs=1e-3)


def test_random_real_is_seeded(tmp_path):
    def indices(seed, name):
        validate(validate_config(dataset="digits", device="cpu", student_width=0.25, random_real=True, ipc=3,
                                 loss="ce", epochs=1, seed=seed, out=str(tmp_path / name)))
        m = read_json(tmp_path / name / "accuracy.json")
        assert m["images"] == 30 and m["source"] == {"source": "random-real", "ipc": 3}
        return read_json(tmp_path / name / "manifest.json")["inputs"]["source"]["indices"]

    a, b, c = indices(0, "a"), indices(0, "b"), indices(1, "c")
    assert a == b and a != c
    train, _, _ = load_dataset("digits")
    for idx in (a, c):
        assert len(set(idx)) == 30
        assert np.bincount(train.targets[idx].numpy(), minlength=10).tolist() == [3] * 10


def test_appendix_c_protocol_and_explicit_flags_win(cli, capsys, tmp_path):
    from prismdd.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args("validate", build_parser().parse_args(["validate", *argv]))

    c = cfg("--protocol", "appendix-c", "--random-real")
    assert (c.optimizer, c.schedule, c.loss, c.lr, c.batch_size, c.epochs, c.mix) == \
        ("sgd", "linear", "ce", 0.1, 256, 90, "none")
    c = cfg("--protocol", "appendix-c", "--random-real", "--lr", "0.05", "--set", "epochs=2", "--optimizer", "adam")
    assert (c.lr, c.epochs, c.optimizer, c.schedule, c.loss) == (0.05, 2, "adam", "linear", "ce")
    assert cfg("--random-real", "--loss", "ce").optimizer == "adamw"  # the default protocol: prism
    out = tmp_path / "v"
    code, _, err = _run(cli, capsys, ["validate", "--protocol", "appendix-c", "--dataset", "digits", "--random-real",
                                      "--ipc", "2", "--epochs", "1", "--lr", "0.05", "--student-width", "0.25",
                                      "--device", "cpu", "--out", out])
    assert code == 0, err
    p = read_json(out / "accuracy.json")["protocol"]
    assert (p["protocol"], p["optimizer"], p["schedule"], p["loss"], p["gamma"]) == \
        ("appendix-c", "sgd", "linear", "ce", None)
    assert (p["lr"], p["epochs"], p["batch_size"], p["mix"], p["soft_labels"]) == (0.05, 1, 256, "none", "hard labels")


def test_resume_after_interrupt(cli, capsys, prism_run, zoo, tmp_path, monkeypatch):
    argv = ["validate", "--dataset", "digits", "--distilled", prism_run, "--teachers", zoo, "--epochs", "4",
            "--eval-every", "1", "--batch-size", "8", "--student-width", "0.25", "--lr", "0.01", "--device", "cpu"]
    assert _run(cli, capsys, argv + ["--out", tmp_path / "ref"])[0] == 0
    real, calls = V.evaluate, []

    def interrupt_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # during epoch 3: epochs 1 and 2 are finished and checkpointed
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(V, "evaluate", interrupt_third)
    folder = tmp_path / "res" / "convnet_seed0"
    code, _, err = _run(cli, capsys, argv + ["--out", tmp_path / "res"])
    assert code == 130 and "resume" in err
    assert (folder / "checkpoint.pt").exists() and not (folder / "result.json").exists()
    assert [json.loads(x)["epoch"] for x in (folder / "log.jsonl").read_text().splitlines()] == [1, 2]
    monkeypatch.setattr(V, "evaluate", real)
    calls.clear()
    monkeypatch.setattr(V, "evaluate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert _run(cli, capsys, argv + ["--out", tmp_path / "res"])[0] == 0
    assert len(calls) == 2  # only epochs 3 and 4 were trained again
    assert [json.loads(x)["epoch"] for x in (folder / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    ref, res = read_json(tmp_path / "ref" / "accuracy.json"), read_json(tmp_path / "res" / "accuracy.json")
    assert (res["top1"], res["curve"]) == (ref["top1"], ref["curve"])
    assert_same_state(student_state(tmp_path / "ref" / "convnet_seed0"), student_state(folder))
    assert not (folder / "checkpoint.pt").exists()


def test_rerun_with_other_epochs_is_not_stale(prism_run, zoo, tmp_path):
    common = dict(STUDENT, distilled=str(prism_run), teachers=str(zoo), eval_every=1, out=str(tmp_path / "v"))
    validate(validate_config(epochs=2, **common))
    try:
        m = validate(validate_config(epochs=3, **common))
    except PrismError:
        return  # refusing is fine too
    assert m["curve"][-1]["epoch"] == m["protocol"]["epochs"] == 3


# ----------------------------------------------------------------------------- validate: errors
def test_two_sources_is_an_error(cli, capsys, prism_run, tmp_path):
    code, _, err = _run(cli, capsys, ["validate", "--dataset", "digits", "--distilled", prism_run, "--random-real",
                                      "--loss", "ce", "--out", tmp_path / "v", "--device", "cpu"])
    assert code == 2 and err.startswith("prismdd: error:") and "exactly one" in err
    assert not (tmp_path / "v").exists()


def test_soft_loss_needs_labels_or_teachers(cli, capsys, prism_run, tmp_path):
    code, _, err = _run(cli, capsys, ["validate", "--dataset", "digits", "--distilled", prism_run,
                                      "--out", tmp_path / "v", "--device", "cpu"])
    assert code == 2 and "--labels" in err and "--teachers" in err and "mse+ce" in err
    assert not (tmp_path / "v").exists()


def test_labels_with_other_batch_size(cli, capsys, prism_run, labels_fp32, tmp_path):
    with pytest.raises(PrismError, match="batch size 8"):
        validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(labels_fp32), batch_size=10,
                                 epochs=1, out=str(tmp_path / "v")))
    code, _, err = _run(cli, capsys, ["validate", "--dataset", "digits", "--distilled", prism_run, "--labels",
                                      labels_fp32, "--batch-size", "4", "--epochs", "1", "--out", tmp_path / "w",
                                      "--device", "cpu"])
    assert code == 2 and "--batch-size 4" in err
    # the labels' own batch size is accepted; more epochs than labelled is an error naming relabel
    with pytest.raises(PrismError, match="relabel"):
        validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(labels_fp32), batch_size=8,
                                 epochs=5, out=str(tmp_path / "x")))


@pytest.mark.parametrize("case,match", [
    ("more epochs", "--epochs 5: the labels in .* hold 4 epochs; extend them with prismdd relabel --config "
                    ".*config.yaml --epochs 5"),
    ("missing file", r"lack the files of epochs \[2\]"),
    ("no augment", "--no-augment: the labels"),
    ("unknown student", "nosuch")])
def test_validate_refuses_before_the_first_epoch(prism_run, labels_fp32, tmp_path, monkeypatch, case, match):
    """Issue 36: a check that can fail does so before any training, and the refused call leaves no folder."""
    def no_training(*a, **k):
        raise AssertionError("a student trained before the call was refused")

    monkeypatch.setattr(V, "fit", no_training)
    labels, kw = labels_fp32, dict(epochs=4)
    if case == "more epochs":
        kw["epochs"] = 5
    elif case == "missing file":
        labels = tmp_path / "labels"
        labels.mkdir()
        for f in Path(labels_fp32).iterdir():  # the module's labels stay whole: a copy loses epoch 2's file
            if f.name != epoch_file(labels_fp32, 1).name:
                (labels / f.name).write_bytes(f.read_bytes())
    elif case == "no augment":
        kw["augment"] = False
    else:
        kw["student"] = "nosuch"
    out = tmp_path / "eval" / "v"
    with pytest.raises(PrismError, match=match):
        validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(labels), out=str(out), **kw))
    assert not (tmp_path / "eval").exists()


def test_labels_folder_must_be_a_relabel_output(prism_run, tmp_path):
    with pytest.raises(PrismError, match="relabel"):
        validate(validate_config(**STUDENT, distilled=str(prism_run), labels=str(prism_run), epochs=1,
                                 out=str(tmp_path / "v")))


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_validate_two_ranks(prism_run, zoo, tmp_path):
    out = tmp_path / "ddp"
    run_torchrun(["validate", "--dataset", "digits", "--distilled", prism_run, "--teachers", zoo,
                  "--epochs", "3", "--eval-every", "1", "--batch-size", "8", "--student-width", "0.25",
                  "--device", "cpu", "--out", out])
    m = read_json(out / "accuracy.json")
    assert 0 <= m["top1"] <= 100 and [c["epoch"] for c in m["curve"]] == [1, 2, 3]
    # the prism protocol's labels (primary + pool) and its accumulation in 2 parts, on each rank's share
    assert m["protocol"]["soft_labels"] == "online:convnet,mobilenet_v2,resnet18" and m["protocol"]["grad_accum"] == 2
    log = (out / "convnet_seed0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log] == [1, 2, 3]  # rank 0 alone writes the log
    assert (out / "convnet_seed0" / "result.json").exists() and not (out / "convnet_seed0" / "checkpoint.pt").exists()


def test_validate_takes_the_dataset_from_the_distilled_folder(cli, capsys, prism_run, zoo, tmp_path):
    """No --dataset: the distilled set's manifest names it (digits), not the fashion-mnist default."""
    code, _, err = _run(cli, capsys, ["validate", "--distilled", prism_run, "--teachers", zoo, "--epochs", "1",
                                      "--student-width", "0.25", "--device", "cpu", "--out", tmp_path / "v"])
    assert code == 0, err
    m = read_json(tmp_path / "v" / "manifest.json")
    assert m["config"]["dataset"] == "digits" and m["inputs"]["dataset"]["name"] == "digits"
