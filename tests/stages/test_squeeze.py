"""squeeze through the CLI on digits: artefacts, skip on re-run, resume after an interruption, teacher loading."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import prismdd.core.training as training
import prismdd.core.runtime as runtime
import prismdd.stages.squeeze as sq
from prismdd.core.config import build_config, load_yaml
from prismdd.core.data import load_dataset, normalize
from prismdd.artifacts import find_teachers, load_model
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json


def squeeze_args(out, epochs=2):
    return ["squeeze", "--dataset", "digits", "--arch", "convnet", "--width", "0.25", "--epochs", str(epochs),
            "--out", str(out), "--device", "cpu"]


def log_epochs(folder):
    return [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def squeezed(tmp_path_factory, cli):
    """One uninterrupted CLI squeeze (convnet, 2 epochs); tests must not modify it."""
    out = tmp_path_factory.mktemp("squeeze") / "teachers"
    assert cli(squeeze_args(out)) == 0
    return out


def test_squeeze_cli_artefacts(squeezed):
    folder = squeezed / "convnet"
    for name in ("model.safetensors", "card.json", "log.jsonl", "config.yaml"):
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoint.pt").exists()  # removed once the teacher is finished
    card = read_json(folder / "card.json")
    assert (card["arch"], card["dataset"], card["epochs"]) == ("convnet", "digits", 2)
    assert card["class_names"] == [str(i) for i in range(10)]
    assert card["spec"]["width"] == 0.25 and card["spec"]["in_channels"] == 1 and card["spec"]["resolution"] == 8

    # test_top1 is a percentage: recompute it from the saved weights
    model, _ = load_model(folder)
    _, test, info = load_dataset("digits")
    with torch.no_grad():
        pred = model(normalize(test.images, info)).argmax(1)
    top1 = 100.0 * (pred == test.targets).float().mean().item()
    assert card["test_top1"] == pytest.approx(top1, abs=1e-3)
    assert 1.0 < card["test_top1"] <= 100.0  # a percentage, not a fraction

    assert log_epochs(folder) == [1, 2]
    last = json.loads((folder / "log.jsonl").read_text().splitlines()[-1])
    assert last["test_top1"] == pytest.approx(card["test_top1"], abs=1e-3)

    cfg = load_yaml(folder / "config.yaml")
    assert (cfg["arch"], cfg["epochs"], cfg["width"], cfg["dataset"]) == ("convnet", 2, 0.25, "digits")

    m = read_json(squeezed / "manifest.json")
    assert m["stage"] == "squeeze" and m["config"]["epochs"] == 2
    assert m["outputs"]["teachers"]["convnet"]["test_top1"] == card["test_top1"]
    assert m["inputs"]["dataset"]["name"] == "digits" and m["inputs"]["dataset"]["num_classes"] == 10
    assert {"torch", "prismdd", "python"} <= set(m["versions"])
    assert (squeezed / "config.yaml").exists()


def test_rerun_skips_finished_teacher(squeezed, tmp_path, cli, capsys):
    out = tmp_path / "teachers"
    shutil.copytree(squeezed, out)
    card = (out / "convnet" / "card.json").read_bytes()
    weights = (out / "convnet" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli(squeeze_args(out)) == 0
    assert "skipping" in capsys.readouterr().out
    assert (out / "convnet" / "card.json").read_bytes() == card
    assert (out / "convnet" / "model.safetensors").read_bytes() == weights
    assert log_epochs(out / "convnet") == [1, 2]


def _interrupt_on_call(monkeypatch, name, n, module=sq):
    """Make ``<module>.<name>`` raise on its n-th call (a simulated crash / kill)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(f"simulated interruption in {name}")
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


