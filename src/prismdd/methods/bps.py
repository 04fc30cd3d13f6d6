"""BPS (Balanced Dataset Distillation via Modeling Multiple Visual Pattern Distribution, CVPR 2026): whole real
training images, chosen per class so that every visual pattern of the class is represented in proportion to its size.

As its code does it (github.com/BeCarefulOfYournaoke/BPS @ 7d016dbb51cbb7c04a7e3e8f32cedc78edf921e7:
``stage2_selection.py``, ``utils/engine_pretrain.py``, ``utils/cluster_opt.py``), per class:

1. patterns: an exact k-nearest-neighbour graph (k = 30, the image itself among them) on the L2-normalised
   embeddings by inner product; from each image the neighbours are scanned nearest first, an edge kept while
   the cosine is >= 0.5, the scan stopping at the first one below; Infomap (two-level, directed, 3 trials) splits
   the graph into modules; an image with no kept edge is a pattern of its own. Computed once per class, reused
   for every IPC (``class_patterns``);
2. budgets: IPC x pattern size / class size, rounded by numpy (half to even), the sum fixed to IPC by +-1 steps
   over the patterns from the largest down: small patterns get nothing at low IPC (``pattern_budgets``);
3. inside a pattern with budget b: the ceil(b / 2) images most cosine-similar to the re-normalised centroid, the
   rest by the entropy rule (``entropy_picks``): a 2-component 1-D Gaussian mixture fitted to the top
   max(10 %, 10) entropies of the remaining images; picks are the lowest entropies in [lower mean, the code's
   crossing of the two components]; then the highest entropies below the lower mean; then the highest overall.

The entropy of an image is a teacher's predictive entropy on the un-augmented training image (the score stage's
``entropy`` kind; BPS ships its entropies as files whose producer is not in its repository: our choice). The
embedding is the score stage's ``embedding`` kind: ``--embed bps`` trains BPS's own network here (``BPSEmbedder``,
``train_embedder``), ``--embed teacher`` (the cheap default) takes a squeeze teacher's penultimate features. The mixture's
``random_state`` is the run's ``--seed`` (BPS passes its ``--seed``, 1228 in every script).

Where BPS's rule yields fewer than ``ipc`` images (a pattern smaller than its budget: the code then saves fewer),
prismdd fills the class up with its unpicked images nearest the class's re-normalised centroid (``by: fill``), since
a distilled set here holds exactly ``ipc`` images per class.

Size: about 570 lines, one method: the pattern graph, the picks, the options, the plug-in, and BPS's embedding network
with its score-stage embedder, which share the kNN + Infomap rule (the queue is re-clustered by it while training).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.augment import apply_views, sample_views
from ..core.config import opt
from ..core.data import normalize
from ..core.errors import PrismError
from ..core.log import get_logger
from ..core.models import create_model
from ..core.runtime import derive_seed
from .base import PLUGINS, Options, options
from .embed import Embedder, EmbedderOptions, embedder
from .select import SelectionPlugin

logger = get_logger("recover.bps")

# values the BPS code writes as literals (not options there)
GMM_MIN_IMAGES = 10      # no mixture below this many remaining images, and at least this many candidates
NORM_EPS = 1e-12         # torch.nn.functional.normalize's eps (attain_embedding)
CENTROID_EPS = 1e-8      # added to the centroid's norm (select_hybrid_gmm_centroid_subset)
CROSSINGS = ("code", "density")


# ----------------------------------------------------------------------------- the pieces (tested one by one)
def l2_normalise(x) -> np.ndarray:
    """(N, D) float32 rows divided by max(norm, 1e-12), as ``F.normalize(x, dim=1)``."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(NORM_EPS))


