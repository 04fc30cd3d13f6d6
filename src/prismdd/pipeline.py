"""``prismdd run``: the main job. Teachers -> every method's recovery -> students -> metrics -> report.

Each stage writes into ``<out>/stages/<name>-<hash>``, where the hash covers that stage's resolved config
(and the hashes of the stages it reads), so re-running the same command reuses finished stages and a
changed setting redoes only what depends on it. ``--force`` redoes everything.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import CommonConfig, build_config, comma_list, config_to_dict
from .data import load_splits
from .methods import METHODS
from .recover import RecoverConfig, load_distilled, recover
from .recover import preset_layer as method_layer
from .squeeze import SqueezeConfig, load_teacher, squeeze
from .utils import PrismError, Timer, config_hash, read_json, resolve_device, write_json, write_manifest
from .validate import ValidateConfig, preset_layer as protocol_layer, validate

BASELINES = ("random-real", "full")


@dataclass
class RunConfig(CommonConfig):
    out: str = "runs/main"
    ipc: int = 10  # images per class
    methods: str = "prism,sre2l"  # comma list from `prismdd methods`
    baselines: str = "random-real,full"  # random-real (same IPC, same soft-label protocol) and/or full data
    quick: bool = False  # a smoke-sized run: fewer epochs and iterations everywhere (minutes on a laptop)
    teacher_archs: str = "convnet,resnet18,mobilenet_v2"  # the teacher zoo (BN pool); the first is the primary
    teacher_width: float = 0.25  # width multiplier of the teachers (CPU-sized; 1.0 on a GPU)
    teacher_steps: int = 500  # optimiser steps per teacher (batch 128): about one epoch of Fashion-MNIST
    observer: str = "shufflenet_v2_x0_5"  # diversity observer: an architecture that takes no part in synthesis
    observer_steps: int = 200  # its training steps (it only has to give meaningful features)
    iterations: int = 300  # recovery iterations per image
    recover_batch_size: int = 100
    student: str = "convnet"  # the student architecture (same protocol for every method and baseline)
    student_width: float = 0.5
    student_epochs: int = 300
    seeds: str = "0"  # student seeds (comma list), reported as mean +- std
    full_steps: int = 300  # steps of the full-data baseline (hard labels, batch 128; 300 epochs of 60k is hours)
    eval_every: int = 100  # student epochs between test evaluations (the last is always evaluated)
    force: bool = False  # redo every stage

    def validate(self):
        for m in self.method_list:
            if m not in METHODS:
                raise PrismError(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS.names())}")
        for b in self.baseline_list:
            if b not in BASELINES:
                raise PrismError(f"--baselines: unknown baseline {b!r}; valid: {', '.join(BASELINES)}")
        if self.observer in self.teacher_list:
            raise PrismError(f"--observer {self.observer}: also a teacher; the observer must take no part in synthesis")

    @property
    def method_list(self) -> list[str]:
        return comma_list(self.methods)

    @property
    def baseline_list(self) -> list[str]:
        return comma_list(self.baselines)

    @property
    def teacher_list(self) -> list[str]:
        return comma_list(self.teacher_archs)


# quick: a smoke run (CI, a first look); set fields still win over these
QUICK = {"teacher_steps": 120, "observer_steps": 100, "iterations": 60, "student_epochs": 60, "full_steps": 100,
         "eval_every": 60}  # quick: test evaluation (10k images on Fashion-MNIST) only at the end


def epochs_for(steps: int, n: int, batch_size: int = 128) -> dict:
    """``epochs`` and ``steps_per_epoch`` that give about ``steps`` optimiser steps on ``n`` images."""
    full = max(1, n // batch_size)
    epochs = max(1, -(-steps // full))
    return {"epochs": epochs, "steps_per_epoch": -(-steps // epochs), "batch_size": batch_size}


PRESET_KEY = "quick"  # the CLI layers QUICK under everything the user set when --quick is given


def preset_layer(quick) -> dict:
    return dict(QUICK, quick=True) if quick else {}


def run_config(**overrides) -> RunConfig:
    """API twin of the CLI: defaults < QUICK (if quick=True) < overrides."""
    return build_config(RunConfig, preset_layer(overrides.get("quick")), overrides)


def _common(cfg: RunConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("dataset", "data_root", "download", "device", "seed", "num_workers",
                                         "resolution", "subset")}


class Stages:
    """Runs stage functions into hash-named folders, reusing finished ones."""

    def __init__(self, root: Path, force: bool):
        self.root, self.force, self.timings = root, force, {}

    def folder(self, name: str, cfg) -> Path:
        return self.root / "stages" / f"{name}-{config_hash(cfg, exclude=('out', 'device', 'num_workers', 'force'))[:10]}"

    def run(self, name: str, cls, fn, fields: dict):
        probe = build_config(cls, dict(fields, out="x"))
        folder = self.folder(name, probe)
        cfg = build_config(cls, dict(fields, out=str(folder), force=self.force))
        done = (folder / "manifest.json").exists() and not self.force
        t = Timer()
        if done:
            print(f"[run] {name}: reusing {folder}")
            result = None
        else:
            print(f"[run] {name} -> {folder}")
            result = fn(cfg)
        m = read_json(folder / "manifest.json")
        self.timings[name] = m.get("wall_time_s") or round(t.elapsed, 2)
        return folder, result, cfg


def run(cfg: RunConfig) -> dict:
    """The whole job; returns the results dict (also written to ``<out>/results.json``)."""
    total = Timer()
    out = Path(cfg.out)
    stages = Stages(out, cfg.force)
    common = _common(cfg)
    device = resolve_device(cfg.device)
    train, test, info = load_splits(cfg)  # fail early on missing data, before any training

    # ------------------------------------------------------------------ squeeze: the zoo + the observer
    zoo = cfg.teacher_list
    teacher_epochs = epochs_for(cfg.teacher_steps, len(train))
    observer_epochs = epochs_for(cfg.observer_steps, len(train))
    full_epochs = epochs_for(cfg.full_steps, len(train))
    teachers_dir, _, _ = stages.run("teachers", SqueezeConfig, squeeze, dict(
        common, arch=",".join(zoo), width=cfg.teacher_width, **teacher_epochs,
        eval_every=max(1, teacher_epochs["epochs"] // 4)))
    from .models import ARCHS

    observer_width = cfg.teacher_width if cfg.observer not in ARCHS or ARCHS.get(cfg.observer).has_width else 1.0
    observer_dir, _, _ = stages.run("observer", SqueezeConfig, squeeze, dict(
        common, arch=cfg.observer, width=observer_width, **observer_epochs, eval_every=observer_epochs["epochs"],
        seed=cfg.seed + 1000))  # another seed as well as another architecture
    primary = zoo[0]

    # ------------------------------------------------------------------ recover + validate per method
    val_common = dict(common, student=cfg.student, student_width=cfg.student_width, epochs=cfg.student_epochs,
                      seeds=cfg.seeds, eval_every=cfg.eval_every, teachers=str(teachers_dir),
                      label_teachers=primary, **protocol_layer("prism"))
    rows, distilled = [], {}
    for method in cfg.method_list:
        rec_fields = dict(method_layer(method), **common, teachers=str(teachers_dir), primary=primary,
                          ipc=cfg.ipc, iterations=cfg.iterations, batch_size=cfg.recover_batch_size)
        rec_dir, _, _ = stages.run(f"recover-{method}", RecoverConfig, recover, rec_fields)
        distilled[method] = rec_dir
        ev_dir, _, _ = stages.run(f"validate-{method}", ValidateConfig, validate,
                                  dict(val_common, distilled=str(rec_dir)))
        rows.append(_row(method, read_json(ev_dir / "metrics.json"), rec_dir,
                         stages.timings[f"recover-{method}"] + stages.timings[f"validate-{method}"]))
    if "random-real" in cfg.baseline_list:
        ev_dir, _, _ = stages.run("validate-random-real", ValidateConfig, validate,
                                  dict(val_common, random_real=True, ipc=cfg.ipc))
        rows.append(_row("random-real", read_json(ev_dir / "metrics.json"), None,
                         stages.timings["validate-random-real"]))
    if "full" in cfg.baseline_list:
        full_fields = {**protocol_layer("prism"), **common, "full": True, "student": cfg.student,
                       "student_width": cfg.student_width, **full_epochs, "seeds": cfg.seeds,
                       "eval_every": full_epochs["epochs"], "loss": "ce", "mix": "none"}
        ev_dir, _, _ = stages.run("validate-full", ValidateConfig, validate, full_fields)
        rows.append(_row("full", read_json(ev_dir / "metrics.json"), None, stages.timings["validate-full"]))

    # ------------------------------------------------------------------ diversity metrics, embedding
    from .metrics import check_observer, diversity_from_features, embedding, extract_features
    from .validate import random_real_subset

    observer, observer_card = load_teacher(observer_dir / cfg.observer, device=device)
    warnings = []
    if observer_card["test_top1"] < 2 * 100 / info.num_classes:
        warnings.append(f"the observer {cfg.observer} reached only {observer_card['test_top1']:.1f}% test top-1: "
                        f"its features (and so the diversity numbers) carry little information")
    real_idx = random_real_subset(train, info.num_classes, cfg.ipc, cfg.seed)  # = the random-real baseline's images
    sets = {}
    for m, p in distilled.items():
        d = load_distilled(p)
        check_observer(cfg.observer, d.manifest, p)
        sets[m] = (d.images, d.targets)
    sets["random-real"] = (train.get_images(real_idx), train.targets[real_idx])
    feats = {name: (extract_features(x, info, observer, device), y) for name, (x, y) in sets.items()}
    div = {name: diversity_from_features(f, y, info.num_classes) for name, (f, y) in feats.items()}
    for r in rows:
        d = div.get(r["method"], {})
        for key in ("intra_class_cos", "inter_class_cos"):
            r[key] = None if d.get(key) is None else round(d[key], 4)
    emb = embedding({("real" if k == "random-real" else k): v for k, v in feats.items()}, cfg.seed)

    # ------------------------------------------------------------------ results + report
    teacher_cards = {a: read_json(teachers_dir / a / "card.json") for a in zoo}
    results = {
        "dataset": info.name, "ipc": cfg.ipc, "student": cfg.student,
        "protocol": (f"{cfg.student} (width {cfg.student_width}) trained {cfg.student_epochs} epochs on each set with "
                     f"soft labels of the {primary} teacher computed online (MSE + 0.1 CE, AdamW 1e-3, decayed "
                     f"cosine, RandomResizedCrop 0.25-1 + flip + CutMix); top-1 of the FINAL epoch on the "
                     f"{len(test)} test images; full = the same student on all {len(train)} training images with hard labels "
                     f"for {full_epochs['epochs'] * full_epochs['steps_per_epoch']} steps of 128"),
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "prismdd " + " ".join(sys.argv[1:]),
        "rows": rows, "timings": dict(stages.timings, total=round(total.elapsed, 1)),
        "teachers": {a: {"test_top1": c["test_top1"], "wall_time_s": c["wall_time_s"]} for a, c in teacher_cards.items()},
        "observer": {"arch": cfg.observer, "test_top1": read_json(observer_dir / cfg.observer / "card.json")["test_top1"]},
        "diversity": div, "config": config_to_dict(cfg), "embedding": emb, "warnings": warnings,
        "audit": read_json(out / "audit" / "audit.json") if (out / "audit" / "audit.json").exists() else None,
    }
    write_json(out / "results.json", results)
    from .report import print_table, write_report

    report = write_report(out, results)
    write_manifest(out, "run", cfg, inputs={"dataset": info.to_dict()},
                   outputs={"results": "results.json", "report": str(report.name),
                            "stages": {k: str(v) for k, v in distilled.items()}},
                   wall_time=total.elapsed)
    print(print_table(rows))
    print(f"[run] report: {report}  ({total.elapsed:.0f}s)")
    return results


def _row(method: str, m: dict, distilled_dir, seconds: float) -> dict:
    return {"method": method, "top1": m["top1"], "top1_std": m["top1_std"], "top5": m["top5"],
            "best_top1": m["best_top1"], "images": m["images"], "seconds": round(seconds, 1),
            "distilled": str(distilled_dir) if distilled_dir else None, "curve": m["curve"],
            "protocol": m["protocol"]}
