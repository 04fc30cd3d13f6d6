"""The recovery engine: one batch of synthetic images optimised through frozen teachers, and the per-image budgets
and schedules it follows. ``stages/recover.py`` plans the batches, loads the teachers and writes the outputs; this
module is the inner loop. What a method adds on top lives in plug-ins (``base.py``), how the images are held in a
parametrisation (``params.py``), extra loss terms such as the CLIP prior in ``priors.py``.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.augment import apply_views, jitter, sample_views, scale_jitter
from ..core.bn import bn_hooks
from ..core.data import DatasetInfo, pixel_bounds
from ..core.errors import PrismError
from ..core.io import JsonlLog
from ..core.models import has_batchnorm
from ..core.runtime import Heartbeat, make_generator
from .base import Plugin
from .params import PARAMS

def delt_start_round(ipc: int, rounds: int, k: int) -> int:
    """DELT (recover.py get_round_imgs_indx): the ipc images of a class are split into ``rounds`` contiguous
    groups (ipc // rounds each, the first ipc % rounds one more); image k joins in its group's round."""
    sizes = [ipc // rounds + (1 if r < ipc % rounds else 0) for r in range(rounds)]
    cum = np.cumsum(sizes)
    return int(np.nonzero(k < cum)[0][0])


def class_rounds(cfg, c: int, rounds: int) -> int:
    """DELT's random rounds (``recover.py:278-284``): a class's round count uniform on [min_rounds, rounds], here
    from (seed, class) so every shard and every resume draws the same number (DELT's draw is unseeded)."""
    if not cfg.min_rounds or cfg.min_rounds >= rounds:
        return rounds
    return int(np.random.default_rng([cfg.seed, c]).integers(cfg.min_rounds, rounds + 1))


def image_budget(cfg, k: int, c: int = 0) -> int:
    """Iterations for IPC index k of class c: constant; PRISM's early-late (iterations - step * (k mod cycle)); or
    DELT's rounds ((the class's rounds - start round) * round length; all images of a batch end together)."""
    if cfg.budget == "constant":
        return cfg.iterations
    if cfg.budget == "rounds":
        length = max(1, int(round(cfg.early_late_step * cfg.iterations)))
        rounds = class_rounds(cfg, c, max(1, cfg.iterations // length))
        return (rounds - delt_start_round(cfg.ipc, rounds, k)) * length
    cut = int(round(cfg.early_late_step * cfg.iterations)) * (k % cfg.early_late_cycle)
    return max(1, cfg.iterations - cut)



def crop_low(cfg, progress_: float) -> float:
    """Lower crop-scale bound at ``progress_`` = iteration / iterations (CDA's ``recover_cda_in1k.py`` with
    milestone 1: 0.08 + 0.92 (1 + cos(pi it / iters)) / 2 for crop_scale (0.08, 1))."""
    lo, hi = cfg.crop_scale
    if cfg.crop_schedule == "uniform":
        return lo
    return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * progress_))  # easy (large crops) -> hard



@dataclass
class Teacher:
    arch: str
    model: nn.Module
    card: dict
    folder: str


def batch_lr(lr: float, it: int, n_iter: int) -> float:
    """One cosine LR over the batch's iterations (DELT's rounds)."""
    return lr * 0.5 * (1 + math.cos(math.pi * it / n_iter))


def image_lrs(lr: float, it: int, start: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-image step count (0 = its window has not opened) and cosine LR over each image's own budget."""
    t = (it - start + 1).clamp(min=0)
    return t, lr * 0.5 * (1 + torch.cos(math.pi * (t - 1).clamp(min=0).float() / budgets.float()))


class Engine:
    """Runs one batch of recovery. Teachers' BN hooks are registered once for the whole run."""

    def __init__(self, cfg, info: DatasetInfo, primary: Teacher, teachers: dict[str, Teacher],
                 device: torch.device, stack: ExitStack, plugin: Plugin | None = None, priors: list | None = None):
        self.cfg, self.info, self.device = cfg, info, device
        # extra loss terms that any method may add (the CLIP prior): callables (views, labels) -> weighted loss
        self.priors = list(priors or [])
        self.plugin = plugin or Plugin(cfg, info, None, teachers, list(teachers), device)
        self.primary = primary
        self.teachers = teachers
        self.collectors = {a: stack.enter_context(bn_hooks(t.model, cfg.first_bn_multiplier, cfg.bn_layer_reduce))
                           for a, t in teachers.items() if has_batchnorm(t.model)}
        self.forward = {a: (torch.compile(t.model) if cfg.compile else t.model) for a, t in teachers.items()}
        self.lo, self.hi = pixel_bounds(info, device)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        self.jitter = cfg.jitter if cfg.jitter is not None else scale_jitter(info.resolution)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.amp = cfg.amp and device.type == "cuda"

    def losses(self, xa: torch.Tensor, y: torch.Tensor, ce_teacher: str, bn_set: list[str],
               norms: dict[str, torch.Tensor] | None, b: int = 0, it: int = 0) -> dict[str, torch.Tensor]:
        """Named loss terms for one augmented batch. Each teacher runs ONCE: the primary's forward serves
        both the CE and (when it is in the BN set) its own BN term."""
        terms: dict[str, torch.Tensor] = {}
        run = [ce_teacher] + [a for a in bn_set if a != ce_teacher]
        bn_terms = []
        all_logits = {}
        for arch in run:
            col = self.collectors.get(arch)
            in_bn = arch in bn_set and self.cfg.alpha_bn > 0
            if col is not None:
                col.reset()
                col.active = in_bn
            with torch.autocast("cuda", torch.bfloat16) if self.amp else nullcontext():
                logits = self.forward[arch](xa)
            all_logits[arch] = logits
            if arch == ce_teacher:
                terms["ce"] = F.cross_entropy(logits.float(), y)
            if in_bn:
                r = col.total().float()
                terms[f"bn/{arch}"] = r.detach()
                bn_terms.append(r / norms[arch] if norms is not None else r)
        bn = torch.stack(bn_terms).mean() if bn_terms else torch.zeros((), device=xa.device)
        terms["bn_mean"] = bn.detach()
        total = terms["ce"] + self.cfg.alpha_bn * bn
        extra = dict(self.plugin.losses(self, xa, y, b, it, all_logits))
        extra.update({prior.name: prior(xa, y) for prior in self.priors})
        for name, value in extra.items():
            terms[name] = value.detach()
            total = total + value
        return {**terms, "total": total}

    def image_priors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self.cfg.tv_l2 > 0:
            dx = x[:, :, :, 1:] - x[:, :, :, :-1]
            dy = x[:, :, 1:, :] - x[:, :, :-1, :]
            out["tv_l2"] = (dx.pow(2).mean() + dy.pow(2).mean())
        if self.cfg.l2 > 0:
            out["l2"] = x.pow(2).mean()
        return out

    def run_batch(self, b: int, units: list[tuple[int, int]], bn_set: list[str], init: torch.Tensor,
                  log: JsonlLog | None, beat: Heartbeat | None = None) -> tuple[torch.Tensor, dict]:
        """Optimise one batch; returns (final normalised images, record). ``beat`` counts its iterations (one batch
        of PRISM at README scale runs for half an hour)."""
        cfg = self.cfg
        gen = make_generator(cfg.seed, "recover", b)
        y = torch.tensor([c for c, _ in units], device=self.device)
        budgets = torch.tensor([image_budget(cfg, k, c) for c, k in units], device=self.device)
        n_iter = int(budgets.max())
        start = n_iter - budgets  # late IPC indices join late, so every image ends on the same step
        param = PARAMS.get(cfg.param)(cfg, self.info, self.device)
        # fresh leaves: never turn the caller's tensor into a parameter
        leaves = param.init(init.detach().to(self.device).contiguous(memory_format=self.memory_format))
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in leaves]
        b1, b2 = cfg.betas
        norms = None
        rotate_counts: dict[str, int] = {}
        last: dict[str, float] = {}
        rounds = cfg.budget == "rounds"  # DELT: only the images that joined are forwarded (their own BN statistics)
        plugin_record: dict = {}
        try:
            self.plugin.begin_batch(b, units, param.render(leaves))
            for it in range(n_iter):
                x = param.render(leaves)  # the pixels themselves, or DAS's sum of resolutions
                if rounds:
                    joined = torch.nonzero(start <= it).squeeze(1)
                    xs, ys = x[joined], y[joined]
                else:
                    xs, ys = x, y
                views = sample_views(len(xs), gen, (crop_low(cfg, it / n_iter), cfg.crop_scale[1]),
                                     flip=cfg.flip, per=cfg.crop_per)
                xa = jitter(apply_views(xs, views), self.jitter, gen, cfg.jitter_mode)
                if cfg.view_noise > 0:  # DAS: uniform noise on every view, clipped back into the valid range
                    noise = torch.rand(xa.shape, generator=gen).to(xa.device) * cfg.view_noise
                    xa = (xa + noise / self.std).clamp(self.lo, self.hi)
                xa = xa.contiguous(memory_format=self.memory_format)
                if cfg.selection == "rotate":
                    pick = bn_set[int(torch.randint(len(bn_set), (1,), generator=gen))]
                    rotate_counts[pick] = rotate_counts.get(pick, 0) + 1
                    ce_teacher, active_set = pick, [pick]
                else:
                    ce_teacher, active_set = self.primary.arch, bn_set
                ce_teacher, active_set = self.plugin.pick_teachers(b, it, ce_teacher, active_set)
                if cfg.bn_normalize and norms is None and cfg.alpha_bn > 0:
                    with torch.no_grad():  # per-teacher scale: R_BN of the starting images, so each starts at 1
                        first = self.losses(xa.detach(), ys, ce_teacher, bn_set, None)
                    norms = {a: first[f"bn/{a}"].clamp_min(1e-8) for a in bn_set}
                terms = self.losses(xa, ys, ce_teacher, active_set, norms, b, it)
                terms.update(self.image_priors(xs))
                total = terms["total"] + cfg.tv_l2 * terms.get("tv_l2", 0) + cfg.l2 * terms.get("l2", 0)
                if not torch.isfinite(total):
                    raise PrismError(f"recover batch {b}: loss became {total.item()} with teachers "
                                     f"{', '.join(active_set)}; lower --lr or check those teachers")
                wrt = self.plugin.grad_wrt()  # e.g. DWA's teacher weights: their gradient of the same loss
                grads = torch.autograd.grad(total, [*leaves, *wrt], allow_unused=bool(wrt))
                if wrt:
                    self.plugin.take_grads(list(grads[len(leaves):]))
                with torch.no_grad():
                    for i, (p, g, (m, v)) in enumerate(zip(leaves, grads, moments)):
                        scale = param.lr_scale(i)
                        if param.sgd:
                            self._sgd_step(p, g, it, start, budgets, n_iter, rounds, scale)
                        elif rounds:
                            self._adam_step_global(p, g, m, v, it, n_iter, b1, b2, scale=scale)
                        else:
                            self._adam_step(p, g, m, v, it, start, budgets, b1, b2, scale=scale)
                    param.project(leaves)  # pixels: clamped to a valid image; multires: tanh already is
                if log is not None and (it % cfg.log_every == 0 or it == n_iter - 1):
                    rec = {k: round(float(t.detach()), 6) for k, t in terms.items()}
                    log.write(batch=b, iteration=it, **rec)
                if it == n_iter - 1:
                    last = {k: round(float(t.detach()), 6) for k, t in terms.items()}
                if beat is not None:
                    beat.step(loss=total.detach(), batch=b)  # read (a GPU sync) only when printed
        finally:  # a plug-in that changed teacher weights restores them even when the batch fails
            self.plugin.end_batch(b, plugin_record)
        record = {"batch": b, "units": [list(u) for u in units], "bn_set": bn_set, "primary": self.primary.arch,
                  "iterations": n_iter, "budgets": budgets.tolist(), "final_losses": last, **plugin_record}
        if norms is not None:
            record["bn_normalizers"] = {a: float(t) for a, t in norms.items()}
        if rotate_counts:
            record["rotation_counts"] = rotate_counts
        if cfg.param != "pixels":
            record["param"] = param.describe()
        with torch.no_grad():
            return param.render(leaves).detach(), record

    def _sgd_step(self, x, g, it, start, budgets, n_iter, rounds, scale: float = 1.0):
        """Plain gradient descent (DAS optimises its components with torch.optim.SGD, no momentum), on the same
        schedule as the Adam steps below."""
        if rounds:
            x.sub_(batch_lr(self.cfg.lr, it, n_iter) * scale * g)
            return
        t, lr = image_lrs(self.cfg.lr, it, start, budgets)
        x.sub_((lr * (t > 0).float() * scale).view(-1, *[1] * (x.dim() - 1)) * g)

    def _adam_step_global(self, x, g, m, v, it, n_iter, b1, b2, eps: float = 1e-8, scale: float = 1.0):
        """DELT (recover.py:92-112): ONE torch Adam over the whole batch tensor: one step count and one cosine LR
        over the batch's iterations. Images that have not joined get zero gradients, so their moments stay 0
        and they do not move; an image that joins late gets the batch's (small) LR and bias corrections."""
        lr = batch_lr(self.cfg.lr, it, n_iter)
        if scale != 1.0:
            lr = lr * scale
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        t = it + 1
        x.sub_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))

    def _adam_step(self, x, g, m, v, it, start, budgets, b1, b2, eps: float = 1e-8, scale: float = 1.0):
        """Adam with a per-image step count and cosine LR over each image's own budget.

        With equal budgets this is exactly torch.optim.Adam + cosine decay; with early-late budgets an
        image is frozen (no update, no moment change) until its window opens.
        """
        t, lr = image_lrs(self.cfg.lr, it, start, budgets)
        active = (t > 0).float().view(-1, 1, 1, 1)
        if scale != 1.0:  # a parametrisation's share of the LR (multires divides it among its components)
            lr = lr * scale
        m.mul_(1 - active * (1 - b1)).add_(active * (1 - b1) * g)
        v.mul_(1 - active * (1 - b2)).add_(active * (1 - b2) * g * g)
        tf = t.clamp(min=1).float()
        bc1 = (1 - b1 ** tf).view(-1, 1, 1, 1)
        bc2 = (1 - b2 ** tf).view(-1, 1, 1, 1)
        step = (lr.view(-1, 1, 1, 1) * active) * (m / bc1) / ((v / bc2).sqrt() + eps)
        x.sub_(step)
