"""Architecture registry: ``create_model(name, num_classes=..., in_channels=..., resolution=...)``.

One code path adapts every torchvision classifier to a dataset (input channels, classes, a small-image
stem below 64 px, a width multiplier where the family has one); no per-architecture copies.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision.models as tvm

from .registry import Registry
from .errors import PrismError
from .io import load_tensors, torch_load
from .zoo import BN_FREE_ARCHS, ZOO, ArchInfo, list_models  # noqa: F401 - BN_FREE_ARCHS, list_models: re-exported

SMALL_IMAGE_THRESHOLD = 64  # below this resolution the ImageNet stem (stride 4) would throw away too much


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored in every teacher card."""

    arch: str
    num_classes: int
    in_channels: int = 3
    resolution: int = 224
    width: float = 1.0
    small_stem: bool | None = None  # None: decided from the resolution

    def resolved_small_stem(self) -> bool:
        return self.resolution < SMALL_IMAGE_THRESHOLD if self.small_stem is None else self.small_stem

    def to_dict(self) -> dict:
        d = asdict(self)
        d["small_stem"] = self.resolved_small_stem()
        return d


@dataclass(frozen=True)
class ArchEntry(ArchInfo):
    """A zoo entry (``core/zoo.py``) with its builder."""

    build: Callable[[int, float], nn.Module] | None = None  # (num_classes, width) -> model at the ImageNet stem


ARCHS: Registry[ArchEntry] = Registry("architecture")


