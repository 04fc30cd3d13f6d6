"""``prismdd run``: the main job. Teachers -> every method's recovery -> students -> metrics -> report.

Size: about 520 lines: the run's options (``RunConfig``), the stage runner the audit and the benchmarks share
(``Stages``), the up-front checks, and the run with its baselines and label regimes. Every part is the
composition of stages the main job performs; none re-implements a stage.

It calls the stages, never re-implements them. Each stage writes into ``<out>/stages/<name>-<hash>``,
where the hash covers that stage's resolved config (which names the folders of the stages it reads), so
re-running the same command reuses finished stages and a changed setting redoes only what depends on it.
``--force`` redoes everything. ``Stages`` is also what the privacy audit and the benchmarks use to run the
same stages, so there is one way to compose them.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from .artifacts import ACCURACY_FILE, CARD, METRICS_FILE, MANIFEST, SCORE_KINDS, reusable, write_manifest
from .core.config import CommonConfig, build_config, comma_list, config_hash, config_to_dict, opt
from .core.data import load_splits
from .core.errors import PrismError
from .core.io import read_json, write_json
from .core.models import ARCHS, create_model, has_batchnorm
from .core.presets import METHODS, preset_file
from .core.regimes import REGIMES, regime_summary, summary_line
from .core.runtime import Timer
from .core.scores import score_row
from .core.training import trust, trust_line
from .export import OURS_TO_DDR
from .report import print_table, write_report
from .stages.metrics import MetricsConfig, metrics
from .methods import PLUGINS
from .stages.recover import RecoverConfig, recover
from .stages.score import ScoreConfig, score
from .stages.squeeze import SqueezeConfig, squeeze
from .stages.validate import HARD_LABELS, NO_AUGMENTATION, ValidateConfig, validate
from .core.log import get_logger

logger = get_logger("run")

BASELINES = ("random-real", "full")
SCORES_NOTE = ("DD-Ranking's scores (arXiv 2505.13300), accuracies as fractions, weights 0.5: LRS from HLR = full "
               "(the full row: hard labels, its capped step budget) - the set with hard labels (no augmentation, as "
               "DD-Ranking's use_aug_for_hard=False) and IOR = the set - random real under the protocol; ARS from "
               "the gaps over random real under the protocol and without augmentation (whole images, no flip, no "
               "mix). Each student is the protocol's final epoch with its fixed LR, where DD-Ranking sweeps 5 LRs "
               "and keeps the best evaluation.")


@dataclass
class RunConfig(CommonConfig):
    PRESET_FAMILY: ClassVar[str] = "run"
    PRESET_FIELD: ClassVar[str] = "quick"

    out: str = opt("runs/main", "output folder: results.json, report.html, stages/", hashed=False)
    ipc: int = opt(10, "images per class", minimum=1)
    methods: str = opt("prism,sre2l", "comma list from `prismdd methods`", choices=METHODS.names(), many=True)
    baselines: str = opt("random-real,full", "random-real (same IPC, same soft-label protocol) and/or full data",
                         choices=BASELINES, many=True)
    quick: bool = opt(False, "a smoke-sized run: fewer steps, iterations and epochs everywhere (settings you give win)")
    teacher_archs: str = opt("convnet,resnet18,mobilenet_v2", "the teacher zoo (BN pool); the first is the primary")
    teacher_width: float = opt(0.25, "width multiplier of the teachers (CPU-sized; 1.0 on a GPU)", minimum=0.01)
    teacher_steps: int = opt(500, "optimiser steps per teacher (batch 128): 500 is about one pass over Fashion-MNIST's "
                                  "60k images, trained as epochs of at most one pass (there 2 of 250 steps; the "
                                  "progress lines count both)", minimum=1)
    observer: str = opt("shufflenet_v2_x0_5", "diversity observer: an architecture that takes no part in synthesis")
    observer_steps: int = opt(200, "its training steps (it only has to give meaningful features)", minimum=1)
    iterations: int = opt(300, "recovery iterations per image", minimum=1)
    score_runs: int = opt(2, "methods that choose by training dynamics (forgetting, el2n, ccs): short runs from "
                             "scratch recorded by the score stage (`prismdd score --record-runs`; its own default 4)",
                          minimum=1)
    score_epochs: int = opt(4, "their epochs over the training set (`--record-epochs`; on Fashion-MNIST one epoch "
                               "costs about two teachers' 500 steps)", minimum=1)
    recover_batch_size: int = opt(100, "images per recovery batch", minimum=1)
    student: str = opt("convnet", "the student architecture (same protocol for every method and baseline)")
    student_width: float = opt(0.5, "width multiplier of the student", minimum=0.01)
    student_epochs: int = opt(300, "student training epochs on every set", minimum=1)
    seeds: str = opt("0", "student seeds (comma list), reported as mean +- std")
    label_teachers: str = opt("zoo", "soft-label teachers of every student, the same for every row: zoo (PRISM's "
                                     "relabel: all of --teacher-archs, norm-matched) | primary (the primary alone: "
                                     "3-20 points better for a ConvNet student on Fashion-MNIST, BENCHMARKS.md "
                                     "section 10) | a comma list from --teacher-archs")
    regimes: str = opt("kd", "label regimes every set is trained under, one column each: hard (CE on the class label, "
                              "no teacher) | soft (fixed soft labels: one teacher label per un-augmented image) | kd "
                              "(the teachers label every augmented view: the shared protocol)", choices=tuple(REGIMES),
                        many=True)
    full_reference: str = opt("steps", "the full-data baseline per regime: steps (one run of --full-steps steps, NOT "
                                       "converged) | converged (budgets of --full-start-epochs doubling until the final "
                                       "top-1 rises by less than --full-tolerance, or --full-max-epochs: a real "
                                       "ceiling, at several full-data epochs per regime)",
                              choices=("converged", "steps"))
    full_start_epochs: int = opt(1, "converged: the first budget (epochs over the whole training set)", minimum=1)
    full_max_epochs: int = opt(16, "converged: the largest budget tried", minimum=1)
    full_tolerance: float = opt(0.5, "converged: stop doubling when the final top-1 rose by less than this (points)",
                                minimum=0.0)
    full_steps: int = opt(300, "steps of the full-data baseline with --full-reference steps (batch 256)", minimum=1)
    scores: bool = opt(False, "DD-Ranking's LRS and ARS per method: adds a hard-label student (no augmentation, as "
                              "DD-Ranking trains it) and a no-augmentation student per method, and one for random "
                              "real; without it the scores show what they lack")
    eval_every: int | None = opt(None, "student epochs between test evaluations (the last is always evaluated); "
                                       "None: every 10 % of training, so the report's curve has 10 points",
                                 minimum=1, hashed=False)
    force: bool = opt(False, "redo every stage", hashed=False)

    def check(self):
        if self.observer in self.teacher_list:
            raise PrismError(f"--observer {self.observer}: also a teacher; the observer must take no part in synthesis")

    @property
    def method_list(self) -> list[str]:
        return comma_list(self.methods)

    @property
    def baseline_list(self) -> list[str]:
        return comma_list(self.baselines)

    @property
    def regime_list(self) -> list[str]:
        return comma_list(self.regimes)

    @property
    def teacher_list(self) -> list[str]:
        return comma_list(self.teacher_archs)

    @property
    def labellers(self) -> list[str]:
        """The students' soft-label teachers (``label_teachers`` resolved against the zoo)."""
        if self.label_teachers == "zoo":
            return self.teacher_list
        return self.teacher_list[:1] if self.label_teachers == "primary" else comma_list(self.label_teachers)

    @property
    def observer_width(self) -> float:
        """The teachers' width, for architectures that have a width multiplier (ShuffleNet's is in its name)."""
        return self.teacher_width if self.observer not in ARCHS or ARCHS.get(self.observer).has_width else 1.0


