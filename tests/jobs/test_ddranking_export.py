"""``prismdd export --format ddranking``: the folder DD-Ranking 0.2.0 scores with its own code, unedited.

The end-to-end test makes a Tiny-ImageNet-shaped ImageFolder (200 classes, train/ and val/, 16 px RGB: DD-Ranking's
ResNet-18 keeps its ImageNet stem there, 16x cheaper than at 32), trains a ConvNet teacher and recovers one image per class with prismdd, exports, and runs the export's script with
ddranking 0.2.0 (its own environment, ``.venv-ddranking``, because it pins numpy < 2; ``scripts/setup.sh --tests``
makes it). CIFAR-10 itself cannot be made offline: DD-Ranking reads it through torchvision, which checks the real
files' MD5 sums, so the ImageFolder-shaped Tiny-ImageNet is the dataset it reads from a folder made here.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prismdd.core.errors import PrismError
from prismdd.core.scores import lrs
from prismdd.export import _ddr_convnet, ddr_dataset, ddr_reference_model
from prismdd.core.models import create_model

ROOT = Path(__file__).resolve().parents[2]
DDR_PYTHON = Path(os.environ.get("PRISMDD_DDRANKING_PYTHON", ROOT / ".venv-ddranking" / "bin" / "python"))
IN_CI = bool(os.environ.get("CI"))  # .ci/run builds the environment: there this test must run, not skip


def test_datasets_ddranking_cannot_take_are_refused_in_one_line():
    with pytest.raises(PrismError, match="cannot score a fashion-mnist set: it knows only CIFAR10"):
        ddr_dataset("fashion-mnist", 10, 1, None)
    with pytest.raises(PrismError, match="needs --as-dataset"):
        ddr_dataset("imagefolder", 200, 3, None)
    with pytest.raises(PrismError, match="TinyImageNet has 200 classes"):
        ddr_dataset("imagefolder", 10, 3, "TinyImageNet")
    assert ddr_dataset("cifar10", 10, 3, None) == "CIFAR10"


@pytest.mark.parametrize("resolution", [32, 64])
def test_a_prismdd_convnet_loads_strictly_into_ddrankings_and_computes_the_same(resolution):
    torch.manual_seed(0)
    ours = create_model("convnet", 10, 3, resolution, 1.0).eval()
    ref = ddr_reference_model("ConvNet-3-BN", 10, resolution).eval()
    ref.load_state_dict(_ddr_convnet(ours.state_dict()), strict=True)
    x = torch.randn(4, 3, resolution, resolution)
    assert torch.allclose(ours(x), ref.classifier(torch.flatten(ref.features(x), 1)), atol=1e-5)


def test_a_resnet18_with_the_small_stem_loads_into_torchvisions_as_ddranking_builds_it():
    ours = create_model("resnet18", 200, 3, 32, 1.0)
    ddr_reference_model("ResNet-18-BN", 200, 32).load_state_dict(ours.state_dict(), strict=True)


def _tiny_imagenet(root: Path, per_class_train: int = 2) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(200, 3))
    for split, n in (("train", per_class_train), ("val", 1)):
        for c in range(200):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(colours[c] + rng.normal(0, 20, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")


@pytest.mark.slow
@pytest.mark.skipif(not DDR_PYTHON.exists() and not IN_CI,
                    reason="no ddranking environment: bash scripts/setup.sh --tests")
def test_ddrankings_own_evaluator_scores_an_export(cli, tmp_path):
    assert DDR_PYTHON.exists(), f"CI must have {DDR_PYTHON} (.ci/run runs scripts/setup.sh --tests)"
    data = tmp_path / "tiny"
    _tiny_imagenet(data)
    common = ["--dataset", "imagefolder", "--data-root", data, "--device", "cpu"]
    assert cli(["squeeze", *common, "--arch", "convnet", "--width", "1", "--epochs", "1", "--batch-size", "100",
                "--out", tmp_path / "zoo"]) == 0
    assert cli(["recover", *common, "--method", "sre2l", "--teachers", tmp_path / "zoo", "--ipc", "1",
                "--iterations", "2", "--batch-size", "200", "--out", tmp_path / "set"]) == 0
    # Fashion-MNIST's refusal names the dataset; this set needs DD-Ranking's name for it
    assert cli(["export", tmp_path / "set", "--out", tmp_path / "x"]) == 2 and not (tmp_path / "x").exists()
    assert cli(["export", tmp_path / "set", "--as-dataset", "TinyImageNet", "--student", "resnet18",
                "--real-data", data, "--num-eval", "1", "--epochs", "2", "--device", "cpu",
                "--out", tmp_path / "export"]) == 0
    out = tmp_path / "export"
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{c:05d}" for c in range(200)]
    assert (out / "teachers" / "TinyImageNet" / "ConvNet-3-BN" / "ckpt_best.pt").exists()
    config = yaml.safe_load((out / "ddranking.yaml").read_text())
    assert config["model_name"] == "ResNet-18-BN" and config["soft_label_mode"] == "M"
    assert "score_with_ddranking.py" in (out / "README.md").read_text()

    # DD-Ranking's own code, in its own environment, on the folder as written
    proc = subprocess.run([str(DDR_PYTHON), "score_with_ddranking.py"], cwd=out, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = dict(re.findall(r"^(LRS|ARS) (\{.*\})$", proc.stdout, flags=re.M))
    assert set(found) == {"LRS", "ARS"}, proc.stdout[-2000:]
    got = {k: ast.literal_eval(re.sub(r"np\.float64\(([^)]*)\)", r"\1", v)) for k, v in found.items()}
    r = got["LRS"]
    # DD-Ranking's LRS is its formula on percentage points (core/scores.py units="percent"): checked on its numbers
    ours = lrs(46.4, 46.4 - r["hard_label_recovery_mean"], r["improvement_over_random_mean"], 0.0, units="percent")
    assert r["label_robust_score_mean"] == pytest.approx(ours["score"], abs=1e-4)
    assert "augmentation_robust_score_mean" in got["ARS"] or any("ars" in k for k in got["ARS"]), got["ARS"]
