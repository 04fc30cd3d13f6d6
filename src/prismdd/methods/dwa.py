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

``dwa_carry_grad`` reproduces an accident of the reference: its teacher is never frozen (distillation_imgnet.py:212-216)
and nothing clears its ``.grad`` between batches (the image optimiser's ``zero_grad`` clears the pixels only, I:135;
``Perterb.first_step(zero_grad=True)`` clears it only after using it, perterb.py:20-32), so the sum of the weight
gradients of a batch's ``loss.backward()`` calls (I:188, every iteration) is still in ``.grad`` when the next batch of
the same IPC index (the teacher is reloaded per index, I:206-217) takes its first adjustment step, which normalises
and follows g_CE + that sum. The plug-in receives the weight gradient of every iteration's loss from the engine
(``grad_wrt`` / ``take_grads``), adds it up, and keeps the sum for the next batch in memory and in
``<out>/dwa_carry/batch_<b>.safetensors`` (so a resumed run continues it; the two latest files are kept).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from ..core.augment import apply_views, jitter, sample_views, scale_jitter
from ..core.bn import channel_var_mean
from ..core.config import config_hash, opt
from ..core.errors import PrismError
from ..core.io import load_tensors, save_tensors, tensors_metadata
from ..core.models import batchnorm_layers
from ..core.runtime import make_generator
from .base import Options, PLUGINS, Plugin, options

CARRY_DIR = "dwa_carry"


def adjust_weights(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, steps: int,
                   carried: list[torch.Tensor | None] | None = None) -> list[float]:
    """DWA's weight adjustment, in place: ``steps`` normalised CE-ascent steps of length ``rho / steps`` on
    every parameter of ``model`` (``perterb.py`` first_step). Returns the gradient norm of each step.
    ``carried``: per parameter, a gradient already in the reference's ``.grad`` before the first step (the previous
    batch's sum, ``dwa_carry_grad``), added to that step's gradient. The caller saves and restores the weights."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    norms = []
    try:
        for p in params:
            p.requires_grad_(True)
        step = rho / steps
        for k in range(steps):
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            if k == 0 and carried is not None:  # backward() adds to what .grad holds; first_step then clears it
                grads = [c if g is None else g if c is None else g + c.to(g.dtype) for g, c in zip(grads, carried)]
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


@options("dwa", kind="plugin")
class DWAOptions(Options):
    """DWA's settings (``--method dwa``): the per-batch weight adjustment of the primary."""

    dwa_rho: float = opt(0.0, "dwa: total length of the primary's weight adjustment before each batch (scripts: --rho "
                              "15e-3); 0 = off", minimum=0.0)
    dwa_steps: int = opt(1, "dwa: normalised CE-ascent steps of length rho / steps on the batch's starting images "
                            "(--steps: 15 ImageNet-1K, 12 CIFAR and Tiny-ImageNet)", minimum=1)
    dwa_var_weight: float = opt(1.0, "dwa: weight of the variance part of the primary's R_BN (--r-var: 2 ImageNet-1K, "
                                     "11 CIFAR and Tiny-ImageNet); 1 = the engine's", minimum=0.0)
    dwa_carry_grad: bool = opt(False, "dwa: the reference's leftover teacher gradient: the first adjustment step of a "
                                      "batch also carries the sum of the previous batch's weight gradients (same IPC "
                                      "index; its teacher is never frozen); needs --pack ipc and one process")


