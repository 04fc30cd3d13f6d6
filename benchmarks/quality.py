"""Quality benchmarks: prismdd's methods against random real images, and what PRISM itself adds.

Every experiment is a list of (recover settings, validate settings) cells run through the same cached
stage runner as ``prismdd run`` (``benchmarks/out/<dataset>/stages/<stage>-<hash>``), so the suite is
resumable and runnable in parts:

    python benchmarks/quality.py --list
    python benchmarks/quality.py --only quality/ipc10 --seeds 0,1,2
    python benchmarks/quality.py --only ablation/bn-set --seeds 0 --student-epochs 100   # smaller
    python benchmarks/quality.py --smoke                                                 # CI-sized

Each finished cell appends a JSON line to ``benchmarks/out/<dataset>/results.jsonl``; the script prints a
Markdown table per experiment (final-epoch top-1 mean +- std over seeds, intra-class cosine by an observer
that took no part in synthesis, wall time per stage). Recovery seed and student seed are the same number
per repetition, so seed s of two methods is a paired comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prismdd.artifacts import load_distilled, load_model
from prismdd.core.config import comma_list
from prismdd.core.io import read_json
from prismdd.core.data import load_dataset, random_real_indices
from prismdd.core.presets import METHODS as PRESETS, PROTOCOLS
from prismdd.core.scores import ars, lrs
from prismdd.core.training import extract_features
from prismdd.pipeline import Stages, epochs_for
from prismdd.stages.metrics import diversity_from_features
from prismdd.stages.validate import HARD_LABELS, NO_AUGMENTATION

POOL = ["convnet", "resnet18", "mobilenet_v2", "efficientnet_b0"]  # BN pool (the first is the primary)
OBSERVER = "shufflenet_v2_x0_5"
METHODS = ["random-real", "sre2l", "cda", "delt", "gvbsm", "prism", "prism-pre", "prism-strong-bn"]
# the rest of seed Table 2 (issue 13), where their presets exist; d4m needs Stable Diffusion weights (not here)
TABLE2 = [m for m in ("rded", "dwa", "edc") if m in PRESETS]
# G-VBSM and EDC match statistics of REAL data, computed once per teacher; on a 2-core CPU the pass over all
# 60,000 Fashion-MNIST images costs minutes per teacher, so the benchmark uses a seeded 5,000 (BENCHMARKS.md)
STATS_CAP = {"gvbsm": {"gvbsm_stats_images": 5000}, "edc": {"edc_stats_images": 5000}}


def cell(name, method, rec=None, val=None):
    return {"name": name, "method": method, "rec": dict(STATS_CAP.get(method, {}), **(rec or {})), "val": val or {}}


def experiments(ipcs=(1, 10, 50)) -> dict[str, list[dict]]:
    ex = {}
    for ipc in ipcs:
        # each paper-named method under its OWN student protocol (`--protocol <method>`), beside random real under
        # that same protocol; the shared-protocol rows are quality/ipc<N>
        ex[f"own-protocol/ipc{ipc}"] = [
            cell(f"{m}, protocol {m}", m, {"ipc": ipc}, {"ipc": ipc, "protocol": m}) for m in
            [m for m in METHODS[1:] + TABLE2 if m in PROTOCOLS]] + [
            cell(f"random-real, protocol {m}", "random-real", {}, {"ipc": ipc, "protocol": m}) for m in
            [m for m in METHODS[1:] + TABLE2 if m in PROTOCOLS]]
        ex[f"quality/ipc{ipc}"] = [cell(m, m, {"ipc": ipc}, {"ipc": ipc}) for m in METHODS + TABLE2] + [
            # PRISM with its BN set cut to the primary: the diversity claim's comparison at every IPC
            cell("prism, BN set = primary alone", "prism", {"ipc": ipc, "selection": "single"}, {"ipc": ipc})]
    # issue 26: the shared (prism) protocol's three corrections one at a time, on the rows section 8.1 compared:
    # before (every parameter decayed, one step per batch of 50, the primary's labels), + the references' no-decay
    # group, + gradient accumulation 2 (BatchNorm over 25), + PRISM's four-teacher labels (= the protocol now)
    steps = [("before issue 26", {"decay_exempt": "none", "grad_accum": 1, "label_teachers": POOL[0]}),
             ("no decay on 1-d params", {"grad_accum": 1, "label_teachers": POOL[0]}),
             ("+ grad accumulation 2", {"label_teachers": POOL[0]}),
             ("+ four-teacher labels (corrected)", {})]
    ex["students/ipc10"] = [cell(f"{m}, {name}", m, {"ipc": 10} if m != "random-real" else {}, dict(v, ipc=10))
                            for m in ("random-real", "sre2l", "delt", "prism") for name, v in steps]
    # issue 23: DD-Ranking's LRS and ARS need, beside each set under the shared protocol, the set with hard labels
    # (no augmentation, DD-Ranking's use_aug_for_hard=False) and the set without augmentation, random real under
    # both protocols, and a full-data hard-label reference (SCORE_FULL_EPOCHS epochs, one seed: CPU-sized)
    for ipc_ in ipcs:
        ex[f"scores/ipc{ipc_}"] = [cell("full data, hard labels", "full", {}, dict(FULL_REFERENCE))] + [
            cell(f"{m}, {name}", m, {"ipc": ipc_} if m != "random-real" else {}, dict(v, ipc=ipc_))
            for m in SCORED for name, v in (("protocol", {}), ("hard labels", HARD_LABELS),
                                            ("no augmentation", NO_AUGMENTATION))
            if not (m == "random-real" and name == "hard labels")]
    for ipc_ in ipcs:
        # FRePo (issue 21): the images with the teacher's soft labels (shared protocol) and with their own learned
        # labels (protocol frepo, FRePo's eval.py step counts), random real under both; plus a ResNet-18 student
        fr = dict(FREPO_CPU, ipc=ipc_)
        own = {"ipc": ipc_, "protocol": "frepo", "epochs": FREPO_EVAL_STEPS[ipc_]}
        ex[f"frepo/ipc{ipc_}"] = [
            cell("frepo, protocol prism", "frepo", fr, {"ipc": ipc_}),
            cell("random-real, protocol prism", "random-real", {}, {"ipc": ipc_}),
            cell("frepo, protocol frepo", "frepo", fr, dict(own, labels=OWN_LABELS)),
            cell("random-real, protocol frepo", "random-real", {}, own),
            cell("frepo (labels not learned), protocol frepo", "frepo", dict(fr, frepo_label_lr=0.0),
                 dict(own, labels=OWN_LABELS)),
        ]
        ex[f"frepo-cross-arch/ipc{ipc_}"] = [
            cell("frepo -> resnet18, protocol prism", "frepo", fr, {"ipc": ipc_, "student": "resnet18"}),
            cell("random-real -> resnet18, protocol prism", "random-real", {}, {"ipc": ipc_, "student": "resnet18"}),
        ]
    # the pilot that chose FRePo's CPU settings (BENCHMARKS.md 9.1): the learning rate of pixels and labels (LAMB:
    # relative to each tensor's norm) at the benchmark's step count, under FRePo's own protocol
    own10 = {"ipc": 10, "protocol": "frepo", "epochs": FREPO_EVAL_STEPS[10], "labels": OWN_LABELS}
    ex["frepo-pilot/ipc10"] = [
        cell(f"frepo lr {lr}, protocol frepo", "frepo", dict(FREPO_CPU, ipc=10, frepo_lr=lr, frepo_label_lr=lr), own10)
        for lr in (3e-4, 3e-3, 1e-2)] + [
        cell("random-real, protocol frepo", "random-real", {}, {k: v for k, v in own10.items() if k != "labels"})]
    # issue 22: Direct Ascent Synthesis' multi-resolution parametrisation (seed appendix D, Table 5: "multi-resolution
    # DeepInversion" below plain SRe2L on ImageNet-1K) with sre2l and prism, beside their pixel runs and random real
    # under the shared protocol; DAS's view noise (0.2) as one more sre2l row
    ex["multires/ipc10"] = [cell("random-real", "random-real", {}, {"ipc": 10})] + [
        cell(f"{m}{name}", m, dict({"ipc": 10}, **rec), {"ipc": 10}) for m in ("sre2l", "prism")
        for name, rec in (("", {}), (" + multires", {"param": "multires"}))] + [
        cell("sre2l + multires + view noise 0.2", "sre2l", {"ipc": 10, "param": "multires", "view_noise": 0.2},
             {"ipc": 10}),
        # prismdd's own choice under test: Adam's LR divided among the 8 components (28 px); lr 2.0 = 8 x 0.25 gives
        # every component SRe2L's full LR
        cell("sre2l + multires (LR not divided: lr 2.0)", "sre2l", {"ipc": 10, "param": "multires", "lr": 2.0},
             {"ipc": 10})]
    # issue 33: every set under the three label regimes (hard labels, fixed soft labels, kd), random real beside each
    # (paired by seed); FRePo's images only (its learned labels are its own regime, section 9); and the full training
    # set per regime at budgets of 1, 2, 4, 8 epochs (batch 256, one seed): the doubling rule of `run
    # --full-reference converged` written out, so the table shows where each regime's ceiling stops rising
    for ipc_ in ipcs:
        ex[f"regimes/ipc{ipc_}"] = [
            cell(f"{m}, {g}", m, (dict(FREPO_CPU, ipc=ipc_) if m == "frepo" else {"ipc": ipc_}) if m != "random-real"
                 else {}, dict(REGIME_CELLS[g], ipc=ipc_))
            for m in ("random-real", "prism", "delt", "frepo") for g in REGIME_CELLS]
    # issue 34: real subsets chosen by the coreset selectors beside random real and the synthesis rows above (the
    # same cells: their folders are reused), in the three regimes; first, one epoch of the student on the whole
    # training set with hard labels: the unit of the cost table (selection_costs)
    for ipc_ in ipcs:
        reg = ex[f"regimes/ipc{ipc_}"]
        ex[f"selection/ipc{ipc_}"] = [FULL_EPOCH] + reg[:len(REGIME_CELLS)] + [
            cell(f"{SELECTOR_NAMES.get(m, m)}, {g}", m, {"ipc": ipc_}, dict(REGIME_CELLS[g], ipc=ipc_))
            for m in SELECTORS for g in REGIME_CELLS] + reg[len(REGIME_CELLS):]
    ex["regimes/full"] = [cell(f"full data, {g}, {e} epochs", "full", {},
                               dict(REGIME_CELLS[g], full=True, epochs=e, batch_size=256, lr_every="step"))
                          for g in REGIME_CELLS for e in (1, 2, 4, 8)]
    ipc = {"ipc": 10}
    # what PRISM adds: everything held fixed except the BN set
    ex["ablation/bn-set"] = [
        cell("prism (intra, pool of 3)", "prism", dict(ipc, bn_pool="convnet,resnet18,mobilenet_v2")),
        cell("BN set = primary alone", "prism", dict(ipc, selection="single")),
        *[cell(f"all of {k} BN teachers", "prism", dict(ipc, selection="all", bn_pool=",".join(POOL[:k])))
          for k in (1, 2, 3, 4)],
        cell("pre-distillation", "prism-pre", dict(ipc, bn_pool="convnet,resnet18,mobilenet_v2")),
        # at 100 images per batch IPC 10 is ONE batch, so intra and pre draw one identical set; batches of
        # 10 (one IPC index each, the reference's unit) give intra ten draws against pre's one
        cell("intra, batch 10", "prism", dict(ipc, batch_size=10)),
        cell("pre-distillation, batch 10", "prism-pre", dict(ipc, batch_size=10)),
        cell("per-teacher BN normalisation", "prism", dict(ipc, bn_pool="convnet,resnet18,mobilenet_v2",
                                                           bn_normalize=True)),
        cell("BN layer mean instead of sum", "prism", dict(ipc, bn_pool="convnet,resnet18,mobilenet_v2",
                                                           bn_layer_reduce="mean")),
        # control: images that barely leave their real start (tiny lr): regularisation vs diversity
        cell("control: stay near real start (lr 0.005)", "prism", dict(ipc, lr=0.005)),
        cell("unoptimised real start (iterations=1, lr=0)", "prism", dict(ipc, iterations=1, lr=0.0)),
        cell("random real", "random-real", {}, ipc),
    ]
    # which real images start the synthesis, and RDED-style f x f mosaics of shrunk real images
    ex["ablation/init"] = [
        *[cell(f"start {sel}", "prism", dict(ipc, init_select=sel)) for sel in ("first", "random", "low-loss", "mid-loss")],
        cell("start low-loss, unoptimised", "prism", dict(ipc, init_select="low-loss", iterations=1, lr=0.0)),
        cell("start 2x2 mosaic (random)", "prism", dict(ipc, init_select="random", init_tiles=2)),
        cell("start 2x2 mosaic (random), unoptimised", "prism", dict(ipc, init_select="random", init_tiles=2,
                                                                      iterations=1, lr=0.0)),
        cell("random real", "random-real", {}, ipc),
    ]
    # the sweep directions, each against the same random-real row
    ex["sweep/recipe"] = [
        *[cell(f"alpha_bn {v}", "prism", dict(ipc, alpha_bn=v)) for v in (0.001, 0.01, 0.1, 1.0, 10.0)],
        *[cell(f"lr {v}", "prism", dict(ipc, lr=v)) for v in (0.01, 0.25)],
        cell("iterations 1000", "prism", dict(ipc, iterations=1000)),
        cell("primary resnet18 (the strongest teacher)", "prism", dict(ipc, primary="resnet18")),
        # 8 % crops of a 28 px image are ~8 px: tiny views the student (floor 0.25) never sees
        *[cell(f"recovery crop floor {v}", "prism", dict(ipc, crop_scale=(v, 1.0))) for v in (0.25, 0.5)],
        cell("random real", "random-real", {}, ipc),
    ]
    # soft labels from a stronger teacher or an ensemble: applied to every row alike
    ex["sweep/labels"] = [cell(f"{m}, labels {t}", m, ipc if m != "random-real" else {}, dict(ipc, label_teachers=t))
                          for t in ("resnet18", "convnet,resnet18,mobilenet_v2") for m in ("prism", "random-real")]
    # how far the shared protocol is from its ceiling: longer student training, with the best labels
    ens = "convnet,resnet18,mobilenet_v2"
    ex["sweep/protocol"] = [cell(f"{m}, {name}", m, ipc if m != "random-real" else {}, dict(ipc, **v))
                            for name, v in (("1000 epochs", {"epochs": 1000}),
                                            ("1000 epochs, ensemble labels", {"epochs": 1000, "label_teachers": ens}))
                            for m in ("prism", "random-real")]
    ex["ablation/relabel-crop"] = [cell(f"min crop {s}", "prism", ipc, {"min_scale": s})
                                   for s in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)]
    ex["ablation/recover-batch"] = [cell(f"recovery batch {b}", "prism", dict(ipc, batch_size=b)) for b in (20, 50, 100)]
    ex["cross-arch"] = [cell(f"{m} -> {s}", m, ipc, dict(ipc, student=s))
                        for s in ("resnet18", "shufflenet_v2_x0_5") for m in ("random-real", "sre2l", "prism")]
    return ex


# the three label regimes (issue 33): validate settings per regime; soft and kd are labelled by the same four teachers
# with the same rule (norm-matched), so the regimes differ only in when the teachers label and in the recipe
REGIME_CELLS = {"hard": {"protocol": "hard"},
                "soft": {"protocol": "soft", "ensemble": "norm-matched", "label_teachers": ",".join(POOL)},
                "kd": {}}
# the selection methods (issue 34), each a plug-in whose preset says ``images: selected``
SELECTORS = [m for m in ("random", "herding", "kcenter", "forgetting", "el2n", "ccs", "bps") if m in PRESETS]
# the random selector's folder holds the images random real draws (same seed, same rule): its cells are a check, and
# their name keeps `--skip random` from matching random real's
SELECTOR_NAMES = {"random": "random selection"}
FULL_EPOCH = {"name": "full data, hard, 1 epochs", "method": "full", "rec": {},
              "val": {"protocol": "hard", "full": True, "epochs": 1, "batch_size": 256, "lr_every": "step"}}
# the score stage's training runs for the dynamics kind (forgetting, EL2N, CCS): `prismdd run`'s defaults
SCORE_FIELDS = {"record_runs": 2, "record_epochs": 4}
SCORED = ["random-real", "prism", "sre2l", "delt"]  # the rows section 10 corrected; the other methods: not run
SCORE_FULL_EPOCHS = 5
FULL_REFERENCE = {"full": True, "loss": "ce", "mix": "none", "epochs": SCORE_FULL_EPOCHS, "batch_size": 128,
                  "lr_every": "step", "teachers": None, "label_teachers": None}


# FRePo on 2 CPU cores: the pool networks at half width (64 channels), 256 real images per step instead of the
# reference's 1024, the preset's LR 3e-3 (the reference's 3e-4 is for 500,000 steps; BENCHMARKS.md 9.1) and
# --frepo-steps outer steps (BENCHMARKS.md section 9 ran 1000, 500 at IPC 50); its own protocol trains the reference's step
# counts (script/eval.py:208-209: 1000 / 2000 / 5000 steps for 10 / 100 / 500 images, one step per epoch)
FREPO_CPU = {"frepo_width": 0.5, "frepo_real_batch": 256, "frepo_lr": 3e-3, "frepo_label_lr": 3e-3}
FREPO_EVAL_STEPS = {1: 1000, 10: 2000, 50: 5000}
OWN_LABELS = "<own>"  # a cell's validate ``labels``: the learned labels of the cell's own recover folder

ENSEMBLE_PROTOCOLS = {"gvbsm", "edc"}  # seed Table 2, "Teacher Model": ensemble; every other method: single


def label_teachers(protocol: str) -> str:
    """The soft-label teachers of a protocol: the recovery pool for G-VBSM's and EDC's ensembles; PRISM's four
    teachers (its relabel: the primary and three others, norm-matched) for the prism protocol, i.e. every shared-protocol
    row since issue 26 (before: the primary alone); the primary for the single-teacher protocols."""
    if protocol == "prism":
        return ",".join(POOL)
    return ",".join(POOL[:3]) if protocol in ENSEMBLE_PROTOCOLS else POOL[0]


def cell_wanted(name: str, tokens: list[str], names: list[str]) -> bool:
    """A token that is some cell's exact name picks that cell only; any other token picks by substring."""
    return any(t == name or (t not in names and t in name) for t in tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--only", default="quality/ipc10", help="comma list of experiment names or prefixes")
    p.add_argument("--list", action="store_true")
    p.add_argument("--cells", default=None, help="comma list of cell names (exact), or parts of names")
    p.add_argument("--skip", default=None, help="comma list: cells whose name contains any of these are left out")
    p.add_argument("--seeds", default="0")
    p.add_argument("--student", default="convnet")
    p.add_argument("--student-width", type=float, default=0.5)
    p.add_argument("--student-epochs", type=int, default=300)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--frepo-steps", type=int, default=2000, help="FRePo's outer steps (its cells' iterations)")
    p.add_argument("--teacher-width", type=float, default=0.25)
    p.add_argument("--teacher-steps", type=int, default=900)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on digits (CI)")
    a = p.parse_args()
    if a.smoke:
        a.dataset, a.student_epochs, a.iterations, a.teacher_steps, a.student_width = "digits", 4, 5, 40, 0.25
        a.frepo_steps = 5
    torch.set_num_threads(a.threads)
    ex = experiments()
    if a.list:
        for k, cells in ex.items():
            print(f"{k}: {len(cells)} cells")
        return
    wanted = [k for k in ex if any(k == o or k.startswith(o.rstrip("/") + "/") for o in a.only.split(","))]
    if not wanted:
        sys.exit(f"--only {a.only}: no such experiment; see --list")
    out = Path(a.out) / a.dataset
    stages = Stages(out, force=False, score_fields=dict(SCORE_FIELDS, record_width=a.teacher_width))
    common = {"dataset": a.dataset, "device": "auto"}
    train, test, info = load_dataset(a.dataset)
    te = epochs_for(a.teacher_steps, len(train))
    teachers_dir = stages.teachers("teachers", common, POOL, width=a.teacher_width, **te, eval_every=te["epochs"])
    obs_dir = stages.teachers("observer", dict(common, seed=1000), [OBSERVER], width=1.0, **te,
                              eval_every=te["epochs"])
    observer, _ = load_model(obs_dir / OBSERVER)
    seeds = [int(s) for s in a.seeds.split(",")]
    log = out / "results.jsonl"
    header = (f"{a.dataset}, student {a.student} (width {a.student_width}), {a.student_epochs} epochs, soft labels "
              f"online from label_teachers(protocol) (prism: {','.join(POOL)}, norm-matched; MSE + 0.1 CE), recovery {a.iterations} iterations (FRePo: {a.frepo_steps} "
              f"outer steps), seeds {seeds}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for name in wanted:
        print(f"\n### {name}\n{header}\n")
        print("| cell | top-1 % (final epoch) | per seed | intra-class cos | recover s | validate s |")
        print("|---|---|---|---|---|---|")
        finished = {}  # cell name -> top-1 per seed, for the paired comparison below
        costs = {}  # cell's method -> {"score": s, "select": [s per seed], "full_epoch": s}
        for c in ex[name]:
            if a.cells and not cell_wanted(c["name"], comma_list(a.cells), [x["name"] for x in ex[name]]):
                continue
            if a.skip and any(t in c["name"] for t in comma_list(a.skip)):
                continue
            top1, cos, rs, vs = [], [], 0.0, 0.0
            for s in seeds:
                rec_dir = None
                protocol = c["val"].get("protocol", "prism")
                val = dict(protocol=protocol, seeds=str(s), student=a.student, student_width=a.student_width,
                           epochs=a.student_epochs, eval_every=a.student_epochs, teachers=str(teachers_dir),
                           label_teachers=label_teachers(protocol))
                run_common = dict(common, seed=s)
                if c["method"] == "full":  # the whole training set: no diversity to measure
                    if s != seeds[0]:
                        continue
                    val.update(**c["val"])
                    imgs = None
                elif c["method"] == "random-real":
                    val.update(random_real=True, **c["val"])
                    idx = random_real_indices(train, info.num_classes, val.get("ipc", 10), s)
                    imgs, tg = train.get_images(idx), train.targets[idx]
                else:
                    # a cell's own settings win (e.g. iterations=1 for the unoptimised start)
                    steps = a.frepo_steps if c["method"] == "frepo" else a.iterations  # FRePo: outer steps
                    rec = dict(dict(primary=POOL[0], bn_pool=",".join(POOL[:3]), iterations=steps), **c["rec"])
                    # (a method whose preset starts from another's run, EDC from RDED's, gets that run first: Stages)
                    stages.timings.pop("scores", None)
                    rec_dir = stages.recover(c["method"], run_common, teachers_dir, **rec)
                    rs += stages.timings[f"recover-{c['method']}"]
                    cost = costs.setdefault(c["method"], {"select": {}})
                    cost["select"][s] = stages.timings[f"recover-{c['method']}"]
                    if "scores" in stages.timings:  # a selection method: the score folder it read (made once)
                        cost["score"] = stages.timings["scores"]
                        cost["kinds"] = read_json(stages.folders["scores"] / "manifest.json")["outputs"]["kinds"]
                    val.update(distilled=str(rec_dir), **{k: v for k, v in c["val"].items() if k != "ipc"})
                    if val.get("labels") == OWN_LABELS:
                        val["labels"] = str(rec_dir)
                    d = load_distilled(rec_dir)
                    imgs, tg = d.images, d.targets
                if a.smoke:  # own-protocol step counts (FRePo's 1000-5000) cut to the smoke size too
                    val["epochs"] = min(val["epochs"], a.student_epochs)
                ev_dir, m = stages.validate("validate", run_common, **val)
                vs += stages.timings["validate"]
                if c is FULL_EPOCH:
                    costs["full epoch"] = stages.timings["validate"]
                top1.append(m["top1"])
                if imgs is None:
                    cos.append(float("nan"))
                else:
                    div = diversity_from_features(extract_features(imgs, info, observer, "cpu"), tg, info.num_classes)
                    cos.append(div["intra_class_cos"] if div["intra_class_cos"] is not None else float("nan"))
                with open(log, "a") as f:
                    f.write(json.dumps({"experiment": name, "cell": c["name"], "seed": s, "top1": m["top1"],
                                        "intra_class_cos": cos[-1], "distilled": str(rec_dir) if rec_dir else None,
                                        "eval": str(ev_dir), "protocol": m["protocol"]}) + "\n")
            t = np.array(top1)
            std = f" ± {t.std(ddof=1):.2f}" if len(t) > 1 else ""
            # one image per class has no pairs to compare: no intra-class cosine at IPC 1
            cos_s = f"{np.nanmean(cos):.4f}" if not np.isnan(cos).all() else "n/a"
            finished[c["name"]] = top1
            print(f"| {c['name']} | {t.mean():.2f}{std} | {' / '.join(f'{v:.2f}' for v in top1)} | {cos_s} | "
                  f"{rs:.0f} | {vs:.0f} |", flush=True)
        if name.startswith(("own-protocol/", "frepo")):
            paired_table(finished, seeds)
        if name.startswith("scores/"):
            scores_table(finished, seeds)
        if name.startswith(("regimes/ipc", "selection/ipc")):
            regimes_table(finished, seeds)
        if name.startswith("selection/ipc"):
            selection_costs(costs)


def selection_costs(costs: dict) -> None:
    """Each selection method's cost: its score folder (made once per dataset, shared by every IPC and by the methods
    reading the same kinds) and its selection (the recover stage), in seconds and in full-data epochs of the student
    (the wall time of the 1-epoch hard-label cell, its start-up and test evaluation included: a generous unit)."""
    unit = costs.get("full epoch")
    print(f"\n| method | score kinds | score s (once) | selection s (mean over seeds) | total s | full-data epochs "
          f"(1 epoch = {unit if unit else 'n/a'} s) |")
    print("|---|---|---|---|---|---|")
    for m, c in costs.items():
        if m == "full epoch" or m not in SELECTORS:
            continue
        sel = float(np.mean(list(c["select"].values())))
        total = c.get("score", 0.0) + sel
        eq = f"{total / unit:.2f}" if unit else "n/a"
        print(f"| {m} | {', '.join(c.get('kinds', [])) or '-'} | {c.get('score', 0.0):.1f} | {sel:.1f} | {total:.1f} "
              f"| {eq} |")


def regimes_table(finished: dict[str, list[float]], seeds: list[int]) -> None:
    """Each set against random real in the same regime, seed by seed; 'beats' = the mean paired difference is larger
    than the larger of the two rows' seed std (the report's rule, core/regimes.py)."""
    print("\n| regime | set | top-1 % | random real | difference (per seed) | beats random real by more than the spread |")
    print("|---|---|---|---|---|---|")
    for g in REGIME_CELLS:
        rr = finished.get(f"random-real, {g}")
        for cell_name, top1 in finished.items():
            m, _, regime = cell_name.rpartition(", ")
            if regime != g or m == "random-real" or rr is None:
                continue
            d = np.array(top1) - np.array(rr)
            spread = max(np.std(top1, ddof=1), np.std(rr, ddof=1)) if len(seeds) > 1 else float("nan")
            print(f"| {g} | {m} | {np.mean(top1):.2f} | {np.mean(rr):.2f} | {d.mean():+.2f} "
                  f"({' / '.join(f'{v:+.2f}' for v in d)}) | "
                  f"{'n = 1' if len(seeds) < 2 else ('yes' if d.mean() > spread else 'no')} (spread {spread:.2f}) |")


def scores_table(finished: dict[str, list[float]], seeds: list[int]) -> None:
    """LRS and ARS (x100) per method and seed from the cells of a scores experiment (seed s of every row is a pair;
    the full-data reference is one run), mean ± std over seeds, with the mean HLR, IOR and the two gaps."""
    full = finished.get("full data, hard labels")
    print("\n| method | LRS x100 | HLR (points) | IOR (points) | ARS x100 | gap with aug | gap without aug |")
    print("|---|---|---|---|---|---|---|")
    for m in SCORED[1:]:
        need = [f"{m}, protocol", f"{m}, hard labels", f"{m}, no augmentation", "random-real, protocol",
                "random-real, no augmentation"]
        if full is None or any(k not in finished for k in need):
            continue
        syn, hard, noaug, rnd, rnd_noaug = (finished[k] for k in need)
        per = [(lrs(full[0], hard[i], syn[i], rnd[i]), ars(syn[i], rnd[i], noaug[i], rnd_noaug[i]))
               for i in range(len(seeds))]

        def ms(xs, scale=1.0):
            x = np.array(xs) * scale
            return f"{x.mean():.2f}" + (f" ± {x.std(ddof=1):.2f}" if len(x) > 1 else "")

        print(f"| {m} | {ms([p[0]['score'] for p in per], 100)} | {ms([p[0]['hlr'] for p in per])} | "
              f"{ms([p[0]['ior'] for p in per])} | {ms([p[1]['score'] for p in per], 100)} | "
              f"{ms([p[1]['gap_aug'] for p in per])} | {ms([p[1]['gap_noaug'] for p in per])} |")


def paired_table(finished: dict[str, list[float]], seeds: list[int]) -> None:
    """Each method under its own protocol against random real under the SAME protocol, seed by seed (recovery
    and student seed are the same number, so seed s of both rows is a pair)."""
    print("\n| method | top-1 % | random real, same protocol | difference | seeds above random real |")
    print("|---|---|---|---|---|")
    for cell_name, top1 in finished.items():
        method, _, protocol = cell_name.partition(", protocol ")
        student = method.partition(" -> ")[2]  # "frepo -> resnet18": paired with "random-real -> resnet18"
        rr = finished.get(f"random-real{' -> ' + student if student else ''}, protocol {protocol}")
        if method.startswith("random-real") or rr is None:
            continue
        d = np.array(top1) - np.array(rr)
        print(f"| {cell_name} | {np.mean(top1):.2f} | {np.mean(rr):.2f} | {d.mean():+.2f} "
              f"({' / '.join(f'{v:+.2f}' for v in d)}) | {int((d > 0).sum())} of {len(seeds)} |")


if __name__ == "__main__":
    main()