# ----------------------------------------------------------------------------- native nets
class ConvNet(nn.Module):
    """The dataset-distillation ConvNet-D{depth}: [conv3x3 -> norm -> ReLU -> avgpool2] x depth -> linear.

    ``norm='batch'`` makes it usable as a BN teacher; ``'instance'`` is the BN-free variant common as a
    student in the literature.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, resolution: int = 32, width: int = 128,
                 depth: int = 3, norm: str = "batch"):
        super().__init__()
        layers, c, r = [], in_channels, resolution
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=norm == "none"), _norm(norm, width),
                       nn.ReLU(inplace=True)]
            if r >= 2:  # tiny inputs (8 px digits) run out of pixels before they run out of layers
                layers.append(nn.AvgPool2d(2))
                r //= 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * r * r, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "instance":
        return nn.GroupNorm(c, c)  # instance norm with affine parameters, as in the DC/DSA code
    if kind == "none":
        return nn.Identity()
    raise PrismError(f"ConvNet norm {kind!r}: expected batch, instance or none")


class _ScaledResNet(tvm.ResNet):
    """torchvision's ResNet with every stage's width multiplied by ``width`` (forward is inherited)."""

    def __init__(self, block, layers, num_classes: int, width: float = 1.0):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        w = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = w[0]
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, w[0], layers[0])
        self.layer2 = self._make_layer(block, w[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, w[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, w[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _efficientnet(name: str):
    def build(num_classes, width):
        from torchvision.models import efficientnet as ef

        if width == 1.0:
            return getattr(tvm, name)(num_classes=num_classes)
        # torchvision keeps the width-scaled config builder private; fall back to full width if it moves
        try:
            setting, last = ef._efficientnet_conf(name, width_mult=width, depth_mult=1.0)
        except (AttributeError, TypeError):
            raise PrismError(f"{name}: this torchvision version cannot scale width; use width=1") from None
        return ef.EfficientNet(setting, 0.2, last_channel=last, num_classes=num_classes)

    return build


_CONVNET = lambda n, w: None  # noqa: E731 - ConvNets are built by create_model (resolution, channels, depth)
_BUILDERS: dict[str, Callable[[int, float], nn.Module | None]] = {
    "convnet": _CONVNET, "convnet_d4": _CONVNET, "convnet_in": _CONVNET,
    **{name: (lambda b, l: lambda n, w: _ScaledResNet(b, l, n, w))(block, layers)
       for name, block, layers in [("resnet18", tvm.resnet.BasicBlock, [2, 2, 2, 2]),
                                   ("resnet34", tvm.resnet.BasicBlock, [3, 4, 6, 3]),
                                   ("resnet50", tvm.resnet.Bottleneck, [3, 4, 6, 3])]},
    "mobilenet_v2": lambda n, w: tvm.MobileNetV2(num_classes=n, width_mult=w),
    "mnasnet1_0": lambda n, w: tvm.MNASNet(alpha=w, num_classes=n),
    "shufflenet_v2_x0_5": lambda n, w: tvm.shufflenet_v2_x0_5(num_classes=n),
    "shufflenet_v2_x1_0": lambda n, w: tvm.shufflenet_v2_x1_0(num_classes=n),
    "efficientnet_b0": _efficientnet("efficientnet_b0"),
    "alexnet": lambda n, w: tvm.AlexNet(num_classes=n),
}
for _name, _info in ZOO.items():  # every zoo entry gets its builder; a name without one fails at import
    ARCHS.register(_name, ArchEntry(**vars(_info), build=_BUILDERS[_name]))


# ----------------------------------------------------------------------------- construction
def create_model(arch: str, num_classes: int, in_channels: int = 3, resolution: int = 224, width: float = 1.0,
                 small_stem: bool | None = None, pretrained: bool | str = False) -> nn.Module:
    """Build ``arch`` for a dataset. ``pretrained`` (see ``resolve_pretrained``): True = torchvision's
    ``IMAGENET1K_V1`` (what ``pretrained=True`` loads in the reference scripts), ``"torchvision:NAME"`` = any
    member of the architecture's weights enum (``DEFAULT``, ``IMAGENET1K_V2`` ...), read from the torch-hub
    cache (``$TORCH_HOME/hub/checkpoints``) when present, else downloaded; a state-dict file
    (``.pth``/``.safetensors``); or ``"arch=SPEC,arch=SPEC"``, one of those per architecture."""
    spec = ModelSpec(arch, num_classes, in_channels, resolution, width, small_stem)
    if arch.startswith("timm:"):
        model = _create_timm(spec, pretrained)
    elif ARCHS.get(arch).family == "convnet":
        depth = 4 if arch == "convnet_d4" else 3
        norm = "instance" if arch == "convnet_in" else "batch"
        model = ConvNet(num_classes, in_channels, resolution, max(8, int(round(128 * width))), depth, norm)
        if pretrained:
            raise PrismError(f"{arch}: no pretrained weights exist; train it with `prismdd squeeze`")
    else:
        entry = ARCHS.get(arch)
        if width != 1.0 and not entry.has_width:
            raise PrismError(f"{arch}: this family has no width multiplier; use width=1 (or pick the x0_5 variant)")
        if pretrained:
            if width != 1.0:
                raise PrismError(f"{arch}: pretrained weights exist only at width=1")
            model = entry.build(1000, 1.0)
            _load_pretrained(model, arch, entry, pretrained)
            _replace_head(model, num_classes)
        else:
            model = entry.build(num_classes, width)
        _adapt_stem(model, in_channels, spec.resolved_small_stem(), keep_weights=bool(pretrained))
    model.prismdd_spec = spec.to_dict()
    return model


def model_from_spec(spec: dict) -> nn.Module:
    keys = ("arch", "num_classes", "in_channels", "resolution", "width", "small_stem")
    return create_model(**{k: spec[k] for k in keys if k in spec})


def _create_timm(spec: ModelSpec, pretrained) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise PrismError(f"{spec.arch}: timm is not installed; pip install 'prismdd[timm]'") from None
    name = spec.arch.split(":", 1)[1]
    kwargs = dict(num_classes=spec.num_classes, in_chans=spec.in_channels, pretrained=bool(pretrained))
    if "vit" in name or "deit" in name:
        kwargs["img_size"] = spec.resolution
        kwargs["patch_size"] = max(2, spec.resolution // 8) if spec.resolution < 64 else 16
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        raise PrismError(f"{spec.arch}: {e}") from None


TV_PREFIX = "torchvision:"
REFERENCE_WEIGHTS = "IMAGENET1K_V1"  # torchvision's `pretrained=True`, as the SRe2L/PRISM scripts load them


def resolve_pretrained(arch: str, pretrained: bool | str) -> bool | str:
    """This architecture's entry of a per-architecture ``"arch=SPEC,arch=SPEC"`` list (a plain spec applies
    to every architecture); ``"torchvision"`` alone means the reference's ``IMAGENET1K_V1``."""
    if not isinstance(pretrained, str):
        return pretrained
    if "=" in pretrained and not os.path.exists(pretrained):
        table = {}
        for item in (p.strip() for p in pretrained.split(",") if p.strip()):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise PrismError(f"--pretrained {pretrained!r}: expected arch=FILE_OR_torchvision:NAME pairs, "
                                 f"comma separated, e.g. resnet18=r18.pth,mobilenet_v2=torchvision:IMAGENET1K_V1")
            table[key.strip()] = value.strip()
        if arch not in table:
            raise PrismError(f"--pretrained: no weights given for {arch} (given for {', '.join(table)}); "
                             f"add {arch}=FILE or {arch}=torchvision:{REFERENCE_WEIGHTS}")
        pretrained = table[arch]
    return True if pretrained == "torchvision" else pretrained