@PLUGINS.register("dwa")
class DWA(Plugin):
    name = "dwa"
    owned_files = (f"{CARRY_DIR}/batch_*.safetensors",)  # the carried gradient sums (dwa_carry_grad)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.model = self.teachers[cfg.primary].model
        self.saved: list[torch.Tensor] | None = None
        self.handles: list = []
        self.var_terms: list[torch.Tensor] = []
        self.collect = False
        self.norms: list[float] = []
        # dwa_carry_grad: this batch's running sum of weight gradients, its iteration count, the previous batch's sum
        self.grad_sum: list[torch.Tensor | None] | None = None
        self.summed = 0
        self.last: tuple[int, list[torch.Tensor | None]] | None = None
        self.flags: list[bool] | None = None
        self.carried_from: int | None = None
        self.carry_dir: Path | None = None
        if cfg.dwa_carry_grad:  # batch b continues batch b - 1 of its IPC index, so those must follow each other
            sharded = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
            for bad, need in ((cfg.pack != "ipc", "--pack ipc (the reference's batches: one IPC index each, in order)"),
                              (cfg.budget != "constant", "--budget constant (a batch's sum is complete after "
                                                         "--iterations steps)"),
                              (cfg.dwa_rho <= 0, "--dwa-rho > 0 (the sum goes into the weight adjustment)"),
                              (sharded, "one process (each batch continues the one before it)")):
                if bad:
                    raise PrismError(f"--dwa-carry-grad needs {need}")

    def prepare(self, out, rank: int = 0) -> dict:
        info = {"teacher": self.cfg.primary, "rho": self.cfg.dwa_rho, "steps": self.cfg.dwa_steps,
                "var_weight": self.cfg.dwa_var_weight}
        if self.cfg.dwa_carry_grad:
            self.carry_dir = Path(out) / CARRY_DIR
            info["carry_grad"] = True
        return info

    # ------------------------------------------------------------------ dwa_carry_grad
    def carry_path(self, b: int) -> Path:
        return self.carry_dir / f"batch_{b:05d}.safetensors"

    def carried(self, b: int, units) -> list[torch.Tensor | None] | None:
        """The previous batch's gradient sum for batch ``b``; None for the first batch of an IPC index (under
        --pack ipc it starts with class 0), whose teacher the reference has just loaded."""
        if units[0][0] == 0:
            return None
        if self.last is not None and self.last[0] == b - 1:
            return self.last[1]
        path = self.carry_path(b - 1)
        if not path.exists():
            raise PrismError(f"--dwa-carry-grad: batch {b} continues the teacher gradient of batch {b - 1}, which is "
                             f"not in {path.parent}; rerun with --force")
        if tensors_metadata(path).get("config_hash") != config_hash(self.cfg):
            raise PrismError(f"{path}: made with other settings; rerun with --force")
        saved = load_tensors(path)
        return [saved[str(i)].to(p.device) if str(i) in saved else None for i, p in enumerate(self.model.parameters())]

    def keep_carry(self, b: int) -> None:
        """Store batch ``b``'s complete sum for batch b + 1 (memory and file); the files of batches before b - 1 go,
        since their successors are finished (a resumed run redoes at most the batch after the last record)."""
        self.last = (b, self.grad_sum)
        self.carry_dir.mkdir(parents=True, exist_ok=True)
        save_tensors({str(i): g for i, g in enumerate(self.grad_sum) if g is not None}, self.carry_path(b),
                     metadata={"config_hash": config_hash(self.cfg), "batch": str(b)})
        for old in self.carry_dir.glob("batch_*.safetensors"):
            if int(old.stem.split("_")[1]) < b - 1:
                old.unlink(missing_ok=True)

    def grad_wrt(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) if self.grad_sum is not None else []

    def take_grads(self, grads) -> None:
        # the reference's loss.backward() adds each iteration's weight gradient to .grad (float32 here)
        self.grad_sum = [s if g is None else g.float() if s is None else s + g.float()
                         for s, g in zip(self.grad_sum, grads)]
        self.summed += 1

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
            carried = self.carried(b, units) if cfg.dwa_carry_grad else None
            self.carried_from = None if carried is None else b - 1
            self.norms = adjust_weights(self.model, self.view(b, x.detach()), y, cfg.dwa_rho, cfg.dwa_steps, carried)
        if cfg.dwa_carry_grad:  # the batch's losses now differentiate the teacher's weights too (not frozen)
            self.flags = [p.requires_grad for p in self.model.parameters()]
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.grad_sum, self.summed = [None] * len(self.flags), 0
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
        if self.flags is not None:
            for p, f in zip(self.model.parameters(), self.flags):
                p.requires_grad_(f)
            # only a batch that ran all its iterations leaves a sum; a failed one leaves none to continue from
            if self.summed == self.cfg.iterations and self.carry_dir is not None:
                self.keep_carry(b)
            else:
                self.last = None
            self.flags, self.grad_sum = None, None
        if self.saved is not None:
            with torch.no_grad():
                moved = torch.linalg.vector_norm(torch.stack([
                    torch.linalg.vector_norm((p.detach() - s).float())
                    for p, s in zip(self.model.parameters(), self.saved)]))
                for p, s in zip(self.model.parameters(), self.saved):
                    p.copy_(s)
            record["dwa"] = {"grad_norms": [round(n, 6) for n in self.norms], "displacement": round(float(moved), 8)}
            if self.cfg.dwa_carry_grad:
                record["dwa"]["carried_from"] = self.carried_from
            self.saved = None


def var_weight_term(terms: list[torch.Tensor], var_weight: float, alpha_bn: float, n_bn: int,
                    layer_scale: float = 1.0) -> torch.Tensor:
    """The extra variance part: alpha_BN * (r_var - 1) * layer_scale * sum_l w_l ||rv_l - var_l|| / n_bn, so the
    primary's share of the engine's BN mean becomes the reference's ||rv - var|| * r_var + ||rm - mean||."""
    return alpha_bn * (var_weight - 1.0) * layer_scale * torch.stack(terms).sum() / max(1, n_bn)
