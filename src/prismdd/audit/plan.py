"""The audit's plan: which training images form the pool, which half the target trains on, the shadows'
halves, and the canaries. Every choice derives from (seed, 'audit', ...), so a re-run draws the same plan."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import torch

from ..core.data import DATASETS, TensorImages, load_indices
from ..core.errors import PrismError
from ..core.runtime import make_generator
from .config import AuditConfig

def shadow_masks(n: int, count: int, seed: int) -> np.ndarray:
    """(count, n) IN masks of the shadows: complementary pairs of random halves, each pair drawn from
    (seed, 'audit', 'shadow-pair', j). An even count puts every example IN for exactly half the shadows, and
    adding shadows later keeps the earlier ones."""
    masks = np.zeros((count, n), dtype=bool)
    for j in range((count + 1) // 2):
        half = _random_half(n, make_generator(seed, "audit", "shadow-pair", j))
        masks[2 * j] = half
        if 2 * j + 1 < count:
            masks[2 * j + 1] = ~half
    return masks


def _random_half(n: int, gen: torch.Generator) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[torch.randperm(n, generator=gen)[: n // 2].numpy()] = True
    return mask


def make_plan(cfg: AuditConfig, n_train: int, num_classes: int) -> dict:
    """Pool, background, target half and canaries: every choice from (cfg.seed, 'audit', ...)."""
    candidates = (load_indices(cfg.subset, n_train).numpy() if cfg.subset else np.arange(n_train))
    n_pool = min(cfg.pool_size, len(candidates))
    if n_pool + cfg.background > len(candidates):
        raise PrismError(f"--background {cfg.background}: only {len(candidates) - n_pool} train images remain "
                         f"outside a pool of {n_pool}")
    perm = candidates[torch.randperm(len(candidates), generator=make_generator(cfg.seed, "audit", "pool")).numpy()]
    pool = np.sort(perm[:n_pool])
    background = np.sort(perm[n_pool: n_pool + cfg.background])
    if cfg.canaries >= n_pool:
        raise PrismError(f"--canaries {cfg.canaries}: must be smaller than the pool ({n_pool})")
    gen = make_generator(cfg.seed, "audit", "canaries")
    canary_pos = np.sort(torch.randperm(n_pool, generator=gen)[: cfg.canaries].numpy())
    shift = torch.randint(1, num_classes, (len(canary_pos),), generator=gen).numpy()  # 1..K-1: another class
    target_in = _random_half(n_pool, make_generator(cfg.seed, "audit", "target"))
    return {"pool": pool, "background": background, "target_in": target_in, "canary_pos": canary_pos,
            "canary_shift": shift}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- canaries
def canary_dataset(cfg: AuditConfig, plan: dict) -> str:
    """Register (in this process) a dataset equal to ``cfg.dataset`` except for the canaries; returns its name.

    A canary keeps its image and takes the wrong class ``(y + shift) mod K``. Models trained in the audit record
    this name.
    """
    if not cfg.canaries:
        return cfg.dataset
    train_idx = plan["pool"][plan["canary_pos"]]
    spec_key = {"base": cfg.dataset, "idx": train_idx.tolist(), "seed": cfg.seed, "shift": plan["canary_shift"].tolist()}
    name = f"{cfg.dataset}+canaries-{_digest(spec_key)}"
    if name in DATASETS:
        return name
    base = DATASETS.get(cfg.dataset)
    idx = torch.as_tensor(train_idx)

    def load(root, download, resolution):
        train, test, info = base.loader(root, download, resolution)
        if not isinstance(train, TensorImages):
            raise PrismError(f"--canaries: needs an in-memory dataset; {cfg.dataset!r} is file-backed")
        targets = train.targets.clone()
        targets[idx] = (targets[idx] + torch.as_tensor(plan["canary_shift"])) % info.num_classes
        info = dataclasses.replace(info, name=name, source=info.source + f" + {len(idx)} mislabel canaries")
        return TensorImages(train.images, targets), test, info

    DATASETS.register(name, type(base)(load, f"{cfg.dataset} with {len(idx)} mislabel canaries (audit)",
                                       base.available, base.how_to_get))
    return name