def run_config(**overrides) -> RunConfig:
    """API twin of the CLI: defaults < the quick preset (if quick=True) < overrides."""
    return build_config(RunConfig, overrides)


def epochs_for(steps: int, n: int, batch_size: int = 128) -> dict:
    """``epochs`` and ``steps_per_epoch`` that give about ``steps`` optimiser steps on ``n`` images."""
    full = max(1, n // batch_size)
    epochs = max(1, -(-steps // full))
    return {"epochs": epochs, "steps_per_epoch": -(-steps // epochs), "batch_size": batch_size}


COMMON_KEYS = ("dataset", "data_root", "download", "device", "seed", "num_workers", "resolution", "channels",
               "eval_crop", "subset", "threads")


def common_fields(cfg) -> dict:
    """The options every stage of a job shares, taken from the job's config."""
    return {k: getattr(cfg, k) for k in COMMON_KEYS}


class Stages:
    """Runs stage functions into hash-named folders under ``<root>/stages``, reusing finished ones.

    The one way stages are composed: the main job, the privacy audit's pipelines and the quality
    benchmark all go through it, so a stage is configured, reused and timed the same way everywhere.
    """

    def __init__(self, root, force: bool = False, score_fields: dict | None = None):
        self.root, self.force, self.timings, self.reused = Path(root), force, {}, set()
        self.folders: dict[str, Path] = {}  # stage name -> its folder, for the commands that continue from them
        # the score stage's settings for methods that choose real images by scores (``kinds``: every kind the job's
        # methods read, so one score folder serves them all)
        self.score_fields = dict(score_fields or {})

    def run(self, name: str, cls, fn: Callable, fields: dict) -> Path:
        """Run ``fn`` on ``cls(**fields)`` in ``<root>/stages/<name>-<hash>`` unless it already finished there."""
        probe = build_config(cls, dict(fields, out="x"))
        folder = self.root / "stages" / f"{name}-{config_hash(probe)[:10]}"
        cfg = build_config(cls, dict(fields, out=str(folder), force=self.force))
        t = Timer()
        if reusable(folder / MANIFEST, config_hash(cfg), force=self.force, what=f"stage {name}") is not None:
            logger.info(f"[run] {name}: reusing {folder}")
            self.reused.add(name)  # its time is the one measured when it was made
        else:
            logger.info(f"[run] {name} -> {folder}")
            fn(cfg)
        self.timings[name] = read_json(folder / MANIFEST).get("wall_time_s") or round(t.elapsed, 2)
        self.folders[name] = folder
        return folder

    def teachers(self, name: str, common: dict, archs: list[str], **fields) -> Path:
        return self.run(name, SqueezeConfig, squeeze, dict(common, arch=",".join(archs), **fields))

    def recover(self, method: str, common: dict, teachers: Path, name: str | None = None, **fields) -> Path:
        """A method's recovery (its preset under ``fields``) from the zoo in ``teachers``. A method whose preset says
        ``starts_from: <method>`` (EDC: an RDED run) gets that method's run, with the same teachers, IPC and batch
        settings, as its ``init_from`` unless one is given."""
        preset = preset_file("recover", method)
        before = preset.get("starts_from")
        need = PLUGINS.get(preset.get("plugin", "none")).score_kinds
        if need and not fields.get("select_scores"):  # a selection method: the training split's scores first
            fields["select_scores"] = str(self.scores(common, teachers, need, embed_arch=fields.get("primary")))
        if before and not fields.get("init_from"):
            shared = {k: v for k, v in fields.items() if k in ("primary", "bn_pool", "ipc", "iterations", "batch_size")}
            fields["init_from"] = str(self.recover(before, common, teachers, **shared))
        return self.run(name or f"recover-{method}", RecoverConfig, recover,
                        dict(common, method=method, teachers=str(teachers), **fields))

    def scores(self, common: dict, teachers: Path, need, **fields) -> Path:
        """The training split's per-example scores (``prismdd score``) with the kinds in ``need`` and those of
        ``score_fields``, from the zoo in ``teachers``; one folder, reused by every method that reads them."""
        fields = {k: v for k, v in dict(self.score_fields, **fields).items() if v is not None}
        wanted = set(need) | set(comma_list(fields.pop("kinds", "")))
        kinds = ",".join(k for k in SCORE_KINDS if k in wanted)
        return self.run("scores", ScoreConfig, score, dict(common, teachers=str(teachers), kinds=kinds, **fields))

    def validate(self, name: str, common: dict, **fields) -> tuple[Path, dict]:
        """A student evaluation; returns its folder and its ``accuracy.json``."""
        folder = self.run(name, ValidateConfig, validate, dict(common, **fields))
        return folder, read_json(folder / ACCURACY_FILE)

    def metrics(self, name: str, common: dict, distilled: list[Path], observer: Path, **fields) -> dict:
        """Diversity of the distilled sets under ``observer``; returns its ``metrics.json``."""
        folder = self.run(name, MetricsConfig, metrics,
                          dict(common, distilled=",".join(map(str, distilled)), observer=str(observer), **fields))
        return read_json(folder / METRICS_FILE)


def preflight(cfg: RunConfig, common: dict, train, test, info) -> None:
    """Check, before any compute is spent, that every requested stage can run on this data: each stage's config
    builds, every class has the real images that recovery (real init) and the random-real baseline draw, the
    test split is not empty, and every network (teachers, observer, student) runs on the images' size and
    channels; the primary teacher has BatchNorm. All problems are reported together in one line."""
    problems = []
    counts = torch.bincount(train.targets, minlength=info.num_classes).tolist()

    def short_classes(need: int) -> str | None:
        few = [(info.class_names[c], n) for c, n in enumerate(counts) if n < need]
        return None if not few else f"class {few[0][0]!r} has {few[0][1]} training images" + (
            f" ({len(few) - 1} more classes too few)" if len(few) > 1 else "")

    if len(test) == 0:
        problems.append("the test split is empty (every student is evaluated on it)")
    for method in cfg.method_list:
        try:
            rc = build_config(RecoverConfig, dict(common, method=method, teachers="-", primary=cfg.teacher_list[0],
                                                  ipc=cfg.ipc, iterations=cfg.iterations,
                                                  batch_size=cfg.recover_batch_size, out="-"))
            build_config(ValidateConfig, dict(common, protocol="prism", distilled="-", teachers="-", out="-",
                                              student=cfg.student, student_width=cfg.student_width))
        except PrismError as e:
            problems.append(f"method {method}: {e}")
            continue
        need = cfg.ipc * rc.init_tiles ** 2 if rc.init == "real" else 0
        if need and (msg := short_classes(need)):
            problems.append(f"--ipc {cfg.ipc}: method {method} starts from {need} real images per class, but {msg}; "
                            f"lower --ipc")
    if "random-real" in cfg.baseline_list and (msg := short_classes(cfg.ipc)):
        problems.append(f"--ipc {cfg.ipc}: the random-real baseline draws {cfg.ipc} images per class, but {msg}")
    nets = [("--teacher-archs", a, cfg.teacher_width) for a in cfg.teacher_list]
    nets.append(("--observer", cfg.observer, cfg.observer_width))
    nets.append(("--student", cfg.student, cfg.student_width))
    x = torch.zeros(2, info.channels, info.resolution, info.resolution)
    for flag, arch, width in nets:
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # leaves the global random state untouched
                model = create_model(arch, info.num_classes, info.channels, info.resolution, width).eval()
                model(x)
        except PrismError as e:
            problems.append(f"{flag} {arch}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - a network that cannot take this image size fails here, not hours later
            problems.append(f"{flag} {arch}: cannot run on {info.resolution} px {info.channels}-channel images "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); pick another or pass --resolution")
            continue
        if flag == "--teacher-archs" and arch == cfg.teacher_list[0] and not has_batchnorm(model):
            problems.append(f"--teacher-archs: the primary {arch} has no BatchNorm layers; put a BN architecture first")
    if strangers := [a for a in cfg.labellers if a not in cfg.teacher_list]:
        problems.append(f"--label-teachers: {', '.join(strangers)} not in --teacher-archs ({cfg.teacher_archs}); "
                        f"use zoo, primary or names from it")
    existing = next(p for p in [Path(cfg.out).absolute(), *Path(cfg.out).absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        problems.append(f"--out {cfg.out}: {existing} is not a writable folder")
    if problems:
        raise PrismError("run: nothing was computed, fix first: " + "; ".join(problems))


def run(cfg: RunConfig) -> dict:
    """The whole job; returns the results dict (also written to ``<out>/results.json``)."""
    total = Timer()
    out = Path(cfg.out)
    common = common_fields(cfg)
    # the per-example scores the selection methods among --methods read, made once for all of them
    kinds = [k for m in cfg.method_list for k in PLUGINS.get(preset_file("recover", m).get("plugin", "none")).score_kinds]
    stages = Stages(out, cfg.force, score_fields=dict(kinds=",".join(dict.fromkeys(kinds)), record_runs=cfg.score_runs,
                                                      record_epochs=cfg.score_epochs,
                                                      record_width=cfg.teacher_width))
    train, test, info = load_splits(cfg)  # fail early on missing data, before any training
    preflight(cfg, common, train, test, info)

    # ------------------------------------------------------------------ squeeze: the zoo + the observer
    zoo = cfg.teacher_list
    teacher_epochs = epochs_for(cfg.teacher_steps, len(train))
    observer_epochs = epochs_for(cfg.observer_steps, len(train))
    teachers_dir = stages.teachers("teachers", common, zoo, width=cfg.teacher_width, **teacher_epochs,
                                   eval_every=max(1, teacher_epochs["epochs"] // 4))
    observer_dir = stages.teachers("observer", dict(common, seed=cfg.seed + 1000),  # another seed as well as arch
                                   [cfg.observer], width=cfg.observer_width, **observer_epochs,
                                   eval_every=observer_epochs["epochs"])
    primary = zoo[0]
    teacher_cards = {a: read_json(teachers_dir / a / CARD) for a in zoo}
    observer_card = read_json(observer_dir / cfg.observer / CARD)
    # said before their labels and statistics are used: a student cannot beat anything with chance-level teachers
    for role, arch, card in [("teacher", a, c) for a, c in teacher_cards.items()] + [
            ("observer", cfg.observer, observer_card)]:
        line = trust_line(role, arch, card["test_top1"], info.num_classes)
        if line:
            logger.warning(f"[run] {line}")

    # ------------------------------------------------------------------ recover + validate per method and regime
    regimes = cfg.regime_list
    rows, distilled = [], {}
    for method in cfg.method_list:
        rec_dir = stages.recover(method, common, teachers_dir, primary=primary, ipc=cfg.ipc,
                                 iterations=cfg.iterations, batch_size=cfg.recover_batch_size)
        distilled[method] = rec_dir
        per = {r: stages.validate(regime_stage(method, r), common, **regime_student(cfg, r, teachers_dir),
                                  distilled=str(rec_dir))[1] for r in regimes}
        # a selection method's cost includes the scores it chose by (shared by every such method of the run)
        built = stages.timings[f"recover-{method}"] + (stages.timings.get("scores", 0.0) if PLUGINS.get(
            preset_file("recover", method).get("plugin", "none")).score_kinds else 0.0)
        rows.append(_regime_row(method, per, regimes, rec_dir, stages, built))
    if "random-real" in cfg.baseline_list:
        per = {r: stages.validate(regime_stage("random-real", r), common, **regime_student(cfg, r, teachers_dir),
                                  random_real=True, ipc=cfg.ipc)[1] for r in regimes}
        rows.append(_regime_row("random-real", per, regimes, None, stages, 0.0))
    student = regime_student(cfg, "kd", teachers_dir)
    extra = {}  # method -> {"syn_hard": top-1, "syn_noaug": top-1}: the scores' students beside the protocol's
    if cfg.scores:
        for method, rec_dir in distilled.items():
            _, acc_h = stages.validate(f"validate-{method}-hard", common, **dict(student, **HARD_LABELS),
                                       distilled=str(rec_dir))
            _, acc_n = stages.validate(f"validate-{method}-noaug", common, **student, **NO_AUGMENTATION,
                                       distilled=str(rec_dir))
            extra[method] = {"syn_hard": acc_h["top1"], "syn_noaug": acc_n["top1"]}
        if "random-real" in cfg.baseline_list:
            _, acc_n = stages.validate("validate-random-real-noaug", common, **student, **NO_AUGMENTATION,
                                       random_real=True, ipc=cfg.ipc)
            extra["random-real"] = {"syn_noaug": acc_n["top1"]}
    full_refs = {}
    if "full" in cfg.baseline_list:
        # LRS needs the full data under HARD labels whatever the regimes shown
        for r in dict.fromkeys(regimes + (["hard"] if cfg.scores else [])):
            full_refs[r] = full_reference(stages, common, cfg, r, teachers_dir, len(train))
        shown = {r: full_refs[r]["accuracy"] for r in regimes}
        rows.append(_regime_row("full", shown, regimes, None, stages, 0.0))
        rows[-1]["seconds"] = round(sum(full_refs[r]["seconds"] for r in regimes), 1)
        rows[-1]["label"] = "full data (reference: " + "; ".join(f"{r} {full_refs[r]['rule']}" for r in regimes) + ")"
        rows[-1]["reference"] = {r: {k: v for k, v in ref.items() if k != "accuracy"} for r, ref in full_refs.items()}
        if "hard" in full_refs:
            rows[-1]["hard_full_top1"] = full_refs["hard"]["accuracy"]["top1"]

    _add_scores(rows, extra)

    # ------------------------------------------------------------------ diversity metrics (the metrics stage)
    diversity = {"sets": {}, "embedding": None, "warnings": [], "observer": None}
    if distilled:
        # random_ipc_seed = the job's seed: the reference set is exactly the random-real baseline's images
        diversity = stages.metrics("metrics", common, list(distilled.values()), observer_dir / cfg.observer,
                                   random_ipc_seed=cfg.seed)
    for r in rows:
        d = diversity["sets"].get(r["method"], {})
        for key in ("intra_class_cos", "inter_class_cos"):
            r[key] = None if d.get(key) is None else round(d[key], 4)

    # ------------------------------------------------------------------ results + report
    results = {
        "dataset": info.name, "num_classes": info.num_classes, "class_names": list(info.class_names),
        "ipc": cfg.ipc, "student": cfg.student,
        "protocol": (f"{cfg.student} (width {cfg.student_width}) trained {cfg.student_epochs} epochs on each set "
                     f"under each regime ({', '.join(regimes)}); top-1 of the FINAL epoch on the {len(test)} test "
                     f"images; full = the same student on all {len(train)} training images under the same regime"),
        "regimes": {"list": regimes, "protocols": {r: regime_protocol_text(cfg, r) for r in regimes},
                    "summary": {r: regime_summary(rows, r) for r in regimes}},
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "prismdd " + " ".join(sys.argv[1:]),
        "rows": rows,
        "scores": {"what": SCORES_NOTE, "computed": cfg.scores},
        "timings": dict(stages.timings, total=round(total.elapsed, 1)),
        "reused": sorted(stages.reused),
        "teachers": {a: {"test_top1": c["test_top1"], "trust": trust(c["test_top1"], info.num_classes),
                         "wall_time_s": c["wall_time_s"]} for a, c in teacher_cards.items()},
        "observer": {"arch": cfg.observer, "test_top1": observer_card["test_top1"],
                     "trust": trust(observer_card["test_top1"], info.num_classes),
                     "wall_time_s": observer_card.get("wall_time_s")},
        "diversity": {k: v for k, v in diversity["sets"].items()}, "config": config_to_dict(cfg),
        "embedding": diversity["embedding"], "warnings": diversity["warnings"],
        "audit": read_json(out / "audit" / "audit.json") if (out / "audit" / "audit.json").exists() else None,
    }
    write_json(out / "results.json", results)
    report = write_report(out, results)
    write_manifest(out, "run", cfg, inputs={"dataset": info.to_dict()},
                   outputs={"results": "results.json", "report": str(report.name),
                            "stages": {k: str(v) for k, v in distilled.items()}},
                   wall_time=total.elapsed)
    logger.info(print_table(rows, regimes))  # the result table, on the CLI handler like every other line
    for r in regimes:
        logger.info(f"[run] {summary_line(results['regimes']['summary'][r])}")
    logger.info(f"[run] report: {report}  ({total.elapsed:.0f}s)")
    logger.info(continue_from(cfg, stages.folders))
    return results


def continue_from(cfg: RunConfig, folders: dict[str, Path]) -> str:
    """The job's stage folders and the commands that go on from them (relabel, validate, export, audit), so nobody
    has to ``ls`` for the hash-named folders; the README's stage examples say the same."""
    width = max(map(len, folders), default=0)
    lines = ["[run] stage folders (a re-run of this command reuses them):"]
    lines += [f"  {name:<{width}}  {folder}" for name, folder in folders.items()]
    rec = next((name for name in folders if name.startswith("recover-")), None)
    teachers, out = folders.get("teachers"), Path(cfg.out)
    lines.append("[run] to continue from them:")
    if rec and teachers:
        method, distilled = rec[len("recover-"):], folders[rec]
        lines += [f"  prismdd relabel --protocol prism --distilled {distilled} --teachers {teachers} --label-teachers "
                  f"{','.join(cfg.labellers)} --epochs {cfg.student_epochs} --out {out / ('labels-' + method)}",
                  f"  prismdd validate --distilled {distilled} --labels {out / ('labels-' + method)} --student "
                  f"{cfg.student} --student-width {cfg.student_width} --epochs {cfg.student_epochs} --out "
                  f"{out / ('eval-' + method)}"]
        if cfg.dataset in OURS_TO_DDR or cfg.dataset == "imagefolder":
            name = " --as-dataset NAME" if cfg.dataset == "imagefolder" else ""
            lines.append(f"  prismdd export {distilled} --format ddranking{name} --out {out / ('export-' + method)}")
        else:  # said rather than printed as a command that would only be refused
            lines.append(f"  (export: DD-Ranking 0.2.0 scores CIFAR-10/100 and ImageNet subsets only, not {cfg.dataset})")
    quick = " --quick" if cfg.quick else ""
    lines.append(f"  prismdd audit --dataset {cfg.dataset}{quick} --out {out / 'audit'}   "
                 f"(then this command again: its report adds the audit)")
    return "\n".join(lines)


def _add_scores(rows: list[dict], extra: dict) -> None:
    """DD-Ranking's LRS and ARS on every distilled row, from the rows' own accuracies and the extra students;
    random real is the reference both scores subtract, so it gets its no-augmentation accuracy and no score."""
    by = {r["method"]: r for r in rows}
    rnd = by.get("random-real", {})
    f = by.get("full", {})
    # LRS's reference is full data under HARD labels: the run's hard reference, or a full row that is one
    full = {"top1": f.get("hard_full_top1", f.get("top1") if f.get("regime") in (None, "hard") else None)}
    if "random-real" in extra:
        rnd["noaug_top1"] = extra["random-real"]["syn_noaug"]
    for r in rows:
        if r["method"] in BASELINES:
            continue
        more = extra.get(r["method"], {})
        r["hard_top1"], r["noaug_top1"] = more.get("syn_hard"), more.get("syn_noaug")
        r["scores"] = score_row({"full_hard": full.get("top1"), "syn_hard": r["hard_top1"], "syn_soft": r["top1"],
                                 "random_soft": rnd.get("top1"), "syn_aug": r["top1"], "random_aug": rnd.get("top1"),
                                 "syn_noaug": r["noaug_top1"], "random_noaug": rnd.get("noaug_top1")})


def regime_stage(set_name: str, regime: str) -> str:
    """Stage names: the kd student keeps the name it always had, so finished stages are reused."""
    return f"validate-{set_name}" if regime == "kd" else f"validate-{set_name}-regime-{regime}"


def regime_student(cfg: RunConfig, regime: str, teachers_dir) -> dict:
    """validate settings of one regime's students; hard loads no teacher, soft and kd are labelled by the same
    teachers with the same ensemble rule (PRISM's norm-matched), so only WHEN the teachers label differs."""
    base = dict(student=cfg.student, student_width=cfg.student_width, epochs=cfg.student_epochs, seeds=cfg.seeds,
                eval_every=cfg.eval_every or max(1, cfg.student_epochs // 10))
    if regime == "hard":
        return dict(base, protocol="hard")
    # named here so every row, random real included, is labelled by the same teachers
    labelled = dict(base, teachers=str(teachers_dir), label_teachers=",".join(cfg.labellers))
    return dict(labelled, protocol="soft", ensemble="norm-matched") if regime == "soft" else dict(labelled,
                                                                                                  protocol="prism")


def regime_protocol_text(cfg: RunConfig, regime: str) -> str:
    """What a regime's students are, in the words of its validate preset (one description, kept with the settings)."""
    protocol = regime_student(cfg, regime, "-")["protocol"]
    text = f"validate --protocol {protocol}: {preset_file('validate', protocol).get('description', '')}"
    return text if regime == "hard" else f"labelled by {', '.join(cfg.labellers)}; {text}"


FULL_BATCH = 256  # the full-data references: batches of 256 (60,000 images), the LR following every step


def full_reference(stages: Stages, common: dict, cfg: RunConfig, regime: str, teachers_dir, n_train: int) -> dict:
    """The full training set under one regime, as a ceiling. ``converged``: complete runs (the regime's schedule over
    the whole budget) of ``full_start_epochs`` epochs, doubled until the final top-1 rises by less than
    ``full_tolerance`` points or the next budget would pass ``full_max_epochs``; the last budget is the reference.
    One seed (the first). Each budget is a stage beside the teachers in ``<out>/stages``, so every later run with
    the same teachers reuses it. ``steps``: one run of about ``full_steps`` steps (smoke runs)."""
    seed = comma_list(cfg.seeds)[:1]
    base = dict(regime_student(cfg, regime, teachers_dir), full=True, batch_size=FULL_BATCH, lr_every="step",
                seeds=",".join(seed))
    history = []
    if cfg.full_reference == "steps":
        fe = epochs_for(cfg.full_steps, n_train, FULL_BATCH)
        _, acc = stages.validate(f"full-{regime}", common, **dict(base, **fe, eval_every=fe["epochs"]))
        steps = fe["epochs"] * fe["steps_per_epoch"]
        return {"accuracy": acc, "rule": f"{steps} steps of {FULL_BATCH}, not converged",
                "seconds": stages.timings[f"full-{regime}"], "history": [{"steps": steps, "top1": acc["top1"]}],
                "converged": False}
    epochs, converged = cfg.full_start_epochs, False
    while True:
        name = f"full-{regime}-e{epochs}"
        _, acc = stages.validate(name, common, **dict(base, epochs=epochs, eval_every=epochs))
        history.append({"epochs": epochs, "top1": acc["top1"], "seconds": stages.timings[name]})
        if len(history) > 1 and history[-1]["top1"] - history[-2]["top1"] < cfg.full_tolerance:
            converged = True
            break
        if epochs * 2 > cfg.full_max_epochs:
            break
        epochs *= 2
    rule = (f"{epochs} epochs, converged (+{history[-1]['top1'] - history[-2]['top1']:.2f} over {history[-2]['epochs']})"
            if converged else f"{epochs} epochs, NOT converged by --full-max-epochs {cfg.full_max_epochs}")
    return {"accuracy": acc, "rule": rule, "seconds": round(sum(h["seconds"] for h in history), 1),
            "history": history, "converged": converged, "seed": int(seed[0])}


def _regime_entry(acc: dict, seconds: float) -> dict:
    return {"top1": acc["top1"], "top1_std": acc["top1_std"], "runs": len(acc.get("seeds") or [1]),
            "seconds": round(seconds, 1), "protocol": acc["protocol"].get("protocol"), "seeds": acc.get("seeds"),
            "per_seed": [{"seed": r["seed"], "top1": r["top1"]}
                         for r in next(iter(acc.get("students", {}).values()), {}).get("runs", [])]}


def _regime_row(method: str, per: dict, regimes: list[str], distilled_dir, stages: Stages, before: float) -> dict:
    """One set's row: its per-regime results under ``regimes``, and the kd regime's (else the first's) numbers as the
    row's own, which the figures and the DD-Ranking scores read."""
    main = "kd" if "kd" in per else regimes[0]
    names = {r: regime_stage(method, r) for r in per}
    seconds = {r: stages.timings.get(names[r], 0.0) for r in per}
    row = _row(method, per[main], distilled_dir, before + sum(seconds.values()))
    row["regime"] = main
    row["regimes"] = {r: _regime_entry(per[r], seconds[r]) for r in regimes if r in per}
    return row


def _row(method: str, m: dict, distilled_dir, seconds: float) -> dict:
    return {"method": method, "top1": m["top1"], "top1_std": m["top1_std"], "runs": len(m.get("seeds") or [1]),
            "top5": m["top5"],
            "best_top1": m["best_top1"], "images": m["images"], "seconds": round(seconds, 1),
            "distilled": str(distilled_dir) if distilled_dir else None, "curve": m["curve"],
            "protocol": m["protocol"]}
