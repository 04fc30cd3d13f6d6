"""audit: membership-inference audit of PRISM's privacy claim (METHOD.md section 6, seed Appendix A).

The paper argues by analogy to PATE that disagreeing teacher architectures protect individual training
images. That is not a differential-privacy guarantee, so prismdd *measures* what an attacker learns:

Set-up
    An audit **pool** is drawn from the training split. The **target** pipeline is trained on a random half
    of it (the members; the other half are non-members). A pipeline is: teachers (squeeze) -> distilled
    set (recover: PRISM, SRe2L) -> student (validate), or a student on a random real subset with the same
    IPC. Every stage is the existing one, restricted to the members with its ``subset`` option.
    **Shadow** pipelines are the same pipeline on other random halves of the pool, in complementary
    pairs, so every example is IN for exactly half of an even number of shadows.
Targets
    ``teacher`` (the primary teacher itself), ``prism`` / ``sre2l`` (students of the distilled sets),
    ``random-real`` (a student of IPC real member images with the same soft-label protocol).
Attacks
    ``threshold``: the true-class confidence (rank-equivalent to the negative loss; scored as its logit,
    which does not saturate in float32); needs no shadows.
    ``lira-offline`` / ``lira-online``: the likelihood-ratio attack of Carlini et al. (2022) on
    phi = log(p / (1 - p)) of the true class, averaged over the image and its flip: online compares
    Gaussians fitted to the shadows' phi where the example was IN and OUT; offline uses the OUT Gaussian
    only (a one-sided test). With few shadows one global variance per group is used (the paper's advice).
Metrics
    ROC AUC and TPR at 0.1 % and 1 % FPR (read off the piecewise-linear ROC), with percentile bootstrap
    confidence intervals (members and non-members resampled separately, seeded), the counts behind them,
    and a log-log ROC plot. Rows are computed on three example sets: ``pool`` (every non-canary pool
    example), ``direct`` (only the members whose pixels entered the student's training set directly: the
    real-image initialisation of PRISM, the random real subset; non-members as in ``pool``) and ``canaries``.

Output in ``out/``: ``audit.json``, ``audit_roc.png``, ``manifest.json``, ``plan.json`` (pool, halves,
canaries) and ``models/<target|shadow_NN>/`` (one folder per pipeline: its member indices, teachers,
distilled sets, students and a log of the stages' output). Every trained model lives in its own folder
and the stages skip finished work, so re-running the same command resumes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..artifacts import CARD, load_distilled, load_model, reusable, write_manifest
from ..core.config import comma_list, config_to_dict
from ..core.data import load_dataset
from ..core.io import atomic_path, read_json, write_json
from ..core.runtime import Timer, derive_seed, resolve_device, torch_threads
from ..core.text import format_table
from ..core.training import example_scores
from ..pipeline import Stages
from .attacks import CI_LEVEL, FPR_POINTS, GLOBAL_VARIANCE_BELOW, attack_scores, bootstrap_ci, roc_metrics
from .config import DISTILLED, AuditConfig, resolve_config
from .plan import _digest, canary_dataset, make_plan, shadow_masks
from ..core.log import get_logger, to_file

logger = get_logger("audit")

NOTE = ("Empirical membership-inference attack measurement on this run: it bounds what these attacks "
        "achieve, not what any attack could. It is not a differential-privacy guarantee (no gradient "
        "clipping, no calibrated noise, teachers trained on the same data). AUC 0.5 and TPR equal to the "
        "FPR are chance level.")

# settings that decide what each model is trained on / how: a re-run into the same folder must agree on them
TRAINING_KEYS = ("dataset", "data_root", "resolution", "subset", "seed", "pool_size", "background", "canaries",
                 "teacher_arch", "bn_pool", "width", "teacher_epochs", "teacher_batch_size", "ipc",
                 "iterations", "student", "student_width", "student_epochs", "student_protocol")


# ----------------------------------------------------------------------------- pipelines
def model_seed(seed: int, index: int) -> int:
    """Stage seed of pipeline ``index`` (0 = target): weight init, data order, views and draws all differ."""
    return derive_seed(seed, "audit", "model", index) % (2 ** 31)


def train_pipeline(cfg: AuditConfig, folder: Path, index: int, members: np.ndarray, dataset: str
                   ) -> tuple[dict[str, Path], dict[str, Path]]:
    """Train pipeline ``index`` on ``members`` (train indices) with the main job's stage runner; resumable.

    Returns ``(models, sources)``: the attacked model folder of each target, and the folder each student
    learned from (a recover output, or the random-real validate output that records its draw).
    """
    folder.mkdir(parents=True, exist_ok=True)
    subset = folder / "members.npy"
    if not subset.exists():
        np.save(subset, np.sort(members).astype(np.int64))
    targets = cfg.target_list
    common = dict(dataset=dataset, data_root=cfg.data_root, download=cfg.download, device=cfg.device,
                  resolution=cfg.resolution, num_workers=cfg.num_workers, subset=str(subset),
                  seed=model_seed(cfg.seed, index), threads=cfg.threads)  # each stage sets its own count
    pool = comma_list(cfg.bn_pool)
    archs = [cfg.teacher_arch] + ([a for a in pool if a != cfg.teacher_arch] if "prism" in targets else [])
    stages = Stages(folder, cfg.force)
    student_name = f"{cfg.student}_seed{index}"
    models, sources = {}, {}
    with to_file(folder / "stages.log"):  # the stages' messages, a line at a time (tail -f works), not the terminal
        teachers = stages.teachers("teachers", common, archs, width=cfg.width, epochs=cfg.teacher_epochs,
                                   batch_size=cfg.teacher_batch_size)
        models["teacher"] = teachers / cfg.teacher_arch
        student = dict(protocol=cfg.student_protocol, teachers=str(teachers), label_teachers=cfg.teacher_arch,
                       student=cfg.student, student_width=cfg.student_width, epochs=cfg.student_epochs,
                       seeds=str(index), eval_every=cfg.student_epochs)
        for method in DISTILLED:
            if method not in targets:
                continue
            # FRePo trains its own pool networks (no teacher): their CPU size is the audit's
            own = dict(frepo_width=cfg.frepo_width, frepo_real_batch=cfg.frepo_real_batch) if method == "frepo" else {}
            sources[method] = stages.recover(method, common, teachers, primary=cfg.teacher_arch,
                                             bn_pool=",".join(pool) if method == "prism" else cfg.teacher_arch,
                                             ipc=cfg.ipc, iterations=cfg.iterations, **own)
            ev, _ = stages.validate(f"validate-{method}", common, **student, distilled=str(sources[method]))
            models[method] = ev / student_name
        if "random-real" in targets:
            ev, _ = stages.validate("validate-random-real", common, **student, random_real=True, ipc=cfg.ipc)
            models["random-real"] = sources["random-real"] = ev / student_name
    return models, sources


def direct_members(target: str, source: Path | None, members_sorted: np.ndarray) -> np.ndarray | None:
    """Train indices of the members whose pixels entered a student's training set directly, or None.

    Read from what the stages recorded, not re-derived: a distilled set's real starts (recover records
    each image's start indices, relative to the member subset) and the random-real draw (validate records
    it in its manifest). Noise-initialised sets and the teacher: None.
    """
    if source is None:
        return None
    if target == "random-real":
        m = read_json(source.parent / "manifest.json")
        return members_sorted[np.asarray(m["inputs"]["source"]["indices"], dtype=np.int64)]
    starts = [s for s in load_distilled(source).start_indices if s is not None]
    if not starts:
        return None
    return members_sorted[np.unique(np.asarray(starts, dtype=np.int64).ravel())]


def _check_plan(out: Path, cfg: AuditConfig, plan: dict) -> None:
    """Refuse to mix models trained under other settings into this audit (resume safety)."""
    # (frepo_width / frepo_real_batch are not here: they shape only the frepo recover stage, whose own config hash
    # names its folder, so another value makes new FRePo sets beside the old instead of mixing with them)
    training = {k: v for k, v in config_to_dict(cfg).items() if k in TRAINING_KEYS}
    record = {"training": training, "pool_digest": _digest(plan["pool"].tolist()),
              "target_digest": _digest(plan["target_in"].tolist())}
    record["config_hash"] = _digest(record)
    path = out / "plan.json"
    old = reusable(path, record["config_hash"], force=cfg.force, what="an audit")
    if old is None:
        write_json(path, record)


# ----------------------------------------------------------------------------- the stage
def audit(cfg: AuditConfig) -> dict:
    """Train the target and shadow pipelines, attack every target, write ``audit.json``; returns it."""
    cfg = resolve_config(cfg)
    with torch_threads(cfg.threads):
        return _audit(cfg)


def _audit(cfg: AuditConfig) -> dict:
    timer = Timer()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    train, _, info = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.resolution)
    plan = make_plan(cfg, len(train), info.num_classes)
    n_pool, n_shadow = len(plan["pool"]), cfg.shadow_models
    shadow_in = shadow_masks(n_pool, n_shadow, cfg.seed)
    _check_plan(out, cfg, plan)
    dataset = canary_dataset(cfg, plan)

    # --- train the pipelines (target = index 0, shadows 1..S)
    names = ["target"] + [f"shadow_{i:02d}" for i in range(1, n_shadow + 1)]
    masks = np.concatenate([plan["target_in"][None], shadow_in])
    folders: list[dict[str, Path]] = []
    target_sources: dict[str, Path] = {}
    for index, (name, mask) in enumerate(zip(names, masks)):
        t0 = Timer()
        members = np.concatenate([plan["pool"][mask], plan["background"]])
        models_, sources = train_pipeline(cfg, out / "models" / name, index, members, dataset)
        folders.append(models_)
        if index == 0:
            target_sources = sources
        logger.info(f"[audit] {name} ({index + 1}/{len(names)}): {int(mask.sum())} pool members, "
                    f"{_accuracies(folders[-1], cfg.target_list)} "
                    f"({t0.elapsed:.1f}s; log: {out / 'models' / name / 'stages.log'})")

    # --- score every pool example under every model
    train, _, info = load_dataset(dataset, cfg.data_root, cfg.download, cfg.resolution)
    pool_t = torch.as_tensor(plan["pool"])
    images, labels = train.get_images(pool_t), train.targets[pool_t]
    variance = "global" if n_shadow < GLOBAL_VARIANCE_BELOW else "per-example"
    is_canary = np.zeros(n_pool, dtype=bool)
    is_canary[plan["canary_pos"]] = True
    member = plan["target_in"]
    rows, curves, models, skipped = [], {}, {}, {}
    attacks = [a for a in cfg.attack_list if _attack_possible(a, n_shadow, skipped)]
    for target in cfg.target_list:
        stats = []
        for f in folders:
            model, _ = load_model(f[target], device=device)
            stats.append(example_scores(model, images, labels, info, device, flip=cfg.query_flip))
        card = read_json(folders[0][target] / CARD)
        models[target] = {"folder": str(folders[0][target]), "test_top1": card.get("test_top1")}
        shadow_phi = np.stack([s["phi"] for s in stats[1:]]) if n_shadow else None
        pop = {"pool": ~is_canary}
        direct = direct_members(target, target_sources.get(target), np.sort(np.concatenate(
            [plan["pool"][member], plan["background"]])))
        if direct is not None:
            models[target]["direct_members"] = len(direct)
            pop["direct"] = (np.isin(plan["pool"], direct) | ~member) & ~is_canary
        if cfg.canaries:
            pop["canaries"] = is_canary
        for attack in attacks:
            scores = attack_scores(attack, stats[0], shadow_phi, shadow_in, variance)
            for examples, sel in pop.items():
                if member[sel].all() or not member[sel].any():
                    continue
                row = _row(cfg, target, attack, examples, scores[sel], member[sel], n_shadow, card)
                if examples == "pool":
                    curves[(target, attack)] = roc_metrics(scores[sel], member[sel], curve=True)
                rows.append(row)
    _flag_best(rows)

    # --- write
    roc_path = roc_figure(curves, out / "audit_roc.png")
    result = {
        "note": NOTE,
        "dataset": cfg.dataset,
        "targets": rows,
        "models": models,
        "pool_size": n_pool,
        "members": int(member.sum()),
        "non_members": int((~member).sum()),
        "shadow_models": n_shadow,
        "background": len(plan["background"]),
        "attacks": attacks,
        "skipped_attacks": skipped,
        "lira": {"statistic": "phi = log(p/(1-p)) of the true class" + (", mean over image and flip"
                                                                          if cfg.query_flip else ""),
                 "variance": variance},
        "confidence_intervals": f"{int(CI_LEVEL * 100)}% percentile bootstrap, {cfg.bootstrap} resamples, "
                                f"members and non-members resampled separately",
        "best_attack": "per target (examples=pool): highest TPR at 1% FPR, then AUC; chosen after seeing the "
                       "results, so slightly optimistic",
        "canaries": {"count": cfg.canaries, "kind": "mislabel" if cfg.canaries else None,
                     "indices": plan["pool"][plan["canary_pos"]].tolist(), "dataset": dataset},
        "member_indices": plan["pool"][member].tolist(),
        "non_member_indices": plan["pool"][~member].tolist(),
        "roc_plot": roc_path.name if roc_path else None,
        "wall_time_s": round(timer.elapsed, 2),
    }
    write_json(out / "audit.json", result)
    write_manifest(out, "audit", cfg, inputs={"dataset": info.to_dict()},
                   outputs={"audit": "audit.json", "roc_plot": result["roc_plot"],
                            "models": [str(out / "models" / n) for n in names]},
                   wall_time=timer.elapsed)
    logger.info(audit_table(rows))
    logger.info(f"[audit] {NOTE}")
    logger.info(f"[audit] -> {out / 'audit.json'} ({timer.elapsed:.1f}s)")
    return result


def _attack_possible(attack: str, n_shadow: int, skipped: dict) -> bool:
    need = {"lira-offline": 1, "lira-online": 2}.get(attack, 0)
    if n_shadow < need:
        skipped[attack] = f"needs at least {need} shadow model(s), have {n_shadow}"
        logger.warning(f"[audit] skipping {attack}: {skipped[attack]}")
        return False
    return True


def _accuracies(folders: dict[str, Path], targets: list[str]) -> str:
    parts = []
    for t in targets:
        card = read_json(folders[t] / CARD)
        parts.append(f"{t} {card['test_top1']:.1f}%")
    return "test top-1: " + ", ".join(parts)


def _row(cfg, target, attack, examples, scores, member, n_shadow, card) -> dict:
    m = roc_metrics(scores, member)
    ci = bootstrap_ci(scores, member, cfg.bootstrap, derive_seed(cfg.seed, target, attack, examples))
    row = {"target": target, "attack": attack, "examples": examples}
    for k in ("auc", *FPR_POINTS):
        row[k] = round(m[k], 5)
        row[f"{k}_ci"] = [round(x, 5) for x in ci[k]] if k in ci else None
    n_non = int((~member).sum())
    row.update(members=int(member.sum()), non_members=n_non, shadow_models=n_shadow if attack != "threshold" else 0,
               fpr_floor=round(1.0 / n_non, 6), test_top1=card.get("test_top1"), best=False)
    return row


def _flag_best(rows: list[dict]) -> None:
    for target in {r["target"] for r in rows}:
        cands = [r for r in rows if r["target"] == target and r["examples"] == "pool"]
        if cands:
            max(cands, key=lambda r: (r["tpr_at_1pct_fpr"], r["auc"]))["best"] = True


def audit_table(rows: list[dict]) -> str:
    def ci(r, k):
        c = r.get(f"{k}_ci")
        return f"{r[k]:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")

    return format_table([{"target": r["target"], "examples": r["examples"], "attack": r["attack"] + (" *" if r["best"] else ""),
                          "AUC [95% CI]": ci(r, "auc"), "TPR@0.1%FPR": ci(r, "tpr_at_0.1pct_fpr"),
                          "TPR@1%FPR": ci(r, "tpr_at_1pct_fpr"), "members": r["members"],
                          "non-members": r["non_members"], "shadows": r["shadow_models"]} for r in rows],
                        ["target", "examples", "attack", "AUC [95% CI]", "TPR@0.1%FPR", "TPR@1%FPR", "members",
                         "non-members", "shadows"])


def roc_figure(curves: dict, path: Path) -> Path | None:
    """Log-log ROC curves, one panel per target, one line per attack, with the chance diagonal."""
    if not curves:
        return None
    targets = list(dict.fromkeys(t for t, _ in curves))
    fig = Figure(figsize=(4.2 * len(targets), 4.0))
    FigureCanvasAgg(fig)
    lo = min(float(c["fpr"][c["fpr"] > 0].min()) for c in curves.values() if (c["fpr"] > 0).any()) / 2
    for i, target in enumerate(targets):
        ax = fig.add_subplot(1, len(targets), i + 1)
        for (t, attack), c in curves.items():
            if t == target:
                ax.plot(np.maximum(c["fpr"], lo), np.maximum(c["tpr"], lo), label=f"{attack} (AUC {c['auc']:.3f})")
        ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1), title=target,
               xlabel="false-positive rate", ylabel="true-positive rate" if i == 0 else None)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


