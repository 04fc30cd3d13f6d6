"""Recovery speed: prismdd's engine vs a plain loop written the way the reference code works.

Both do the same math per iteration on the same batch: CE on the primary's logits + alpha * mean of R_BN
over the BN set, Adam + cosine on the pixels, clamp. The plain loop runs each teacher with its own
forward/backward (so the primary runs twice when its architecture is in the BN set) and computes the BN
statistics with permute/reshape/mean/var in forward hooks, in the default memory format. prismdd runs each
teacher once, sums the terms into one backward, uses ``torch.var_mean`` in pre-hooks and channels_last
(and optionally torch.compile).

    python benchmarks/recover_speed.py                       # 2-thread CPU table
    python benchmarks/recover_speed.py --compile --iters 30  # adds a compiled row (cold compile excluded)

Teachers are randomly initialised with BN running statistics collected on random data: speed does not
depend on how well they were trained. Prints image-iterations per second and the ratio.
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import ExitStack

import torch
import torch.nn.functional as F

from prismdd.core.augment import apply_views, jitter, sample_views
from prismdd.core.data import DatasetInfo
from prismdd.core.bn import bn_loss_reference
from prismdd.core.models import create_model
from prismdd.methods.engine import Engine, Teacher
from prismdd.stages.recover import recover_config


def make_teachers(archs, width, res, channels, classes, seed=0):
    torch.manual_seed(seed)
    out = {}
    for a in archs:
        m = create_model(a, classes, channels, res, width)
        m.train()
        with torch.no_grad():  # non-trivial running statistics
            for _ in range(3):
                m(torch.randn(64, channels, res, res))
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        out[a] = m
    return out


def plain_loop(teachers, primary, bn_set, x0, y, iters, lr=0.05, alpha=0.01, first_mult=10.0, jit=2, seed=0):
    """The reference's structure: per-teacher forward/backward, permute/reshape BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)

    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / iters))
        views = sample_views(len(x), gen, (0.08, 1.0))
        xa = jitter(apply_views(x, views), jit, gen)
        opt.zero_grad()
        F.cross_entropy(teachers[primary](xa), y).backward(retain_graph=True)  # primary, pass 1
        for a in bn_set:  # the primary again if it is in the set; permute/reshape/var forward hooks
            (alpha / len(bn_set) * bn_loss_reference(teachers[a], xa, first_mult)).backward(retain_graph=True)
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)  # the valid range for mean 0.5, std 0.5, as in the engine
    return x.detach()


def engine_loop(teachers, primary, bn_set, x0, y, iters, info, compile_=False, channels_last=True):
    cfg = recover_config("prism", iterations=iters, channels_last=channels_last, compile=compile_, jitter=2,
                         budget="constant", alpha_bn=0.01, log_every=10 ** 9)
    ts = {a: Teacher(a, (m.to(memory_format=torch.channels_last) if channels_last else m), {}, "") for a, m in teachers.items()}
    with ExitStack() as stack:
        eng = Engine(cfg, info, ts[primary], ts, torch.device("cpu"), stack)
        units = [(int(c), 0) for c in y]
        return eng.run_batch(0, units, bn_set, x0, None)[0]


def timed(fn, *a, **k):
    t = time.perf_counter()
    fn(*a, **k)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="convnet,resnet18,mobilenet_v2", help="BN set (the first is the primary)")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--res", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times; best time kept")
    p.add_argument("--compile", action="store_true", help="also time prismdd with torch.compile (after warm-up)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    archs = a.archs.split(",")
    teachers = make_teachers(archs, a.width, a.res, a.channels, 10)
    info = DatasetInfo("bench", [str(i) for i in range(10)], a.channels, a.res, (0.5,) * a.channels, (0.5,) * a.channels)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(a.batch, a.channels, a.res, a.res, generator=gen)
    y = torch.arange(a.batch) % 10
    primary, bn_set = archs[0], archs
    # warm-up (allocator, lazy init) for both
    plain_loop(teachers, primary, bn_set, x0, y, 1)
    engine_loop(teachers, primary, bn_set, x0, y, 1, info)
    rows = {"plain loop (reference structure)": [], "prismdd engine": [], "prismdd engine, contiguous": []}
    for _ in range(a.repeats):  # interleaved, so drift in machine load hits both alike
        rows["plain loop (reference structure)"].append(timed(plain_loop, teachers, primary, bn_set, x0, y, a.iters))
        rows["prismdd engine"].append(timed(engine_loop, teachers, primary, bn_set, x0, y, a.iters, info))
        rows["prismdd engine, contiguous"].append(timed(engine_loop, teachers, primary, bn_set, x0, y, a.iters, info,
                                                        channels_last=False))
    if a.compile:
        engine_loop(teachers, primary, bn_set, x0, y, 2, info, compile_=True)  # cold compile, not timed
        rows["prismdd engine + torch.compile"] = [timed(engine_loop, teachers, primary, bn_set, x0, y, a.iters, info,
                                                        compile_=True) for _ in range(a.repeats)]
    base = min(rows["plain loop (reference structure)"])
    print(f"recover speed: BN set {','.join(archs)} (primary {primary} in the set), width {a.width}, "
          f"{a.res}px x{a.channels}, batch {a.batch}, {a.iters} iterations, {a.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'loop':34s} | {'seconds':>8s} | {'img-it/s':>9s} | vs plain")
    print("-" * 34 + "-+-" + "-" * 8 + "-+-" + "-" * 9 + "-+---------")
    for name, ts in rows.items():
        t = min(ts)
        print(f"{name:34s} | {t:8.2f} | {a.batch * a.iters / t:9.1f} | {base / t:6.2f}x")


if __name__ == "__main__":
    main()
