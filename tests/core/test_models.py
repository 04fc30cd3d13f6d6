"""Architecture registry: every model adapts to channels / classes / small images the same way."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from prismdd.core.models import ARCHS, FeatureExtractor, create_model, has_batchnorm, list_models, model_from_spec
from prismdd.core.errors import UnknownNameError
from prismdd.core.errors import PrismError

ALL = ARCHS.names()
BN_FREE = {"convnet_in", "alexnet"}


def _width(arch: str) -> float:
    return 0.25 if ARCHS.get(arch).has_width else 1.0


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pools(model: nn.Module) -> int:
    return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_registry_has_the_expected_families():
    assert {"convnet", "convnet_in", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "mnasnet1_0",
            "shufflenet_v2_x1_0", "alexnet"} <= set(ALL)


@pytest.mark.parametrize("arch", ALL)
def test_logits_shape_grey_16px(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, in_channels=1, resolution=16, width=_width(arch)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert _first_conv(model).in_channels == 1
    spec = model.prismdd_spec
    assert (spec["arch"], spec["num_classes"], spec["in_channels"], spec["resolution"]) == (arch, 7, 1, 16)
    assert spec["small_stem"] is True


@pytest.mark.parametrize("arch", ALL)
def test_small_image_stem(arch):
    model = create_model(arch, num_classes=5, in_channels=1, resolution=16, width=_width(arch))
    conv = _first_conv(model)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    if arch == "alexnet":  # only the stem's max-pool goes; the later ones are part of the body
        assert _pools(model) == _pools(torchvision.models.AlexNet()) - 1 == 2
    else:
        assert _pools(model) == 0


@pytest.mark.parametrize("arch", [a for a in ALL if not a.startswith("convnet")])
def test_imagenet_stem_kept_at_64px(arch):
    ref = ARCHS.get(arch).build(5, _width(arch))  # the unmodified torchvision network
    model = create_model(arch, num_classes=5, in_channels=1, resolution=64, width=_width(arch))
    conv, ref_conv = _first_conv(model), _first_conv(ref)
    assert conv.stride == ref_conv.stride and conv.stride[0] >= 2
    assert conv.kernel_size == ref_conv.kernel_size
    assert conv.in_channels == 1 and conv.out_channels == ref_conv.out_channels
    assert _pools(model) == _pools(ref)
    assert model.prismdd_spec["small_stem"] is False
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 5)


def test_small_stem_can_be_forced():
    big = create_model("resnet18", 4, 3, resolution=16, width=0.25, small_stem=False)
    assert _first_conv(big).stride == (2, 2) and _pools(big) == 1
    small = create_model("resnet18", 4, 3, resolution=128, width=0.25, small_stem=True)
    assert _first_conv(small).stride == (1, 1) and _pools(small) == 0


@pytest.mark.parametrize("arch", [a for a in ALL if ARCHS.get(a).has_width])
def test_width_multiplier_shrinks_the_model(arch):
    half = create_model(arch, 10, 3, 32, width=0.5)
    full = create_model(arch, 10, 3, 32, width=1.0)
    assert _n_params(half) < 0.6 * _n_params(full)
    assert half.prismdd_spec["width"] == 0.5


@pytest.mark.parametrize("arch", [a for a in ALL if not ARCHS.get(a).has_width])
def test_width_on_family_without_one_raises(arch):
    with pytest.raises(PrismError, match="width"):
        create_model(arch, 10, 3, 32, width=0.5)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UnknownNameError) as ei:
        create_model("resnet19", 10)
    assert "resnet18" in str(ei.value) and "mobilenet_v2" in str(ei.value)


def test_misspelt_convnet_is_rejected():
    with pytest.raises((UnknownNameError, PrismError)):
        create_model("convnet_d5", 10, 1, 8)


@pytest.mark.parametrize("arch", ALL)
def test_has_batchnorm_and_listing_agree(arch):
    model = create_model(arch, 10, 1, 16, width=_width(arch))
    assert has_batchnorm(model) == (arch not in BN_FREE)
    row = next(r for r in list_models() if r["name"] == arch)
    assert row["batchnorm"] == has_batchnorm(model)


def test_model_from_spec_roundtrip():
    m = create_model("mobilenet_v2", 10, 1, 8, width=0.25)
    m2 = model_from_spec(m.prismdd_spec)
    assert m2.prismdd_spec == m.prismdd_spec
    m2.load_state_dict(m.state_dict())  # identical structure


# ----------------------------------------------------------------------------- pretrained weights files
@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()  # random weights in torchvision's layout
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_from_file_loads_weights_and_replaces_head(r18_weights):
    path, state = r18_weights
    m = create_model("resnet18", num_classes=10, in_channels=3, resolution=224, pretrained=str(path))
    for key in ("layer3.0.conv1.weight", "layer4.1.bn2.running_var", "conv1.weight"):
        assert torch.equal(m.state_dict()[key], state[key]), key
    assert m.fc.out_features == 10 and m.fc.in_features == 512
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_pretrained_from_safetensors_and_state_dict_wrapper(r18_weights, tmp_path):
    from safetensors.torch import save_file

    _, state = r18_weights
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    m = create_model("resnet18", 1000, 3, 224, pretrained=str(st))
    assert torch.equal(m.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])
    assert m.fc.out_features == 1000 and torch.equal(m.fc.weight, state["fc.weight"])  # head kept at 1000
    wrapped = tmp_path / "w.pth"
    torch.save({"state_dict": state}, wrapped)
    m = create_model("resnet18", 3, 3, 224, pretrained=str(wrapped))
    assert torch.equal(m.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_pretrained_mismatch_and_width_errors(r18_weights):
    path, _ = r18_weights
    with pytest.raises(PrismError, match="do not match"):
        create_model("resnet34", 10, 3, 224, pretrained=str(path))
    with pytest.raises(PrismError, match="width=1"):
        create_model("resnet18", 10, 3, 224, width=0.5, pretrained=str(path))
    with pytest.raises(PrismError, match="no pretrained"):
        create_model("convnet", 10, 3, 32, pretrained=str(path))


def test_pretrained_grey_stem_matches_rgb_response(r18_weights):
    path, state = r18_weights
    m = create_model("resnet18", 10, in_channels=1, resolution=224, pretrained=str(path))
    g = torch.rand(2, 1, 32, 32)
    ref = nn.functional.conv2d(g.repeat(1, 3, 1, 1), state["conv1.weight"], stride=2, padding=3)
    with torch.no_grad():
        torch.testing.assert_close(m.conv1(g), ref, rtol=1e-4, atol=1e-5)


def test_pretrained_small_stem_warns(r18_weights):
    path, state = r18_weights
    with pytest.warns(UserWarning, match="re-initialised"):
        m = create_model("resnet18", 10, 1, 32, pretrained=str(path))
    assert _first_conv(m).stride == (1, 1)
    assert torch.equal(m.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])  # the body is kept


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("arch", ["convnet", "resnet18", "mobilenet_v2", "alexnet"])
def test_feature_extractor_returns_penultimate_features(arch):
    torch.manual_seed(0)
    model = create_model(arch, 6, 1, 16, width=_width(arch)).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    x = torch.randn(4, 1, 16, 16)
    feats, logits = FeatureExtractor(model)(x)
    assert feats.shape == (4, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(head(feats), logits)
    # no hook is left behind
    assert not head._forward_pre_hooks