def knn_links(feats: np.ndarray, k: int = 30, min_cosine: float = 0.5) -> tuple[list[tuple[int, int, float]], list[int]]:
    """The directed kNN graph of one class: (links (i, j, cosine) in scan order, nodes with no kept link).

    ``feats``: (n, D) L2-normalised. faiss ``IndexFlatIP`` (exact) returns each row's ``min(k, n)`` nearest by
    inner product, the row itself among them; BPS asks for k always, and faiss pads a short class with id -1 at
    -FLT_MAX, which the scan below never passes, so capping k at n changes nothing. The scan works in BPS's
    "distances" 1 - cosine (float32), sorted ascending (a stable sort: ties keep faiss's order; BPS's default
    argsort may order exact ties differently, which only changes the links' insertion order): the row itself is
    skipped wherever it sits, a neighbour is linked while its distance is <= 1 - min_cosine, and the first one
    beyond ends the scan. The link weight is the cosine as the code recovers it, float(1 - distance)."""
    import faiss  # here, not at the top: `import prismdd` and every other method work without faiss and infomap

    x = np.ascontiguousarray(feats, dtype=np.float32)
    n, d = x.shape
    index = faiss.IndexFlatIP(d)
    index.add(x)
    sims, nbrs = index.search(x, min(k, n))
    dists = np.float32(1) - sims                      # (n, k) float32
    order = np.argsort(dists, axis=1, kind="stable")  # faiss already sorts; BPS re-sorts (knns_2_ordered_nbrs)
    dists = np.take_along_axis(dists, order, axis=1)
    nbrs = np.take_along_axis(nbrs, order, axis=1)
    limit = 1 - min_cosine
    links, single = [], []
    for i in range(n):
        count = 0
        for j, dist in zip(nbrs[i], dists[i]):
            if j == i:
                continue
            if dist <= limit:
                links.append((i, int(j), float(np.float32(1) - dist)))
                count += 1
            else:
                break
        if count == 0:
            single.append(i)
    return links, single


def infomap_modules(n: int, links, single, trials: int = 3, seed: int = 123) -> np.ndarray:
    """(n,) int64 pattern labels: Infomap's top modules of the linked nodes (``--two-level --directed``, ``trials``
    trials, seeded), numbered as Infomap orders them (largest flow first, label = module id - 1), then every node
    of ``single`` as a pattern of its own, numbered on in node order (it overrides a module label: BPS's
    ``cluster_by_infomap``). Seed 123 is Infomap's default, which BPS leaves unset."""
    labels = np.full(n, -1, dtype=np.int64)  # -1: neither linked nor single (cannot happen; BPS keeps it as -1)
    count = 0
    if links:
        import infomap

        im = infomap.Infomap(two_level=True, directed=True, num_trials=trials, seed=seed, silent=True)
        for i, j, w in links:
            im.add_link(i, j, w)
        modules = im.run().modules()  # node -> 1-based top module
        for node, module in modules.items():
            labels[node] = module - 1
        count = len(set(modules.values()))
    for s in single:
        labels[s] = count
        count += 1
    return labels


def merge_small_patterns(labels: np.ndarray, feats: np.ndarray, below: int) -> np.ndarray:
    """BPS's optional ``--merge-clusters`` (off in every script; ``below`` = 0 here): every pattern with fewer
    than ``below`` images joins the pattern of at least ``below`` whose re-normalised mean embedding is most
    cosine-similar to its own; unchanged when no pattern is small or none is large."""
    if below <= 0:
        return labels
    ids, counts = np.unique(labels, return_counts=True)
    small, large = ids[counts < below], ids[counts >= below]
    if len(small) == 0 or len(large) == 0:
        return labels
    centroid = {p: feats[labels == p].mean(axis=0) for p in ids}
    big = np.stack([centroid[p] for p in large])
    big = big / (np.linalg.norm(big, axis=1, keepdims=True) + CENTROID_EPS)
    out = labels.copy()
    for p in small:
        c = centroid[p] / (np.linalg.norm(centroid[p]) + CENTROID_EPS)
        out[labels == p] = large[int(np.argmax(big @ c))]
    return out


def class_patterns(feats: np.ndarray, k: int = 30, min_cosine: float = 0.5, trials: int = 3, seed: int = 123,
                   merge_below: int = 0) -> np.ndarray:
    """(n,) pattern labels of one class from its (n, D) embeddings (normalised here)."""
    x = l2_normalise(feats)
    links, single = knn_links(x, k, min_cosine)
    return merge_small_patterns(infomap_modules(len(x), links, single, trials, seed), x, merge_below)


