"""Parametrisations: how recovery holds a batch of images while it optimises them (``--param``).

Every recovery method (SRe2L, PRISM, CDA, ...) computes its losses on the rendered images; the parametrisation
decides what the optimiser moves. ``pixels`` is the engine's own (every pixel a parameter, clamped to the valid
range after each step). ``multires`` is Direct Ascent Synthesis (Fort & Whitaker 2025, arXiv 2502.07753), which
the seed's appendix D combines with SRe2L ("multi-resolution DeepInversion", seed Table 5):

    image = (tanh(raw0 + sum_s up_s(P_s)) + 1) / 2        (in [0, 1], then the dataset's normalisation)

with one component P_s of side s for every s in 1, 1 + step, 1 + 2 step, ... and the full side, each upsampled to
the full side (nearest for the 1 x 1 component, bicubic otherwise) and summed; components start at zero and raw0 is
the starting image mapped through artanh, so the first render is the starting image. What is taken from DAS and
what prismdd chose is in FIDELITY.md, "Appendices D and E".

A parametrisation is a registry entry, not a branch in the engine: ``init`` makes the leaves (each of shape
(B, ...), so the engine's per-image Adam applies to each), ``render`` maps them to normalised images (differentiably),
``project`` keeps them valid after a step, ``lr_scale`` scales the engine's learning rate per leaf.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core.config import opt
from ..core.data import denormalize, pixel_bounds
from ..core.errors import PrismError
from ..core.registry import Registry
from .base import Options, options

EPS = 1e-5  # a starting pixel at exactly 0 or 1 would need an infinite raw value


class Param:
    """Pixels: the images themselves are the parameters (the engine's default)."""

    name: ClassVar[str] = "pixels"
    # plain gradient steps (x -= lr * g) instead of the engine's per-image Adam
    sgd: bool = False

    def __init__(self, cfg, info, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.lo, self.hi = pixel_bounds(info, device)

    def init(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """Leaves to optimise from normalised starting images ``x0`` (B, C, R, R); fresh tensors, never ``x0``."""
        return [x0.detach().clone().requires_grad_(True)]

    def render(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        """Normalised images (B, C, R, R) from the leaves, differentiable."""
        return leaves[0]

    def lr_scale(self, i: int) -> float:
        return 1.0

    @torch.no_grad()
    def project(self, leaves: list[torch.Tensor]) -> None:
        leaves[0].clamp_(self.lo, self.hi)  # stay a valid image

    def describe(self) -> dict:
        """Provenance for the manifest."""
        return {"name": self.name}


PARAMS: Registry[type[Param]] = Registry("parametrisation")
PARAMS.register("pixels", Param)


def multires_sides(side: int, step: int) -> list[int]:
    """1, 1 + step, 1 + 2 step, ... below ``side``, and ``side`` itself (so the sum can hold any image)."""
    return sorted(set(range(1, side + 1, step)) | {side})


def upsample(p: torch.Tensor, side: int) -> torch.Tensor:
    """A component at the full side: nearest for 1 x 1 (a constant), bicubic otherwise (DAS), itself at full size."""
    if p.shape[-1] == side:
        return p
    if p.shape[-1] == 1:
        return p.expand(-1, -1, side, side)  # nearest upsampling of one pixel: the same value everywhere
    return F.interpolate(p, size=(side, side), mode="bicubic", align_corners=False)


def bicubic_matrix(s: int, side: int, device=None) -> torch.Tensor:
    """(side, s) matrix A with ``upsample(P) == A @ P @ A.T``: bicubic interpolation is separable, so one axis's
    weights (the interpolation of the identity's columns) give the whole 2-D upsampling as two matrix products,
    ~3x faster than ``F.interpolate`` forward and backward on a CPU at 224 px (BENCHMARKS.md section 13)."""
    cols = F.interpolate(torch.eye(s, device=device).view(s, 1, s, 1), size=(side, 1), mode="bicubic",
                         align_corners=False)
    return cols.view(s, side).T.contiguous()


@options("multires", kind="param")
class MultiResOptions(Options):
    """The multi-resolution parametrisation's settings (``--param multires``; any optimising method)."""

    @staticmethod
    def in_use(cfg) -> str | None:
        return "--param multires" if cfg.param == "multires" else None

    multires_step: int = opt(4, "multires: component sides 1, 1 + step, 1 + 2 step, ... and always the full side (DAS: "
                                "range(1, side + 1, 4)); 1 = every side", minimum=1)
    multires_optimizer: str = opt("engine", "multires: engine (the method's Adam, schedule and budget on every component, "
                                            "its LR divided by the number of components) | sgd (DAS: plain gradient "
                                            "steps of size --lr, the same cosine; coarse components, which gather the "
                                            "gradient of many pixels, move first)", choices=("engine", "sgd"))
    @staticmethod
    def check(cfg) -> None:
        # options that would change nothing are refused, not passed over in silence
        if cfg.param != "multires":
            for flag, value, off in (("--multires-step", cfg.multires_step, 4),
                                     ("--multires-optimizer", cfg.multires_optimizer, "engine")):
                if value != off:
                    raise PrismError(f"{flag} {value}: only --param multires uses it (this run holds pixels); drop "
                                     f"it or add --param multires")


@PARAMS.register("multires")
class MultiRes(Param):
    """Direct Ascent Synthesis' multi-resolution sum, squashed into [0, 1] by tanh."""

    name = "multires"

    def __init__(self, cfg, info, device):
        super().__init__(cfg, info, device)
        self.sides = multires_sides(info.resolution, cfg.multires_step)
        self.sgd = cfg.multires_optimizer == "sgd"
        self.raw0: torch.Tensor | None = None
        self.mats = {s: bicubic_matrix(s, info.resolution, device) for s in self.sides if 1 < s < info.resolution}
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)

    def init(self, x0):
        u = denormalize(x0.detach().float(), self.info).clamp(EPS, 1 - EPS)
        self.raw0 = torch.atanh(2 * u - 1)  # fixed: the render of all-zero components is the starting image
        b, c = x0.shape[:2]
        return [torch.zeros(b, c, s, s, device=x0.device, requires_grad=True) for s in self.sides]

    def render(self, leaves):
        side = self.info.resolution
        total = self.raw0
        for p in leaves:
            a = self.mats.get(p.shape[-1])
            total = total + (upsample(p, side) if a is None else a @ p @ a.T)  # the same bicubic, as two products
        u = (torch.tanh(total) + 1) / 2
        return (u - self.mean) / self.std

    def lr_scale(self, i):
        # Adam moves every component by about lr per step whatever its gradient, so n components in step would move
        # a pixel n times as far as the pixel parametrisation does; the engine's LR is divided among them. Plain SGD
        # (DAS) keeps the full LR: there a component's step is the gradient it gathered from all the pixels it covers.
        return 1.0 if self.sgd else 1.0 / len(self.sides)

    def project(self, leaves):
        pass  # tanh keeps every render inside [0, 1]

    def describe(self):
        return {"name": self.name, "sides": self.sides, "optimizer": "sgd" if self.sgd else "engine",
                "lr_scale": self.lr_scale(0), "squash": "(tanh(raw0 + sum) + 1) / 2",
                "upsample": "nearest for 1 px, bicubic otherwise (as separable matrix products)"}