def test_resume_after_interruption(squeezed, tmp_path, cli, capsys, monkeypatch):
    out = tmp_path / "teachers"
    folder = out / "convnet"
    _interrupt_on_call(monkeypatch, "evaluate", 2)  # epoch 2's evaluation: epoch 1 is checkpointed
    with pytest.raises(RuntimeError, match="simulated interruption"):
        cli(squeeze_args(out))
    monkeypatch.undo()
    assert (folder / "checkpoint.pt").exists() and not (folder / "card.json").exists()
    assert log_epochs(folder) == [1]

    capsys.readouterr()
    assert cli(squeeze_args(out)) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert log_epochs(folder) == [1, 2]  # every epoch exactly once
    assert not (folder / "checkpoint.pt").exists()
    # the resumed teacher is the uninterrupted one, bit for bit (data order, views and LR derive from the seed)
    a = load_file(str(folder / "model.safetensors"))
    b = load_file(str(squeezed / "convnet" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert read_json(folder / "card.json")["test_top1"] == read_json(squeezed / "convnet" / "card.json")["test_top1"]


def test_resume_after_interruption_during_checkpoint(tmp_path, cli, monkeypatch):
    out = tmp_path / "teachers"
    _interrupt_on_call(monkeypatch, "torch_save", 2, training)  # epoch 2's checkpoint write (in the shared loop)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        cli(squeeze_args(out))
    monkeypatch.undo()
    assert cli(squeeze_args(out)) == 0
    assert log_epochs(out / "convnet") == [1, 2]


def test_load_teacher_checks_expectations(squeezed):
    folder = squeezed / "convnet"
    model, card = load_model(folder, arch="convnet", dataset="digits", class_names=[str(i) for i in range(10)])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    load_model(folder / "model.safetensors")  # the weights file works as well
    with pytest.raises(PrismError, match="expected 'resnet18'"):
        load_model(folder, arch="resnet18")
    with pytest.raises(PrismError, match="expected 'fashion-mnist'"):
        load_model(folder, dataset="fashion-mnist")
    with pytest.raises(PrismError, match="classes differ"):
        load_model(folder, class_names=[str(i) for i in range(9)])
    with pytest.raises(PrismError, match="classes differ"):
        load_model(folder, class_names=[str(i) for i in reversed(range(10))])
    with pytest.raises(PrismError, match="no card.json"):
        load_model(squeezed)
    assert find_teachers(squeezed) == {"convnet": folder}
    assert find_teachers(folder) == {"convnet": folder}


def test_load_teacher_weights_of_another_shape(squeezed, tmp_path):
    folder = tmp_path / "convnet"
    shutil.copytree(squeezed / "convnet", folder)
    card = read_json(folder / "card.json")
    card["spec"]["width"] = 0.5  # the card no longer matches the weights
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(PrismError, match="cannot load"):
        load_model(folder)


def test_load_teacher_corrupt_weights(squeezed, tmp_path):
    folder = tmp_path / "convnet"
    shutil.copytree(squeezed / "convnet", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PrismError, match="model.safetensors"):
        load_model(folder)


def test_bad_set_value_exits_2_with_one_line(tmp_path, cli, capsys):
    capsys.readouterr()
    code = cli(squeeze_args(tmp_path / "t") + ["--set", "epochs=abc"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prismdd: error:") and "epochs" in lines[0]
    assert not (tmp_path / "t").exists()  # nothing was started


def test_set_wins_over_flags(tmp_path, cli):
    # --set beats the explicit flag: --epochs 2 --set epochs=1 trains one epoch
    out = tmp_path / "t"
    assert cli(squeeze_args(out, epochs=2) + ["--set", "epochs=1", "--set", "batch_size=512"]) == 0
    card = read_json(out / "convnet" / "card.json")
    assert card["epochs"] == 1 and card["config"]["batch_size"] == 512
    assert log_epochs(out / "convnet") == [1]


def _three_class_folder(root, n_train=40, n_val=10):
    """3 classes told apart by brightness and stripes, 20-60 px, grey and RGB mixed (a newcomer's own folder)."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(3):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                size = int(rng.integers(20, 61))
                base = np.full((size, size), (40, 128, 215)[c], np.uint8)
                if c == 2:
                    base[:, ::4] = 0
                img = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
                im = Image.fromarray(img)
                (im.convert("RGB") if i % 2 else im).save(d / f"{i}.png")
    return root


def test_small_folder_trains_every_step(tmp_path, capsys):
    """Issue 27: 120 training images and the default batch 128 ran ZERO optimiser steps (drop_last) and left
    every teacher at chance; the batch is now clipped to the split, said once, and the loss falls."""
    root = _three_class_folder(tmp_path / "data")
    cfg = build_config(sq.SqueezeConfig, dict(dataset="imagefolder", data_root=str(root), resolution=16,
                                              arch="convnet,resnet18", width=0.25, epochs=4, out=str(tmp_path / "t"),
                                              device="cpu", eval_every=4))
    assert cfg.batch_size == 128
    sq.squeeze(cfg)
    said = capsys.readouterr().out
    assert said.count("--batch-size 128 is larger than the 120 training images") == 1
    for arch in ("convnet", "resnet18"):
        losses = [json.loads(x)["train_loss"] for x in (tmp_path / "t" / arch / "log.jsonl").read_text().splitlines()]
        assert losses[0] > 0 and losses[-1] < losses[0], (arch, losses)
    assert read_json(tmp_path / "t" / "convnet" / "card.json")["test_top1"] > 50  # chance is 33.3


def test_heartbeat_without_a_terminal(tmp_path, capsys, monkeypatch):
    """Issue 27: a teacher epoch of minutes printed nothing when the output was not a terminal; a verbose fit now
    says a line every PRISMDD_PROGRESS_EVERY seconds (0 here: every step; issue 36: every fit, not only verbose ones)."""
    monkeypatch.setenv(runtime.PROGRESS_EVERY_ENV, "0")
    cfg = build_config(sq.SqueezeConfig, dict(dataset="digits", arch="convnet", width=0.25, epochs=1, batch_size=256,
                                              out=str(tmp_path / "t"), device="cpu"))
    sq.squeeze(cfg)
    lines = [x for x in capsys.readouterr().out.splitlines() if ", step " in x]
    assert lines and lines[0].startswith("[squeeze convnet] epoch 1/1, step 1/5 (20 %), loss ")