def pattern_budgets(counts, ipc: int) -> np.ndarray:
    """Images per pattern: round(ipc x count / total) (numpy: half to even), then ipc - sum fixed by +1 or -1 on
    the patterns from the largest count down (a stable sort reversed: among equal counts the later pattern first,
    as BPS's default argsort does for up to 16 patterns), cycling if needed; negatives set to 0."""
    counts = np.asarray(counts)
    budgets = np.round(counts / counts.sum() * ipc).astype(int)
    diff = ipc - int(budgets.sum())
    largest = np.argsort(counts, kind="stable")[::-1]
    for i in range(abs(diff)):
        budgets[largest[i % len(largest)]] += np.sign(diff)
    budgets[budgets < 0] = 0
    return budgets


def mixture_window(candidates: np.ndarray, seed: int, crossing: str = "code") -> tuple[float, complex | float]:
    """(lower mean, upper bound) of the entropy rule's primary pool: a 2-component ``GaussianMixture``
    (``random_state=seed``, scikit-learn's other defaults) fitted to ``candidates``; the upper bound is the first
    root of BPS's quadratic that lies strictly between the two means (numpy's ``np.roots`` order and numpy's
    comparison, which orders a complex root by its real part first), else +inf.

    ``crossing="code"`` is BPS's quadratic, whose constant holds log(w_l sd_l / (w_r sd_r)); the weighted densities
    are equal where it holds log(w_l sd_r / (w_r sd_l)) (``"density"``): the code's point is the true crossing only
    when the two spreads are equal. Raises scikit-learn's ValueError when the fit fails (the caller skips it)."""
    from sklearn.mixture import GaussianMixture  # scikit-learn's import costs ~1 s; only a BPS run needs it

    gmm = GaussianMixture(n_components=2, random_state=seed).fit(np.asarray(candidates).reshape(-1, 1))
    order = np.argsort(gmm.means_.ravel())
    mu_l, mu_r = gmm.means_.ravel()[order]
    var_l, var_r = gmm.covariances_.ravel()[order]
    w_l, w_r = gmm.weights_[order]
    a = 1 / (2 * var_r) - 1 / (2 * var_l)
    b = mu_l / var_l - mu_r / var_r
    if crossing == "code":
        log_term = np.log(w_l * np.sqrt(var_l) / (w_r * np.sqrt(var_r)))
    else:
        log_term = np.log(w_l * np.sqrt(var_r) / (w_r * np.sqrt(var_l)))
    c = mu_r ** 2 / (2 * var_r) - mu_l ** 2 / (2 * var_l) + log_term
    roots = np.roots([a, b, c])
    inside = roots[(roots > mu_l) & (roots < mu_r)]
    return mu_l, (inside[0] if len(inside) else np.inf)


def entropy_picks(entropies, budget: int, seed: int, top: float = 0.1, crossing: str = "code") -> np.ndarray:
    """Local indices of ``budget`` images chosen by BPS's entropy rule (``select_gmm_entropy_subset``), in pick
    order: with n >= 10 images, the mixture is fitted to the int(max(n x top, 10)) highest entropies; primary
    pool = entropies in [lower mean, upper bound] (``mixture_window``), taken lowest first; if short, the
    entropies below the lower mean, highest first; if still short (or n < 10, or the fit failed), the highest
    entropies of the rest."""
    e = np.asarray(entropies, dtype=np.float64)  # BPS's entropy files are float64 (float32 values, cast)
    n = len(e)
    if n <= budget:
        return np.arange(n)
    picked: list[int] = []
    if n >= GMM_MIN_IMAGES:
        m = int(max(n * top, min(GMM_MIN_IMAGES, n)))
        try:
            low, high = mixture_window(np.sort(e)[-m:], seed, crossing)
        except ValueError:  # BPS prints "GMM failed !" and falls back to the highest entropies
            low = None
        if low is not None:
            primary = np.flatnonzero((e >= low) & (e <= high))
            if len(primary) >= budget:
                picked = list(primary[np.argsort(e[primary], kind="stable")][:budget])
            else:
                picked = list(primary)
                below = np.flatnonzero(e < low)
                below = below[np.argsort(e[below], kind="stable")[::-1]]
                picked += list(below[:budget - len(picked)])
    short = budget - len(picked)
    if short > 0:
        rest = np.setdiff1d(np.arange(n), np.asarray(picked, dtype=int), assume_unique=True)
        rest = rest[np.argsort(e[rest], kind="stable")[::-1]]
        picked += list(rest[:short])
    return np.asarray(picked, dtype=int)


