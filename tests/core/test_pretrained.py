"""--pretrained: torchvision weights enums (IMAGENET1K_V1 = the reference's ``pretrained=True``), the offline
torch-hub cache, and per-architecture weight files. Nothing is downloaded: state dicts are saved locally."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision.models as tvm

from prismdd.core.errors import PrismError
from prismdd.core.models import ARCHS, create_model, hub_cache_file, resolve_pretrained, torchvision_weights


def _save(state, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_weights_enum_names():
    e = ARCHS.get("mobilenet_v2")
    assert torchvision_weights("mobilenet_v2", e) is tvm.MobileNet_V2_Weights.IMAGENET1K_V1
    assert torchvision_weights("mobilenet_v2", e, "DEFAULT") is tvm.MobileNet_V2_Weights.IMAGENET1K_V2
    assert torchvision_weights("resnet50", ARCHS.get("resnet50"), "IMAGENET1K_V2") is tvm.ResNet50_Weights.IMAGENET1K_V2
    with pytest.raises(PrismError, match="IMAGENET1K_V1"):
        torchvision_weights("mobilenet_v2", e, "IMAGENET1K_V9")
    assert resolve_pretrained("resnet18", "torchvision") is True
    assert resolve_pretrained("resnet18", "resnet18=a.pth, mobilenet_v2=torchvision:DEFAULT") == "a.pth"
    assert resolve_pretrained("mobilenet_v2", "resnet18=a.pth,mobilenet_v2=torchvision:DEFAULT") == "torchvision:DEFAULT"
    with pytest.raises(PrismError, match="no weights given for alexnet"):
        resolve_pretrained("alexnet", "resnet18=a.pth")


def test_true_loads_v1_from_the_offline_hub_cache(hub):
    # only the V1 file is in the cache: .DEFAULT (V2 for MobileNet-V2) would need a download and fail
    src = tvm.mobilenet_v2(num_classes=1000)
    v1 = tvm.MobileNet_V2_Weights.IMAGENET1K_V1
    path = _save(src.state_dict(), str(hub / os.path.basename(v1.url)))
    assert hub_cache_file(v1) == path
    for spec in (True, "torchvision:IMAGENET1K_V1"):
        m = create_model("mobilenet_v2", 1000, 3, 224, pretrained=spec)
        for k, v in src.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k


def test_any_enum_member_from_the_cache(hub):
    src = tvm.shufflenet_v2_x0_5(num_classes=1000)
    w = tvm.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1
    _save(src.state_dict(), str(hub / os.path.basename(w.url)))
    m = create_model("shufflenet_v2_x0_5", 10, 3, 224, pretrained="torchvision:DEFAULT")  # DEFAULT is V1 here
    assert torch.equal(m.conv1[0].weight, src.conv1[0].weight)
    assert m.fc.out_features == 10  # the head is replaced for the dataset


def test_per_architecture_weight_files(tmp_path):
    a = tvm.shufflenet_v2_x0_5(num_classes=1000)
    b = tvm.shufflenet_v2_x1_0(num_classes=1000)
    fa = _save(a.state_dict(), str(tmp_path / "a.pth"))
    fb = _save({"state_dict": b.state_dict()}, str(tmp_path / "b.pth"))
    spec = f"shufflenet_v2_x0_5={fa},shufflenet_v2_x1_0={fb}"
    ma = create_model("shufflenet_v2_x0_5", 1000, 3, 224, pretrained=spec)
    mb = create_model("shufflenet_v2_x1_0", 1000, 3, 224, pretrained=spec)
    assert torch.equal(ma.conv1[0].weight, a.conv1[0].weight)
    assert torch.equal(mb.conv1[0].weight, b.conv1[0].weight)
    assert torch.equal(mb.fc.weight, b.fc.weight)
    with pytest.raises(PrismError, match="no weights given for mobilenet_v2"):
        create_model("mobilenet_v2", 10, 3, 224, pretrained=spec)
    with pytest.raises(PrismError, match="do not match"):  # a file of the wrong architecture
        create_model("shufflenet_v2_x0_5", 10, 3, 224, pretrained=f"shufflenet_v2_x0_5={fb}")
