"""BatchNorm-statistics alignment (R_BN) through forward pre-hooks, in a context manager.

R_BN(t, x) = sum_l w_l (||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2), where mu_l and
var_l are the per-channel mean and *biased* variance of layer l's INPUT over every dim but channels,
w_0 = first_bn_multiplier, w_l = 1 otherwise (``layer_reduce='mean'`` divides by the number of layers).
``torch.var_mean`` computes both in one pass: the cheapest form measured on CPU.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .models import batchnorm_layers


class BNCollector:
    """Accumulates one teacher's R_BN during a forward pass; ``active=False`` makes the hooks free."""

    def __init__(self, n_layers: int, layer_reduce: str = "sum"):
        self.terms: list[torch.Tensor] = []
        self.active = True
        self.scale = 1.0 / n_layers if layer_reduce == "mean" else 1.0

    def reset(self) -> None:
        self.terms = []

    def total(self) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("no BatchNorm layer saw an input: was the teacher run with hooks active?")
        return torch.stack(self.terms).sum() * self.scale


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean of ``x`` over every dim but channels (dim 1), in float32.

    Always in float32: under autocast a layer's input arrives in bf16/fp16 and ``var_mean`` has no
    autocast rule, so without the cast the statistics would be computed in half precision. The reference
    computes them in fp32 (it never uses autocast)."""
    dims = [0] + list(range(2, x.ndim))  # (N, H, W) for images, (N,) for BatchNorm1d
    with torch.autocast(x.device.type, enabled=False):
        return torch.var_mean(x.float(), dim=dims, unbiased=False)


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """||mu(x) - running_mean||_2 + ||var(x) - running_var||_2, in float32 (``channel_var_mean``)."""
    var, mean = channel_var_mean(x)
    with torch.autocast(x.device.type, enabled=False):
        return (torch.linalg.vector_norm(mean - running_mean.float())
                + torch.linalg.vector_norm(var - running_var.float()))


@contextmanager
def bn_hooks(model: nn.Module, first_bn_multiplier: float = 10.0, layer_reduce: str = "sum"):
    """Register R_BN hooks on every BatchNorm layer of ``model``; always removed on exit."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("model has no BatchNorm layers")
    col = BNCollector(len(layers), layer_reduce)
    handles = []
    for i, (_, bn) in enumerate(layers):
        weight = first_bn_multiplier if i == 0 else 1.0

        def hook(module, inputs, weight=weight):
            if col.active:
                col.terms.append(weight * bn_stat_loss(inputs[0], module.running_mean, module.running_var))

        handles.append(bn.register_forward_pre_hook(hook))
    try:
        yield col
    finally:
        for h in handles:
            h.remove()


def bn_loss_reference(model: nn.Module, x: torch.Tensor, first_bn_multiplier: float = 10.0) -> torch.Tensor:
    """The plain computation (permute/reshape/var), for tests and the speed baseline."""
    terms = []
    handles = []
    for i, (_, bn) in enumerate(batchnorm_layers(model)):
        w = first_bn_multiplier if i == 0 else 1.0

        def hook(module, inputs, output, w=w):
            inp = inputs[0]
            c = inp.shape[1]
            flat = inp.permute(1, 0, 2, 3).reshape(c, -1)
            mean = flat.mean(1)
            var = flat.var(1, unbiased=False)
            terms.append(w * (torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)))

        handles.append(bn.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum()