def centre_order(feats: np.ndarray) -> np.ndarray:
    """Local indices of a pattern by cosine to its re-normalised mean embedding, most similar first (BPS's
    ``argsort(...)[::-1]``, here of a stable sort: exact ties put the later image first)."""
    centroid = feats.mean(axis=0)
    centroid = centroid / (np.linalg.norm(centroid) + CENTROID_EPS)
    return np.argsort(feats @ centroid, kind="stable")[::-1]


def pattern_picks(feats: np.ndarray, entropies, budget: int, seed: int, centre_ratio: float = 0.5,
                  top: float = 0.1, crossing: str = "code") -> tuple[np.ndarray, np.ndarray]:
    """(by centre, by entropy) local indices of one pattern with more than ``budget`` images
    (``select_hybrid_gmm_centroid_subset``): int(budget x centre_ratio + 0.5) (ceil(budget / 2) at 0.5) nearest
    the centroid, the rest by ``entropy_picks`` among the others. ``feats`` L2-normalised."""
    near = centre_order(feats)
    n_centre = int(budget * centre_ratio + 0.5)
    by_centre = near[:n_centre]
    by_entropy = np.array([], dtype=int)
    if budget - n_centre > 0:
        rest = np.setdiff1d(np.arange(len(feats)), by_centre)
        if len(rest):
            by_entropy = rest[entropy_picks(np.asarray(entropies)[rest], budget - n_centre, seed, top, crossing)]
    short = budget - len(by_centre) - len(by_entropy)
    if short > 0:  # unreachable when the pattern has more than budget images; BPS tops up from the centre order
        taken = set(by_centre.tolist()) | set(by_entropy.tolist())
        by_centre = np.concatenate([by_centre, [i for i in near if i not in taken][:short]]).astype(int)
    return by_centre, by_entropy


def select_class(labels: np.ndarray, feats: np.ndarray, entropies, ipc: int, seed: int, centre_ratio: float = 0.5,
                 top: float = 0.1, crossing: str = "code") -> tuple[np.ndarray, list[str]]:
    """BPS's choice in one class: (local indices ascending, how each was picked: ``centre``, ``entropy``,
    ``pattern`` (a pattern no larger than its budget, taken whole) or ``class`` (a class of at most ipc images,
    taken whole)). ``labels``: the class's patterns; ``feats``: its L2-normalised embeddings."""
    n = len(labels)
    if n <= ipc:
        return np.arange(n), ["class"] * n
    entropies = np.asarray(entropies)
    ids, counts = np.unique(labels, return_counts=True)
    how: dict[int, str] = {}
    for pattern, budget in zip(ids, pattern_budgets(counts, ipc)):
        if budget == 0:
            continue
        members = np.flatnonzero(labels == pattern)
        if len(members) <= budget:
            how.update({int(i): "pattern" for i in members})
            continue
        by_centre, by_entropy = pattern_picks(feats[members], entropies[members], int(budget), seed, centre_ratio,
                                              top, crossing)
        how.update({int(i): "centre" for i in members[by_centre]})
        how.update({int(i): "entropy" for i in members[by_entropy]})
    chosen = np.array(sorted(how), dtype=int)
    return chosen, [how[int(i)] for i in chosen]


# ----------------------------------------------------------------------------- BPS's embedding network (stage 1)
# Registered below as the score stage's ``bps`` embedder (``prismdd score --kinds embedding --embed bps``).
# BPS (stage1_modeling.py, moco/builder.py, utils/engine_pretrain.py): a ResNet-18 backbone (fc removed) with a
# linear classifier and a 2-layer MLP projector to 128-d; MoCo v2 (momentum key encoder, a queue of keys with their
# classes); loss = 0.5 CE + 0.5 InfoNCE (T = 0.5), plus the pattern loss ramped in linearly after 5 warm-up epochs.
class EmbedNet(nn.Module):
    """backbone (B, ...) -> (B, D) features; ``classifier`` D -> classes; ``projector`` D -> D -> ``dim``."""

    def __init__(self, backbone: nn.Module, width: int, classes: int, dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(width, classes)
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))

    def forward(self, x):
        f = self.backbone(x)
        return self.classifier(f), self.projector(f)


