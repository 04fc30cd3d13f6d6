"""What the architecture registry holds, without torch: names, families, descriptions, whether each has
BatchNorm, a width multiplier and torchvision weights. ``core/models.py`` attaches a builder to every entry;
``prismdd models`` lists this table without waiting for torch to import (cli.py)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .registry import Registry


@dataclass(frozen=True)
class ArchInfo:
    description: str
    family: str
    has_width: bool = True
    tv_weights: str | None = None  # torchvision weights enum name, for --pretrained
    batchnorm: bool = True  # False: never a BN teacher (it would add 0 to the BN mean while counting in it)


ZOO: Registry[ArchInfo] = Registry("architecture")
ZOO.register("convnet", ArchInfo("ConvNet-D3 (width 128 x width), BatchNorm", "convnet"))
ZOO.register("convnet_d4", ArchInfo("ConvNet-D4 (for 64 px and up), BatchNorm", "convnet"))
ZOO.register("convnet_in", ArchInfo("ConvNet-D3 with instance norm (BN-free: a student, never a BN teacher)",
                                    "convnet", batchnorm=False))
for _name in ("resnet18", "resnet34", "resnet50"):
    ZOO.register(_name, ArchInfo(f"torchvision {_name}, stage widths x width", "resnet", True,
                                 f"ResNet{_name[6:]}_Weights"))
ZOO.register("mobilenet_v2", ArchInfo("torchvision MobileNet-V2 (width_mult)", "mobilenet", True,
                                      "MobileNet_V2_Weights"))
ZOO.register("mnasnet1_0", ArchInfo("torchvision MNASNet (alpha = width)", "mnasnet", True, "MNASNet1_0_Weights"))
ZOO.register("shufflenet_v2_x0_5", ArchInfo("torchvision ShuffleNet-V2 x0.5", "shufflenet", False,
                                            "ShuffleNet_V2_X0_5_Weights"))
ZOO.register("shufflenet_v2_x1_0", ArchInfo("torchvision ShuffleNet-V2 x1.0", "shufflenet", False,
                                            "ShuffleNet_V2_X1_0_Weights"))
ZOO.register("efficientnet_b0", ArchInfo("torchvision EfficientNet-B0 (width_mult)", "efficientnet", True,
                                         "EfficientNet_B0_Weights"))
ZOO.register("alexnet", ArchInfo("torchvision AlexNet (BN-free: never a BN teacher)", "alexnet", False,
                                 "AlexNet_Weights", batchnorm=False))

BN_FREE_ARCHS = tuple(n for n, e in ZOO.items() if not e.batchnorm)  # the zoo's architectures without BatchNorm


def list_models() -> list[dict]:
    """``prismdd models``: one row per architecture, plus timm's models when timm is installed (looked up, not
    imported: importing timm imports torch)."""
    rows = [{"name": n, "family": e.family, "description": e.description, "batchnorm": e.batchnorm,
             "pretrained": bool(e.tv_weights)} for n, e in ZOO.items()]
    timm = importlib.util.find_spec("timm") is not None
    rows.append({"name": "timm:<name>", "family": "timm", "batchnorm": None, "pretrained": False,
                 "description": "any timm model (timm installed)" if timm else
                 "any timm model (pip install 'prismdd[timm]')"})
    return rows
