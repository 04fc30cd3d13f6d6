"""DWA: directed weight adjustment of the teacher before each batch (Du et al., NeurIPS 2024).

Reference: github.com/AngusDujw/Diversity-Driven-Synthesis @ c5b125f (distillation/perterb.py,
distillation/distillation_imgnet.py). Before a batch is optimised, the teacher's weights take ``steps`` ascent
steps on the cross-entropy of the batch's starting images (real images of the batch's classes) under one
augmented view; every step moves ALL parameters (BatchNorm affine ones included, running statistics not)
by ``rho / steps`` along the globally L2-normalised gradient:

    w <- w + (rho / K) * g / (||g||_2 + 1e-12),   g = d CE(f_w(A(x0)), y) / d w,   K times

so the total displacement is at most ``rho``. The batch is then synthesised through the adjusted teacher, and
the weights are restored bit-exactly afterwards (also when the batch fails).

The reference's BN term weights the variance part by ``--r-var``:
||running_var - var||_2 * r_var + ||running_mean - mean||_2 per layer. The engine's R_BN has weight 1 on both
parts, so this plug-in adds (r_var - 1) * sum_l w_l ||running_var_l - var_l||_2 for the primary, with the
engine's BN weight and teacher averaging (``var_weight_term``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.augment import apply_views, jitter, sample_views, scale_jitter
from ..core.bn import channel_var_mean
from ..core.models import batchnorm_layers
from ..core.runtime import make_generator
from .base import PLUGINS, Plugin


def adjust_weights(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, steps: int
                   ) -> list[float]:
    """DWA's weight adjustment, in place: ``steps`` normalised CE-ascent steps of length ``rho / steps`` on
    every parameter of ``model`` (``perterb.py`` first_step). Returns the gradient norm of each step.
    The caller saves and restores the weights."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    norms = []
    try:
        for p in params:
            p.requires_grad_(True)
        step = rho / steps
        for _ in range(steps):
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            used = [(p, g) for p, g in zip(params, grads) if g is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in used]))
            scale = step / (norm + 1e-12)
            with torch.no_grad():
                for p, g in used:
                    p.add_(g * scale.to(g.dtype))
            norms.append(float(norm))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return norms


def var_deviation(x: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """||running_var - var(x)||_2 with the biased per-channel variance (``channel_var_mean``, fp32)."""
    return torch.linalg.vector_norm(running_var.float() - channel_var_mean(x)[0])


@PLUGINS.register("dwa")
class DWA(Plugin):
    name = "dwa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = self.teachers[self.cfg.primary].model
        self.saved: list[torch.Tensor] | None = None
        self.handles: list = []
        self.var_terms: list[torch.Tensor] = []
        self.collect = False
        self.norms: list[float] = []

    def prepare(self, out, rank: int = 0) -> dict:
        return {"teacher": self.cfg.primary, "rho": self.cfg.dwa_rho, "steps": self.cfg.dwa_steps,
                "var_weight": self.cfg.dwa_var_weight}

    def view(self, b: int, x: torch.Tensor) -> torch.Tensor:
        """The augmented starting images the adjustment is computed on: one crop/flip/roll drawn from
        (seed, 'dwa', b) with the run's view settings (the reference uses its first iteration's view)."""
        cfg = self.cfg
        gen = make_generator(cfg.seed, "dwa", b)
        views = sample_views(len(x), gen, cfg.crop_scale, flip=cfg.flip, per=cfg.crop_per)
        limit = cfg.jitter if cfg.jitter is not None else scale_jitter(self.info.resolution)
        return jitter(apply_views(x, views), limit, gen, cfg.jitter_mode)

    def begin_batch(self, b, units, x):
        cfg = self.cfg
        if cfg.dwa_rho > 0:
            self.saved = [p.detach().clone(memory_format=torch.preserve_format) for p in self.model.parameters()]
            y = torch.tensor([c for c, _ in units], device=x.device)
            self.norms = adjust_weights(self.model, self.view(b, x.detach()), y, cfg.dwa_rho, cfg.dwa_steps)
        if cfg.dwa_var_weight != 1.0 and cfg.alpha_bn > 0:
            for i, (_, bn) in enumerate(batchnorm_layers(self.model)):
                w = cfg.first_bn_multiplier if i == 0 else 1.0

                def hook(module, inputs, w=w):
                    if self.collect:
                        self.var_terms.append(w * var_deviation(inputs[0], module.running_var))

                self.handles.append(bn.register_forward_pre_hook(hook))
            self.collect = True

    def losses(self, engine, xa, y, b, it, logits):
        terms, self.var_terms = self.var_terms, []
        primary = self.cfg.primary
        col = engine.collectors.get(primary)
        if not terms or primary not in logits or col is None or not col.active:
            return {}
        n_bn = sum(1 for a in logits if a in engine.collectors and engine.collectors[a].active)
        return {"dwa_var": var_weight_term(terms, self.cfg.dwa_var_weight, self.cfg.alpha_bn, n_bn,
                                           col.scale)}

    def end_batch(self, b, record):
        self.collect = False
        self.var_terms = []
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.saved is not None:
            with torch.no_grad():
                moved = torch.linalg.vector_norm(torch.stack([
                    torch.linalg.vector_norm((p.detach() - s).float())
                    for p, s in zip(self.model.parameters(), self.saved)]))
                for p, s in zip(self.model.parameters(), self.saved):
                    p.copy_(s)
            record["dwa"] = {"grad_norms": [round(n, 6) for n in self.norms], "displacement": round(float(moved), 8)}
            self.saved = None


def var_weight_term(terms: list[torch.Tensor], var_weight: float, alpha_bn: float, n_bn: int,
                    layer_scale: float = 1.0) -> torch.Tensor:
    """The extra variance part: alpha_BN * (r_var - 1) * layer_scale * sum_l w_l ||rv_l - var_l|| / n_bn, so the
    primary's share of the engine's BN mean becomes the reference's ||rv - var|| * r_var + ||rm - mean||."""
    return alpha_bn * (var_weight - 1.0) * layer_scale * torch.stack(terms).sum() / max(1, n_bn)
