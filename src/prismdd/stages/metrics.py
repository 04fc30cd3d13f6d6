"""metrics: diversity of distilled sets, measured in the feature space of an independent observer network.

PRISM's diversity claim (METHOD.md section 2): its images have a lower *intra-class* feature cosine
similarity than SRe2L's (paper Fig. 4), i.e. images of one class are spread out more. Fig. 1 shows the
same thing as a 2-D embedding of the features.

The probe must be an **observer** that did not take part in synthesis: a teacher whose BN statistics or
logits shaped the pixels rates its own artefacts (even noise-like ones) as diverse (METHOD.md section 7).
``metrics`` therefore refuses an observer whose architecture is among a set's synthesis teachers.

Every distilled set is reported next to a seeded random real subset with the same IPC, so the numbers
have a reference point.

Output in ``out/``: ``metrics.json`` (per set: intra/inter-class cosine, per-class values, counts; the
2-D embedding in the report's schema), ``manifest.json`` and ``config.yaml``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..artifacts import (METRICS_FILE, WEIGHTS, file_digest, find_one_teacher, images_digest, load_distilled,
                         load_model, locked_stage, with_distilled_dataset, write_manifest)
from ..core.config import FROM_DISTILLED, CommonConfig, comma_list, opt
from ..core.data import (DatasetInfo, TensorImages, class_indices, load_dataset, load_indices, random_real_indices,
                         subset_split)
from ..core.errors import PrismError
from ..core.io import write_json
from ..core.runtime import Timer, make_generator, resolve_device
from ..core.text import format_table
from ..core.training import extract_features
from ..core.log import get_logger

logger = get_logger("metrics")

COS_EPS = 1e-12  # guards the norm of an all-zero feature vector (its cosine with anything counts as 0)
REFERENCE_NAME = "random-real"
EMBED_PCA_DIMS = 50  # PCA before t-SNE/UMAP: removes noise dimensions, keeps t-SNE fast on a CPU
TSNE_EXACT_BELOW = 500  # exact t-SNE below this many points (Barnes-Hut only pays off above it)
EMBED_MAX_PER_SET = 500  # points per set in the 2-D embedding (seeded subsample above it)
OBSERVER_CHANCE_FACTOR = 2.0  # warn when the observer's test top-1 is below this many times chance
COLLAPSED_COS = 0.99  # warn when real class means are this similar: the observer's features have collapsed


@dataclass
class MetricsConfig(CommonConfig):
    """``dataset`` and the resolution come from the distilled sets themselves (all must agree)."""

    dataset: str | None = opt(None, f"a name from `prismdd datasets`; {FROM_DISTILLED}")
    out: str = opt("runs/metrics", "output folder: metrics.json, manifest.json, config.yaml", hashed=False)
    distilled: str = opt("", "comma list of distilled folders (recover outputs) to measure", many=True, path=True)
    observer: str = opt("runs/teachers/observer", "teacher folder of a network that took NO part in synthesis",
                        path=True)
    random_ipc_seed: int = opt(0, "seed of the random real subset (same IPC) reported as a reference point")

    @property
    def folders(self) -> list[str]:
        return comma_list(self.distilled)


# ----------------------------------------------------------------------------- the math
def diversity_from_features(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Cosine-similarity diversity statistics of (N, D) features with class ``targets`` (N,).

    - ``intra_class_cos``: mean over classes of the mean pairwise cosine similarity between the features of
      that class's images, diagonal excluded. Lower = more diverse (the paper's Fig. 4 quantity).
    - ``inter_class_cos``: mean cosine similarity between the mean features of two different classes
      (all unordered pairs). Lower = classes further apart.
    Classes with fewer than 2 images have no pairs: they are skipped for the intra-class mean (noted);
    classes with 0 images are skipped for the inter-class mean.
    """
    features = torch.as_tensor(features, dtype=torch.float64)
    targets = torch.as_tensor(targets).long()
    if features.ndim != 2 or len(features) != len(targets):
        raise PrismError(f"features {tuple(features.shape)} and targets {tuple(targets.shape)}: "
                         f"expected (N, D) and (N,)")
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(COS_EPS)  # (N, D)
    per_class, notes, means = [], [], []
    for c, idx in enumerate(class_indices(targets, num_classes)):
        n = len(idx)
        entry = {"class": c, "n": n, "intra_class_cos": None}
        if n >= 2:
            u = unit[idx]  # (n, D)
            sim = u @ u.T  # (n, n) cosine similarities
            entry["intra_class_cos"] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
        else:
            notes.append(f"class {c}: {n} image(s), no pairs; skipped in the intra-class mean")
        if n >= 1:
            means.append(features[idx].mean(0))
        per_class.append(entry)
    intra = [e["intra_class_cos"] for e in per_class if e["intra_class_cos"] is not None]
    inter = None
    if len(means) >= 2:
        m = torch.stack(means)  # (K, D) class-mean features
        mu = m / m.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
        sim = mu @ mu.T  # (K, K)
        k = len(means)
        inter = float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1)))
    else:
        notes.append("fewer than 2 classes with images: no inter-class similarity")
    return {
        "intra_class_cos": float(np.mean(intra)) if intra else None,
        "inter_class_cos": inter,
        "per_class": per_class,
        "n_per_class": [e["n"] for e in per_class],
        "num_images": int(len(targets)),
        "feature_dim": int(features.shape[1]),
        "notes": notes,
    }