def pattern_loss(q: torch.Tensor, queue: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BPS's pattern ("DINO") loss: each query (B, dim), L2-normalised, is assigned the pattern whose re-normalised
    mean queue key is most similar; with d = sqrt(2 - 2 q.key + 1e-6) to every queue key (K, dim), the loss is
    mean over the batch of [mean d to the keys of its pattern] + 2 - [mean d to the other keys] (each mean's
    denominator + 1e-6). ``labels``: (K,) pattern of each key, 0..P-1. Gradients flow through ``q`` only."""
    queue = queue.detach()
    count = int(labels.max()) + 1
    centroids = torch.stack([queue[labels == p].mean(0) for p in range(count)])
    assign = (q @ F.normalize(centroids, dim=1).T).argmax(1)
    same = (assign[:, None] == labels[None, :]).float()
    dist = (2 - 2 * q @ queue.T + 1e-6).sqrt()
    pull = ((dist * same).sum(1) / (same.sum(1) + 1e-6)).mean()
    push = ((dist * (1 - same)).sum(1) / ((1 - same).sum(1) + 1e-6)).mean()
    return pull + 2.0 - push


def pattern_weight(epoch: int, epochs: int, warmup: int = 5, weight: float = 1.0) -> float:
    """The pattern loss's weight in (0-based) ``epoch``: 0 through the warm-up, then (epoch + 1 - warmup) /
    (epochs - warmup) x weight (engine_pretrain.py ``train_one_epoch``)."""
    return 0.0 if epoch + 1 <= warmup else (epoch + 1 - warmup) / (epochs - warmup) * weight


def queue_patterns(keys: np.ndarray, classes: np.ndarray, k: int = 30, min_cosine: float = 0.5,
                   trials: int = 3, seed: int = 123) -> np.ndarray:
    """Pattern labels of a full queue: per class (in class order) the kNN + Infomap patterns of its keys,
    numbered on across classes; a class with at most ``k`` keys is one pattern (``MoCo._info_cluster``)."""
    labels = np.zeros(len(keys), dtype=np.int64)
    base = 0
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        local = (np.zeros(len(rows), dtype=np.int64) if len(rows) <= k else
                 infomap_modules(len(rows), *knn_links(l2_normalise(keys[rows]), k, min_cosine), trials, seed))
        ids, local = np.unique(local, return_inverse=True)
        labels[rows] = base + local
        base += len(ids)
    return labels


def train_embedder(net: EmbedNet, images: torch.Tensor | Callable, targets: torch.Tensor, augment: Callable, *,
                   epochs: int, batch: int, queue_size: int, lr: float = 0.02, momentum: float = 0.999, temperature: float = 0.5,
                   weight_cls: float = 0.5, warmup: int = 5, weight_info: float = 1.0, k: int = 30,
                   min_cosine: float = 0.5, seed: int = 0, log: Callable | None = None) -> EmbedNet:
    """Train ``net`` (the query encoder) as BPS's stage 1 and return it. ``images``: normalised (N, C, H, W), or a
    function from indices to such a batch (a dataset too large to hold); ``augment(x, generator)`` one random view per
    image. SGD (momentum 0.9, wd 1e-4) with a cosine LR per epoch (``--cos``); the key encoder follows by EMA ``momentum``; the queue (``queue_size``, a multiple of ``batch``:
    BPS asserts it) holds normalised keys and their classes; each time it fills, its copy is re-clustered
    (``queue_patterns``) for the pattern loss. Drops the last partial batch (BPS's loader: ``drop_last=True``)."""
    if queue_size % batch:
        raise PrismError(f"bps embedder: queue size {queue_size} must be a multiple of the batch {batch}")
    g = torch.Generator().manual_seed(seed)
    key_net = copy.deepcopy(net).requires_grad_(False)
    dim = net.projector[-1].out_features
    dev = next(net.parameters()).device
    queue = F.normalize(torch.randn(queue_size, dim, generator=g), dim=1).to(dev)
    queue_cls = torch.zeros(queue_size, dtype=torch.long, device=dev)
    frozen, frozen_labels = queue.clone(), torch.zeros(queue_size, dtype=torch.long, device=dev)
    ptr = 0
    fetch = images.__getitem__ if isinstance(images, torch.Tensor) else images
    opt_ = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    for epoch in range(epochs):
        for group in opt_.param_groups:  # moco's adjust_learning_rate with --cos
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        net.train()
        order = torch.randperm(len(targets), generator=g)
        for s in range(0, len(order) - batch + 1, batch):
            idx = order[s:s + batch]
            x, y = fetch(idx), targets[idx].to(dev)
            logit, q = net(augment(x, g))
            q = F.normalize(q, dim=1)
            with torch.no_grad():
                for pk, pq in zip(key_net.parameters(), net.parameters()):
                    pk.mul_(momentum).add_(pq.detach(), alpha=1 - momentum)
                key = F.normalize(key_net(augment(x, g))[1], dim=1)
            contrast = torch.cat([(q * key).sum(1, keepdim=True), q @ queue.clone().T], 1) / temperature
            losses = {"cls": weight_cls * F.cross_entropy(logit, y),
                      "infonce": (1 - weight_cls) * F.cross_entropy(contrast, torch.zeros(len(q), dtype=torch.long,
                                                                                          device=dev))}
            queue[ptr:ptr + batch], queue_cls[ptr:ptr + batch] = key, y
            ptr = (ptr + batch) % queue_size
            if ptr == 0:  # the queue is full again: its copy and patterns are renewed
                frozen = queue.clone()
                frozen_labels = torch.from_numpy(queue_patterns(frozen.cpu().numpy(), queue_cls.cpu().numpy(), k,
                                                                min_cosine)).to(dev)
            w = pattern_weight(epoch, epochs, warmup, weight_info)
            if w:
                losses["pattern"] = w * pattern_loss(q, frozen, frozen_labels)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise PrismError(f"bps embedder: the loss is {float(total)} in epoch {epoch}; lower --lr")
            opt_.zero_grad()
            total.backward()
            opt_.step()
        if log is not None:
            log({"epoch": epoch, **{n: round(float(v.detach()), 6) for n, v in losses.items()}})
    return net.eval()


# ----------------------------------------------------------------------------- the options
@options("bps", kind="plugin")
class BPSOptions(Options):
    """BPS's settings (``--method bps``): the pattern graph, Infomap and the pick rule, at its code's defaults."""

    bps_k: int = opt(30, "bps: neighbours per image in the class's exact kNN graph, the image itself included "
                         "(--k_nbr 30; capped at the class size)", minimum=1)
    bps_min_cosine: float = opt(0.5, "bps: a neighbour is linked while its cosine is >= this; the scan stops at the "
                                     "first one below (--min_sim 0.5)")
    bps_trials: int = opt(3, "bps: Infomap trials, the best kept (cluster_by_infomap: num_trials=3)", minimum=1)
    bps_infomap_seed: int = opt(123, "bps: Infomap's seed (BPS leaves Infomap's default, 123)", minimum=0)
    bps_merge_below: int = opt(0, "bps: merge patterns of fewer images into the most similar larger one "
                                  "(--merge-clusters --merge-threshold N; off in every BPS script: 0)", minimum=0)
    bps_centre_ratio: float = opt(0.5, "bps: share of a pattern's budget taken nearest its centroid, rounded half up; "
                                       "the rest by entropy (--hybrid-gmm-centroid-ratio 0.5)")
    bps_gmm_top: float = opt(0.1, "bps: the entropy mixture is fitted to the top max(this share, 10) entropies of "
                                  "a pattern's remaining images (--gmm-uncertainty-percentile 0.1)")
    bps_crossing: str = opt("code", "bps: upper bound of the entropy picks: the code's quadratic (code) or the "
                                    "true crossing of the two weighted Gaussians (density)", choices=CROSSINGS)

    @staticmethod
    def check(cfg) -> None:
        if not 0 <= cfg.bps_min_cosine <= 1:
            raise PrismError(f"--bps-min-cosine {cfg.bps_min_cosine}: expected a cosine in [0, 1]")
        if not 0 <= cfg.bps_centre_ratio <= 1:
            raise PrismError(f"--bps-centre-ratio {cfg.bps_centre_ratio}: expected a share in [0, 1]")
        if not 0 < cfg.bps_gmm_top <= 1:
            raise PrismError(f"--bps-gmm-top {cfg.bps_gmm_top}: expected a share in (0, 1]")


# ----------------------------------------------------------------------------- the plug-in
@PLUGINS.register("bps")
class BPS(SelectionPlugin):
    """Per class: patterns once (cached for the run), budgets, centre and entropy picks; picks in training-index
    order (BPS's ``sorted(set(...))``); extras: the image's pattern (class-local id), its size, how it was picked
    and its entropy."""

    name = "bps"
    score_kinds = ("embedding", "entropy")

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        self.patterns: dict[int, np.ndarray] = {}  # class -> (n_c,) pattern labels of its members, ascending

    def prepare(self, out, rank: int = 0) -> dict:
        import faiss
        import infomap

        cfg = self.cfg
        return {**super().prepare(out, rank), "k": cfg.bps_k, "min_cosine": cfg.bps_min_cosine,
                "trials": cfg.bps_trials, "infomap_seed": cfg.bps_infomap_seed, "merge_below": cfg.bps_merge_below,
                "centre_ratio": cfg.bps_centre_ratio, "gmm_top": cfg.bps_gmm_top, "gmm_seed": cfg.seed,
                "crossing": cfg.bps_crossing, "infomap": infomap.__version__, "faiss": faiss.__version__}

    def patterns_of(self, c: int, feats: np.ndarray) -> np.ndarray:
        if c not in self.patterns:
            cfg = self.cfg
            self.patterns[c] = class_patterns(feats, cfg.bps_k, cfg.bps_min_cosine, cfg.bps_trials,
                                              cfg.bps_infomap_seed, cfg.bps_merge_below)
            sizes = np.bincount(self.patterns[c][self.patterns[c] >= 0])
            logger.info(f"[bps] class {self.info.class_names[c]!r}: {len(sizes)} patterns "
                     f"({int((sizes == 1).sum())} single images) among {len(feats)} images")
        return self.patterns[c]

    def choose(self, c, members, ipc):
        cfg = self.cfg
        idx = members.numpy()
        feats = l2_normalise(self.scores.embedding[members].float().numpy())
        entropy = self.scores.entropy[members].double().numpy()
        labels = self.patterns_of(c, feats)
        chosen, how = select_class(labels, feats, entropy, ipc, cfg.seed, cfg.bps_centre_ratio, cfg.bps_gmm_top,
                                   cfg.bps_crossing)
        if len(chosen) < ipc:  # see the module's docstring: prismdd keeps ipc images per class
            taken = set(chosen.tolist())
            fill = [int(i) for i in centre_order(feats) if int(i) not in taken][:ipc - len(chosen)]
            logger.info(f"[bps] class {self.info.class_names[c]!r}: the rule gave {len(chosen)} of {ipc} "
                     f"images; {len(fill)} filled nearest the class centroid")
            how = dict(zip(chosen.tolist(), how)) | {i: "fill" for i in fill}
            chosen = np.array(sorted(how), dtype=int)
            how = [how[int(i)] for i in chosen]
        sizes = dict(zip(*np.unique(labels, return_counts=True)))
        extras = [{"bps_pattern": int(labels[i]), "bps_pattern_size": int(sizes[labels[i]]), "bps_by": h,
                   "entropy": round(float(entropy[i]), 6)} for i, h in zip(chosen, how)]
        return [int(idx[i]) for i in chosen], extras


# ----------------------------------------------------------------------------- the embedder (score stage)
@dataclasses.dataclass
class BPSEmbedOptions(EmbedderOptions):
    """``--embed bps``'s settings, at BPS's CIFAR script values (``script/run_cifar*.sh``)."""

    bps_embed_arch: str = opt("resnet18", "embed bps: the backbone trained from scratch, its classifier removed "
                                          "(BPS: torchvision ResNet-18)")
    bps_embed_width: float = opt(1.0, "embed bps: the backbone's width multiplier (BPS: 1)")
    bps_embed_epochs: int = opt(30, "embed bps: training epochs (BPS: 30)", minimum=1)
    bps_embed_batch: int = opt(128, "embed bps: batch size, capped at the training set (BPS: 128 CIFAR, 256 "
                                    "Tiny-ImageNet, 512 ImageNet)", minimum=2)
    bps_embed_queue: int = opt(65536, "embed bps: MoCo queue of keys, rounded down to a multiple of the batch "
                                      "(BPS: 65536; 131072 ImageNet)", minimum=2)
    bps_embed_lr: float = opt(0.02, "embed bps: SGD learning rate, cosine over the epochs (BPS: 0.02; 0.04 ImageNet)")
    bps_embed_crop: float = opt(0.2, "embed bps: RandomResizedCrop scale floor of the two views (MoCo v2: 0.2)")


@embedder("bps")
class BPSEmbedder(Embedder):
    """BPS's own embedding: the backbone trained as its stage 1 (``train_embedder``: 0.5 CE + 0.5 InfoNCE against a
    MoCo queue + the ramped pattern loss) on the training split at the dataset's own resolution (BPS: 224 px), then
    its features (the classifier's input) of the normalised, un-augmented image in eval mode. Views: a random resized
    crop (floor ``--bps-embed-crop``) and a flip; MoCo v2's colour jitter, greyscale and blur are left out. Every
    torchrun rank trains the same network from ``--seed`` (the embedder contract: nothing depends on the rank), so
    ranks agree with one process; the network is not saved: a score run killed while it trains starts it again."""

    options = BPSEmbedOptions
    summary = "BPS's stage-1 network (CE + InfoNCE + pattern loss), trained here from scratch (--bps-embed-*)"

    @classmethod
    def settings(cls, cfg) -> dict:
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BPSEmbedOptions)} | {"seed": cfg.seed}

    @classmethod
    def check(cls, cfg) -> None:
        if not 0 < cfg.bps_embed_crop <= 1:
            raise PrismError(f"--bps-embed-crop {cfg.bps_embed_crop}: expected a scale floor in (0, 1]")

    def __init__(self, cfg, info, train, device: torch.device):
        super().__init__(cfg, info, train, device)
        rngs = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rngs):  # seeded initial weights; the caller's global RNG is left as it was
            torch.manual_seed(derive_seed(cfg.seed, "bps-embed", "init"))
            backbone = create_model(cfg.bps_embed_arch, info.num_classes, info.channels, info.resolution,
                                    cfg.bps_embed_width)
            last = [name for name, m in backbone.named_modules() if isinstance(m, nn.Linear)][-1]
            parent, _, attr = last.rpartition(".")
            width = getattr(backbone.get_submodule(parent), attr).in_features
            setattr(backbone.get_submodule(parent), attr, nn.Identity())  # BPS: ``model.fc = nn.Identity()``
            net = EmbedNet(backbone, width, info.num_classes).to(device)
        n = len(train)
        batch = min(cfg.bps_embed_batch, n)
        queue = max(batch, cfg.bps_embed_queue // batch * batch)

        def fetch(idx):
            return normalize(train.get_images(idx).to(device), info)

        def augment(x, g):
            return apply_views(x, sample_views(len(x), g, scale=(cfg.bps_embed_crop, 1.0)))

        logger.info(f"[score] embed bps: training {cfg.bps_embed_arch} (width {cfg.bps_embed_width}) on {n} images, "
                    f"{cfg.bps_embed_epochs} epochs, batch {batch}, queue {queue}")
        train_embedder(net, fetch, train.targets.to(torch.int64), augment, epochs=cfg.bps_embed_epochs,
                       batch=batch, queue_size=queue, lr=cfg.bps_embed_lr, seed=derive_seed(cfg.seed, "bps-embed"),
                       log=lambda r: logger.info(f"[score] embed bps: {r}"))
        self.backbone = net.backbone.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(normalize(images.to(self.device), self.info)).float().cpu()