def torchvision_weights(arch: str, entry: ArchEntry, name: str = REFERENCE_WEIGHTS):
    """The member ``name`` of ``arch``'s torchvision weights enum (e.g. ResNet18_Weights.IMAGENET1K_V1)."""
    enum = getattr(tvm, entry.tv_weights)
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise PrismError(f"--pretrained torchvision:{name}: {arch} has no such weights; choose from "
                         f"{', '.join(['DEFAULT'] + [m.name for m in enum])}") from None


def hub_cache_file(weights) -> str:
    """Where torch.hub keeps (and looks for) a torchvision weights file: $TORCH_HOME/hub/checkpoints/<name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _load_pretrained(model: nn.Module, arch: str, entry: ArchEntry, pretrained: bool | str) -> None:
    pretrained = resolve_pretrained(arch, pretrained)
    if isinstance(pretrained, str) and not pretrained.startswith(TV_PREFIX):
        state = load_state_dict_file(pretrained)
    else:
        name = pretrained[len(TV_PREFIX):] if isinstance(pretrained, str) else REFERENCE_WEIGHTS
        weights = torchvision_weights(arch, entry, name)
        cached = hub_cache_file(weights)
        try:  # torch.hub reads the cached file without any network access when it is there
            state = weights.get_state_dict(progress=not os.path.exists(cached))
        except OSError as e:  # URLError, no network
            raise PrismError(f"--pretrained: {arch} weights {weights} are not in the torch-hub cache {cached} and "
                             f"could not be downloaded ({e}); copy the file there or pass {arch}=FILE") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise PrismError(f"{arch}: pretrained weights do not match the architecture "
                         f"({str(e).splitlines()[-1].strip()[:160]})") from None
    if missing or unexpected:
        raise PrismError(f"{arch}: pretrained weights do not match the architecture "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def load_state_dict_file(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        return load_tensors(path)
    state = torch_load(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _first(model: nn.Module, kind) -> tuple[nn.Module, str, nn.Module] | None:
    for name, mod in model.named_modules():
        if isinstance(mod, kind):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, mod
    return None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if old.out_features != num_classes:
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def _adapt_stem(model: nn.Module, in_channels: int, small: bool, keep_weights: bool) -> None:
    """Replace the first conv for the input channels / small images, and drop the first max-pool if small."""
    parent, attr, conv = _first(model, nn.Conv2d)
    if small:
        new = nn.Conv2d(in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
        if keep_weights:
            warnings.warn("small-image stem: the pretrained first convolution is re-initialised")
        setattr(parent, attr, new)
        pool = _first(model, nn.MaxPool2d)
        if pool is not None:
            setattr(pool[0], pool[1], nn.Identity())
    elif in_channels != conv.in_channels:
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None)
        if keep_weights:  # grey input: the summed RGB filters respond to grey images as the originals did
            with torch.no_grad():
                new.weight.copy_(conv.weight.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
        setattr(parent, attr, new)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


class FeatureExtractor:
    """Penultimate features (the input of the last Linear layer) through a forward hook, for any model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store = {}
        h = self.head.register_forward_pre_hook(lambda m, inp: store.__setitem__("f", inp[0].flatten(1)))
        try:
            logits = self.model(x)
        finally:
            h.remove()
        return store["f"], logits