def feature_diversity(images_uint8: torch.Tensor, targets: torch.Tensor, info: DatasetInfo,
                      observer_model: nn.Module, device) -> dict:
    """Diversity statistics of a set of uint8 images in the observer's penultimate feature space.

    Returns ``intra_class_cos`` (lower = more diverse), ``inter_class_cos``, ``per_class`` (class, n,
    intra_class_cos), ``n_per_class``, ``num_images``, ``feature_dim`` and ``notes``; see
    ``diversity_from_features``.
    """
    feats = extract_features(images_uint8, info, observer_model, device)
    return diversity_from_features(feats, targets, info.num_classes)


def random_real_reference(train_split, num_classes: int, ipc: int, seed: int) -> TensorImages:
    """A seeded random real subset with ``ipc`` images of every class, as uint8 ``TensorImages``.

    The draw is ``random_real_indices``, so for the same seed these are exactly the images the random-real
    student baseline trains on. The chosen train indices are in ``.indices``.
    """
    if ipc < 1:
        raise PrismError(f"random real reference: ipc must be >= 1, got {ipc}")
    indices = random_real_indices(train_split, num_classes, ipc, seed)
    sub = subset_split(train_split, indices)
    if not isinstance(sub, TensorImages):  # file-backed split: decode the few chosen images once
        sub = TensorImages(sub.get_images(torch.arange(len(sub))), sub.targets)
    sub.indices = indices
    return sub


def embed_2d(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D embedding of (N, D) features -> ((N, 2) float array, method name: "umap" | "tsne" | "pca").

    UMAP when ``umap-learn`` is installed (the paper's Fig. 1), else scikit-learn t-SNE (perplexity adapted
    to small N; exact gradients below ``TSNE_EXACT_BELOW`` points, where they are also the faster choice),
    else (N < 5) PCA. Features are first reduced to ``EMBED_PCA_DIMS`` dimensions with PCA, the usual
    denoising step that also keeps t-SNE fast on a CPU.
    """
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros((0, 2)), "none"
    x = x.reshape(n, -1)
    from sklearn.decomposition import PCA

    if np.ptp(x, axis=0).max() <= 1e-12 * max(1.0, np.abs(x).max()):
        return np.zeros((n, 2)), "none (all features identical)"  # a collapsed observer: nothing to embed
    if n < 5:
        k = min(2, n, x.shape[1])
        out = np.zeros((n, 2))
        if n >= 2 and k >= 1:
            out[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(x)
        return out, "pca"
    if x.shape[1] > EMBED_PCA_DIMS and n > EMBED_PCA_DIMS:
        x = PCA(n_components=EMBED_PCA_DIMS, random_state=seed).fit_transform(x)
    try:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), "umap"
    except ImportError:
        pass
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))  # t-SNE needs perplexity < n
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method="exact" if n < TSNE_EXACT_BELOW else "barnes_hut")
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "tsne"


def embedding(feature_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int,
              max_per_set: int = EMBED_MAX_PER_SET) -> dict:
    """Joint 2-D embedding of several feature sets, in the report's ``embedding`` schema.

    ``feature_sets``: ``{label: (features (N, D), targets (N,))}``, e.g. ``{"real": ..., "prism": ...}``;
    a set larger than ``max_per_set`` is subsampled (seeded), since t-SNE on a CPU grows quadratically.
    Returns ``{"method", "points", "labels", "classes"}`` (one entry per point).
    """
    labels, classes, feats = [], [], []
    for name, (f, t) in feature_sets.items():
        f = np.asarray(f, dtype=np.float64).reshape(len(t), -1)
        t = np.asarray(torch.as_tensor(t).tolist(), dtype=np.int64)
        if len(t) > max_per_set:
            keep = np.sort(torch.randperm(len(t), generator=make_generator(seed, "embed", name))[:max_per_set].numpy())
            f, t = f[keep], t[keep]
        feats.append(f)
        labels += [name] * len(t)
        classes += [int(c) for c in t]
    if not feats:
        return {"method": "none", "points": [], "labels": [], "classes": []}
    points, method = embed_2d(np.concatenate(feats), seed)
    return {"method": method, "points": [[round(float(a), 5), round(float(b), 5)] for a, b in points],
            "labels": labels, "classes": classes}


# ----------------------------------------------------------------------------- the stage
def check_observer(observer_arch: str, manifest: dict, folder) -> None:
    """Refuse an observer whose architecture took part in the synthesis of a set (METHOD.md section 7)."""
    teachers = (manifest.get("inputs") or {}).get("teachers") or {}
    if observer_arch in teachers:
        raise PrismError(
            f"--observer: {observer_arch!r} took part in the synthesis of {folder} (its teachers: "
            f"{', '.join(teachers)}); a teacher that shaped the pixels is a misleading diversity probe (it rates "
            f"its own artefacts, even noise-like images, as diverse; METHOD.md section 7). Train an observer "
            f"of another architecture, e.g. `prismdd squeeze --arch mobilenet_v2 --out runs/teachers/observer`")


def _set_name(manifest: dict, folder: Path, taken: set) -> str:
    name = (manifest.get("config") or {}).get("method") or manifest.get("stage") or folder.name
    if name in taken or name in (REFERENCE_NAME, "real"):
        name = f"{name}:{folder.name}"
    while name in taken:
        name += "'"
    return name


def _ipc(targets: torch.Tensor, manifest: dict) -> int:
    ipc = (manifest.get("config") or {}).get("ipc")
    if ipc:
        return int(ipc)
    counts = Counter(targets.tolist())
    return max(counts.values()) if counts else 0


def _same_dataset(a: DatasetInfo, b: DatasetInfo) -> bool:
    return (a.name, list(a.class_names), a.channels, a.resolution) == (b.name, list(b.class_names), b.channels,
                                                                        b.resolution)


@locked_stage("metrics")
def metrics(cfg: MetricsConfig) -> dict:
    """Measure every distilled set (plus a random real reference) with the observer; write metrics.json."""
    timer = Timer()
    if not cfg.folders:
        raise PrismError("--distilled: give one or more recover output folders, comma separated")
    device = resolve_device(cfg.device)
    sets = [load_distilled(f) for f in cfg.folders]
    info = sets[0].info
    # the dataset is the distilled sets' own; record that (not the CLI default) in config.yaml and the manifest
    cfg = with_distilled_dataset(cfg, sets[0].manifest, sets[0].folder)
    for s in sets[1:]:
        if not _same_dataset(s.info, info):
            raise PrismError(f"--distilled: {s.folder} is {s.info.name} at {s.info.resolution} px, {sets[0].folder} "
                             f"is {info.name} at {info.resolution} px; measure one dataset per run")
    obs_folder = find_one_teacher(cfg.observer, "--observer")
    observer, card = load_model(obs_folder, dataset=info.name, class_names=info.class_names,
                                resolution=info.resolution, device=device)
    for s in sets:
        check_observer(card["arch"], s.manifest, s.folder)
    warnings = []
    chance = 100.0 / info.num_classes
    if card.get("test_top1") is not None and card["test_top1"] < OBSERVER_CHANCE_FACTOR * chance:
        warnings.append(f"observer {card['arch']} has test top-1 {card['test_top1']:.1f}% (chance {chance:.1f}%): "
                        f"its features say little about the images; train it longer")

    train, _, _ = load_dataset(info.name, cfg.data_root, cfg.download, info.resolution, info.channels, cfg.eval_crop,
                               cfg.num_workers)
    if cfg.subset:
        train = subset_split(train, load_indices(cfg.subset, len(train)))

    results: dict[str, dict] = {}
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    inputs = {}
    for s in sets:
        name = _set_name(s.manifest, s.folder, set(results))
        feats = extract_features(s.images, info, observer, device)
        results[name] = dict(kind="distilled", folder=str(s.folder), ipc=_ipc(s.targets, s.manifest),
                             **diversity_from_features(feats, s.targets, info.num_classes))
        features[name] = (feats, s.targets)
        inputs[name] = {"folder": str(s.folder), "config_hash": s.manifest.get("config_hash"),
                        "images_sha256": images_digest(s.images, s.targets)}
    ipcs = sorted({r["ipc"] for r in results.values()})
    references, real_feats = {}, None
    for ipc in ipcs:
        ref_name = REFERENCE_NAME if len(ipcs) == 1 else f"{REFERENCE_NAME}-ipc{ipc}"
        ref = random_real_reference(train, info.num_classes, ipc, cfg.random_ipc_seed)
        feats = extract_features(ref.images, info, observer, device)
        references[ref_name] = dict(kind="reference", folder=None, ipc=ipc, seed=cfg.random_ipc_seed,
                                    train_indices=ref.indices.tolist(),
                                    **diversity_from_features(feats, ref.targets, info.num_classes))
        real_feats = real_feats or (feats, ref.targets)  # the embedding's real points: the first reference
    results.update(references)
    collapsed = [k for k, v in references.items() if (v["inter_class_cos"] or 0) > COLLAPSED_COS]
    if collapsed:
        warnings.append(f"observer features of real images of different classes have cosine > {COLLAPSED_COS} "
                        f"({', '.join(collapsed)}): the observer does not separate classes, so these numbers "
                        f"cannot rank diversity")

    emb = embedding({"real": real_feats, **features}, cfg.seed)
    out = Path(cfg.out)
    observer_info = {"arch": card["arch"], "folder": str(obs_folder), "test_top1": card.get("test_top1"),
                     "width": card["spec"].get("width"), "sha256": file_digest(obs_folder / WEIGHTS)}
    report = {"dataset": info.name, "observer": observer_info, "sets": results, "embedding": emb, "warnings": warnings,
              "note": "cosine similarity of the observer's penultimate features; lower intra-class cosine = "
                      "more diverse"}
    write_json(out / METRICS_FILE, report)
    write_manifest(out, "metrics", cfg,
                   inputs={"dataset": info.to_dict(), "distilled": inputs, "observer": observer_info},
                   outputs={"metrics": METRICS_FILE,
                            "summary": {k: {"intra_class_cos": v["intra_class_cos"],
                                            "inter_class_cos": v["inter_class_cos"], "images": v["num_images"]}
                                        for k, v in results.items()}},
                   wall_time=timer.elapsed)
    rows = [{"set": k, "ipc": v["ipc"], "intra-class cos": _fmt(v["intra_class_cos"]),
             "inter-class cos": _fmt(v["inter_class_cos"]), "images": v["num_images"]} for k, v in results.items()]
    logger.info(f"[metrics] observer {card['arch']} ({obs_folder}); lower intra-class cos = more diverse")
    logger.info(format_table(rows, ["set", "ipc", "intra-class cos", "inter-class cos", "images"]))
    for w in warnings:
        logger.warning(f"[metrics] WARNING: {w}")
    logger.info(f"[metrics] -> {out / METRICS_FILE} ({timer.elapsed:.1f}s)")
    return report


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
