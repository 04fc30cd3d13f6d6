"""recover: optimise synthetic pixels through frozen teachers (PRISM, and the SRe2L family as presets).

Size: about 400 lines, a third of them the engine's options (``EngineConfig``: each with its help text, choices
and bounds), the rest planning, teacher loading and the stage's resume and provenance; the inner loop and every
method's own code are already in ``methods/``.

    L(x) = CE(f_primary(A(x)), y) + alpha_BN * mean_{t in S} R_BN(t, A(x))  [+ TV-L2, L2, CLIP priors]

with x held as pixels or as a multi-resolution sum (``--param``, ``methods/params.py``); the inner loop is
``methods/engine.py``, what a method adds a plug-in (``methods/``).

Work is split into (class, IPC index) units; units are packed, IPC index first, into cross-class batches
of up to ``batch_size`` images (``pack='ipc'``, the reference: the classes of one IPC index per batch). Every random choice of a batch (views, jitter, noise init, rotation)
derives from (seed, batch index), and the teacher draws are made for all batches up front, so the images
do not depend on resume points or on how many processes share the work.

Output: ``images/<class>/<class>_<ipc>.png`` (an ImageFolder), ``records/batch_*.json`` (one per finished
batch: units, teachers, losses) and ``manifest.json``.
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import (check_finished_images, clear_outputs, guard_inputs, image_path, images_digest, load_model,
                         find_teachers, locked_stage, record_path, reusable, save_image, seal_distilled, seal_files,
                         teacher_digests, write_manifest)
from ..core import distributed as dist
from ..core.augment import JITTER_MODES
from ..core.config import CommonConfig, assemble_config, build_config, comma_list, config_hash, opt
from ..core.data import DatasetInfo, load_splits
from ..core.errors import PrismError
from ..core.io import JsonlLog, read_json, write_json
from ..core.models import has_batchnorm
from ..core.presets import METHODS, preset_file
from ..core.runtime import Heartbeat, Timer, default_channels_last, make_generator, progress
from ..methods import ENGINE_OPTION_KINDS, PARAMS, PLUGINS, option_groups
from ..methods.engine import Engine, Teacher, image_budget
from ..methods.priors import make_priors
from ..methods.starts import choose_starts, images_from, init_source, initial_images, start_indices
from ..core.log import get_logger

logger = get_logger("recover")

SELECTIONS = ("intra", "pre", "all", "single", "rotate")
INIT_SELECTS = ("first", "random", "low-loss", "mid-loss", "delt-medium")


@dataclass
class EngineConfig(CommonConfig):
    """The engine's options; ``RecoverConfig`` (below) adds every method's own."""

    PRESET_FAMILY: ClassVar[str] = "recover"
    PRESET_FIELD: ClassVar[str] = "method"
    OPTION_GROUPS: ClassVar[tuple] = ()  # set on RecoverConfig: the option groups whose fields it holds

    out: str = opt("runs/prism", "output folder: images/, records/, manifest.json", hashed=False)
    method: str = opt("prism", "a preset from `prismdd methods`; its fields sit under everything you set",
                      choices=METHODS.names())
    teachers: str = opt("runs/teachers", "a squeeze output folder (one sub-folder per architecture)", path=True)
    primary: str = opt("convnet", "the logit (CE) teacher's architecture")
    bn_pool: str | None = opt(None, "comma list of BN-teacher architectures; default: every teacher found")
    ipc: int = opt(10, "images per class", minimum=1)
    iterations: int = opt(1000, "optimisation steps per image (paper: 4000 at ImageNet scale)", minimum=1)
    batch_size: int = opt(100, "images per optimisation batch, across classes (paper: 100; larger helps)", minimum=1)
    lr: float = opt(0.05, "Adam learning rate on normalised pixels", minimum=0.0)
    betas: tuple[float, float] = opt((0.5, 0.9), "Adam's moment decay rates (beta1, beta2), as in SRe2L's recovery")
    alpha_bn: float = opt(0.01, "weight of the (averaged) BN term", minimum=0.0)
    first_bn_multiplier: float = opt(10.0, "weight of the first BN layer in R_BN", minimum=0.0)
    bn_layer_reduce: str = opt("sum", "sum over BN layers (paper) | mean (teachers with many layers stop dominating)",
                               choices=("sum", "mean"))
    bn_normalize: bool = opt(False, "divide each teacher's R_BN by its first-iteration value (off = paper)")
    selection: str = opt("intra", "BN set per batch: intra (redrawn) | pre (one draw) | all | single | rotate "
                                  "(one random pool member per iteration)", choices=SELECTIONS)
    slots: int = opt(3, "intra/pre: further BN-set slots besides the primary", minimum=0)
    slot_prob: float = opt(0.5, "intra/pre: probability that a slot is filled", minimum=0.0)
    init: str = opt("real", "real: start from real training images (chosen by init_select) | noise (SRe2L)",
                    choices=("real", "noise"))
    init_select: str = opt("first", "first: the k-th image of the class (reference) | random | low-loss | mid-loss | "
                                    "delt-medium (DELT: every class image ranked by the primary's true-class probability, "
                                    "taken alternately around the median)", choices=INIT_SELECTS)
    init_candidates: int = opt(300, "low-loss/mid-loss: random candidates per class ranked by the primary's CE",
                               minimum=1)
    init_tiles: int = opt(1, "f: start each image as an f x f mosaic of real images shrunk by f (RDED-style); 1 = off",
                          minimum=1)
    init_from: str = opt("", "a recover output folder of the same dataset and size: each image starts from a seeded "
                             "random image of its class there, randomly flipped (EDC starts from an RDED run's "
                             "images); replaces --init/--init-select/--init-tiles; '' = off", path=True)
    crop_scale: tuple[float, float] = opt((0.08, 1.0), "RandomResizedCrop scale range of the per-iteration view")
    crop_per: str = opt("batch", "batch: ONE crop box and ONE flip per batch and iteration (the SRe2L/PRISM scripts) | "
                                 "image: an independent crop and flip per image (prismdd)", choices=("batch", "image"))
    crop_schedule: str = opt("uniform", "uniform | cosine (CDA: the lower bound falls from the upper to the floor)",
                             choices=("uniform", "cosine"))
    jitter: int | None = opt(None, "roll limit in pixels; None: 32 px at 224, scaled to the resolution", minimum=0)
    jitter_mode: str = opt("reference", "reference: roll by randint(0, jitter) on each axis (the SRe2L/PRISM scripts) | "
                                        "symmetric: by -jitter..jitter (prismdd)", choices=JITTER_MODES)
    pack: str = opt("ipc", "ipc: batches never mix IPC indices (classes of one index per batch) and the intra BN set is "
                           "drawn once per IPC index, shared by all its batches (the reference) | cross: batches fill "
                           "across IPC indices, one draw per batch (prismdd) | class: class-major batches, every IPC "
                           "index of a class together (DELT)", choices=("ipc", "cross", "class"))
    flip: bool = opt(True, "random horizontal flip of each view")
    budget: str = opt("constant", "constant | early_late (PRISM's code: iterations - step * (ipc index mod cycle)) | "
                                  "rounds (DELT's code: a class's IPC indices split into contiguous groups, group r "
                                  "joins at round r; only joined images are forwarded; one Adam step count, LR and crop "
                                  "schedule per batch)", choices=("constant", "early_late", "rounds"))
    early_late_step: float = opt(0.125, "early_late: budget cut per IPC index; rounds: round length; as a fraction of "
                                        "the iterations (500 of 4000)", minimum=0.0)
    early_late_cycle: int = opt(8, "early_late: the cut repeats every this many IPC indices", minimum=1)
    min_rounds: int = opt(0, "rounds: each class draws its round count uniformly from [min_rounds, all rounds], "
                             "seeded by --seed and the class (DELT's --min-iterations / --round-iterations, which "
                             "its scripts never set and which raises in its code: FIDELITY.md note 8); 0 = every "
                             "class gets all rounds", minimum=0)
    tv_l2: float = opt(0.0, "total-variation (L2) image prior weight", minimum=0.0)
    l2: float = opt(0.0, "L2 image prior weight", minimum=0.0)
    param: str = opt("pixels", "how an image is held while it is optimised: pixels (every pixel a parameter) | multires "
                               "(Direct Ascent Synthesis: a sum of components from 1 px up to the full side, each "
                               "upsampled, squashed into the valid range by tanh; any method, e.g. --method sre2l "
                               "--param multires)", choices=PARAMS.names())
    view_noise: float = opt(0.0, "uniform noise in [0, s) (in [0, 1] pixel units) added to every view before the "
                                 "teachers see it, then clipped to the valid range (DAS's augmentation: 0.2); 0 = off",
                            minimum=0.0)
    channels_last: bool | None = opt(None, "NHWC convolutions; None: per device: on for CUDA (gpu_check.sh times "
                                           "both), off on CPU, where on measured 0.8-1.3x run to run "
                                           "(BENCHMARKS.md section 1)", hashed=False)
    compile: bool = opt(False, "torch.compile the teachers (cold compile costs seconds to minutes)", hashed=False)
    amp: bool = opt(False, "bf16 autocast on CUDA")
    log_every: int = opt(50, "iterations between JSON-lines loss records", minimum=1, hashed=False)
    force: bool = opt(False, "redo finished batches", hashed=False)
    plugin: str = opt("none", "a method's mechanism beyond the engine (set by its preset): none | " + " | ".join(
        n for n in PLUGINS.names() if n != "none"), choices=PLUGINS.names())

    def check(self):
        if self.init_tiles > 8:
            raise PrismError(f"--init-tiles {self.init_tiles}: expected 1 (off) to 8 tiles per side")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise PrismError(f"--crop-scale {self.crop_scale}: expected 0 < low <= high <= 1")
        if self.slot_prob > 1:
            raise PrismError(f"--slot-prob {self.slot_prob}: a probability, expected 0 to 1")
        if self.min_rounds and self.budget != "rounds":
            raise PrismError(f"--min-rounds {self.min_rounds}: only --budget rounds (DELT) draws round counts, this "
                             f"run's budget is {self.budget}; drop it or add --budget rounds")
        if self.min_rounds and self.budget == "rounds":
            length = max(1, int(round(self.early_late_step * self.iterations)))
            rounds = max(1, self.iterations // length)  # engine.image_budget's round count
            if self.min_rounds > rounds:
                raise PrismError(f"--min-rounds {self.min_rounds}: above the {rounds} rounds of this run (--iterations "
                                 f"{self.iterations} / round length {length}), so every class would get all rounds; "
                                 f"pass 1 to {rounds}, or 0 for all rounds")
        for group in self.OPTION_GROUPS:  # each method's own rules, declared beside its options
            group.check(self)
        plugin = PLUGINS.get(self.plugin)
        for group in self.OPTION_GROUPS:  # a shared group the method does not read (engine kinds: at run time)
            on = group.in_use(self) if group.kind not in ("plugin", *ENGINE_OPTION_KINDS) else None
            if on and not plugin.reads_kind(group.kind):
                readers = [n for n in PLUGINS.names() if PLUGINS.get(n).reads_kind(group.kind)]
                raise PrismError(f"{on}: --method {self.method} does not read {group.kind} options (plug-ins that "
                                 f"do: {', '.join(readers) or 'none'}), so it would change nothing; drop it")

    @classmethod
    def help_groups(cls, values: dict, chosen: bool) -> list[tuple[str, str, list[str], bool]]:
        """``--help``'s sections: (title, description, fields, shown), the engine's first, then one per option group.
        With a method named (``chosen``), a group is shown only where it acts on that method: its plug-in's own,
        and the parametrisation and prior groups where the engine optimises the method's pixels; the others still
        parse (a wrong one is refused when the config is checked or run), they are only left out of the listing."""
        plugin = PLUGINS.get(values["plugin"]) if values.get("plugin") in PLUGINS else None
        own = {f.name for g in cls.OPTION_GROUPS for f in dataclasses.fields(g)}
        engine = [f.name for f in dataclasses.fields(cls) if f.name not in own]
        sections = [("engine", "the options of recover's engine, which every method shares", engine, True)]
        kinds = {"plugin": "plug-in", "param": "parametrisation", "prior": "prior", "select": "selection"}
        for g in cls.OPTION_GROUPS:
            shown = (not chosen or plugin is None
                     or (g.name == plugin.name if g.kind == "plugin" else plugin.reads_kind(g.kind)))
            about = " ".join((g.__doc__ or "").replace("``", "").split())
            sections.append((f"{kinds[g.kind]} {g.name}", about, [f.name for f in dataclasses.fields(g)], shown))
        return sections


# the engine's fields plus every registered method's own (methods/*.py), under their flat names: what the CLI,
# YAML files and the config hash see is the same as when all of them were declared here
RecoverConfig = assemble_config("RecoverConfig", EngineConfig, option_groups(), __name__)


def recover_config(method: str = "prism", **overrides) -> RecoverConfig:
    """API twin of the CLI: defaults < the method's preset < overrides."""
    return build_config(RecoverConfig, dict(overrides, method=method))


# ----------------------------------------------------------------------------- planning
def plan_batches(num_classes: int, ipc: int, batch_size: int, pack: str = "cross") -> list[list[tuple[int, int]]]:
    """(class, ipc index) units, IPC index first, packed into cross-class batches.

    ``pack='ipc'`` (the reference's ``for ipc_id: for start in range(0, classes, batch_size)``): a batch holds
    classes of ONE IPC index only; ``'cross'``: batches are filled across IPC indices; ``'class'`` (DELT's
    unshuffled class-ordered loader): class first, every IPC index of a class next to each other."""
    if pack == "class":
        units = [(c, k) for c in range(num_classes) for k in range(ipc)]
        return [units[i: i + batch_size] for i in range(0, len(units), batch_size)]
    if pack == "ipc":
        return [[(c, k) for c in range(s, min(s + batch_size, num_classes))]
                for k in range(ipc) for s in range(0, num_classes, batch_size)]
    units = [(c, k) for k in range(ipc) for c in range(num_classes)]
    return [units[i: i + batch_size] for i in range(0, len(units), batch_size)]


def draw_teacher_sets(cfg: RecoverConfig, primary: str, pool: list[str], n_batches: int) -> list[list[str]]:
    """The BN set of every batch, drawn up front from (seed, 'selection') and recorded.

    intra: per draw, the primary plus each of ``slots`` further slots filled with probability
    ``slot_prob`` by a distinct pool member; ``n_batches`` draws (``batch_teacher_sets`` maps them to
    batches: one per IPC index under ``pack='ipc'``, as the reference's ``main_syn(ipc_id)``, else one per
    batch). pre: one such draw for the whole run.
    """
    gen = make_generator(cfg.seed, "selection")
    others = [a for a in pool if a != primary]

    def draw() -> list[str]:
        chosen, remaining = [primary], list(others)
        for _ in range(cfg.slots):
            if remaining and torch.rand(1, generator=gen).item() < cfg.slot_prob:
                chosen.append(remaining.pop(int(torch.randint(len(remaining), (1,), generator=gen))))
        return chosen

    if cfg.selection == "intra":
        return [draw() for _ in range(n_batches)]
    if cfg.selection == "pre":
        fixed = draw()
        return [list(fixed) for _ in range(n_batches)]
    if cfg.selection == "all":
        return [[primary] + others for _ in range(n_batches)]
    if cfg.selection == "single":
        return [[primary] for _ in range(n_batches)]
    return [[primary] + others for _ in range(n_batches)]  # rotate: the candidates; one is used per iteration


def batch_teacher_sets(cfg: RecoverConfig, primary: str, pool: list[str], batches) -> list[list[str]]:
    """The BN set of every batch: under ``pack='ipc'`` one draw per IPC index, shared by every batch of that
    index (all units of a batch then share one index); under ``'cross'`` one draw per batch."""
    if cfg.pack == "ipc":
        per_ipc = draw_teacher_sets(cfg, primary, pool, cfg.ipc)
        return [list(per_ipc[units[0][1]]) for units in batches]
    return draw_teacher_sets(cfg, primary, pool, len(batches))


# ----------------------------------------------------------------------------- teachers
def load_teachers(cfg: RecoverConfig, info: DatasetInfo, device) -> tuple[Teacher, dict[str, Teacher], list[str]]:
    """Load the primary and the BN pool; BN-free architectures are rejected from the pool unless the plug-in
    matches their statistics itself (``Plugin.takes_bn_free``)."""
    found = find_teachers(cfg.teachers)
    pool = comma_list(cfg.bn_pool) or list(found)
    need = [cfg.primary] + [a for a in pool if a != cfg.primary]
    missing = [a for a in need if a not in found]
    if missing:
        raise PrismError(f"--teachers {cfg.teachers}: no trained teacher for {', '.join(missing)} "
                         f"(found: {', '.join(found)}); train it with `prismdd squeeze --arch {','.join(missing)} "
                         f"--out {cfg.teachers}`")
    teachers = {}
    for arch in need:
        model, card = load_model(found[arch], arch=arch, dataset=info.name, class_names=info.class_names,
                                 resolution=info.resolution, device=device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        teachers[arch] = Teacher(arch, model, card, str(found[arch]))
    bn_free = [a for a in pool if not has_batchnorm(teachers[a].model)]
    if bn_free and not PLUGINS.get(cfg.plugin).takes_bn_free(cfg):  # EDC matches them through conv statistics
        raise PrismError(f"--bn-pool: {', '.join(bn_free)} has no BatchNorm layers and would add 0 to the BN mean "
                         f"while counting in it; remove it from --bn-pool")
    if cfg.alpha_bn > 0 and not has_batchnorm(teachers[cfg.primary].model):
        # the primary is always in the BN set (reference behaviour), so it must have BN layers
        raise PrismError(f"--primary {cfg.primary}: has no BatchNorm layers, so it cannot serve the BN term; "
                         f"pick a BN architecture or --set alpha_bn=0")
    return teachers[cfg.primary], teachers, pool


def _batch_done(out: Path, b: int, units) -> bool:
    """A batch is finished when its record (written last; every record was checked against these settings
    before) and its images exist."""
    return record_path(out, b).exists() and all(image_path(out, c, k).exists() for c, k in units)


# ----------------------------------------------------------------------------- the stage
@locked_stage("recover")
def recover(cfg: RecoverConfig) -> Path:
    """Run recovery; returns the output folder. Resumable; shards batches over torchrun ranks."""
    timer = Timer()
    ctx = dist.init(cfg.device)
    device = ctx.device
    if cfg.channels_last is None:  # recorded resolved in the manifest
        cfg = dataclasses.replace(cfg, channels_last=default_channels_last(device))
    out = Path(cfg.out)
    train, _, info = load_splits(cfg)
    plugin_cls = PLUGINS.get(cfg.plugin)
    if plugin_cls.uses_teachers:
        primary, teachers, pool = load_teachers(cfg, info, device)
    elif cfg.init == "real" and cfg.init_select not in ("first", "random"):
        raise PrismError(f"--init-select {cfg.init_select}: ranks real images with a teacher, and --method "
                         f"{cfg.method} uses none; use first or random")
    else:
        primary, teachers, pool = None, {}, []
    # options that act on the engine's pixel optimisation: its own, and any parametrisation or prior group switched on
    engine_only = [f"{f} {v}" for f, v, off in (("--param", cfg.param, "pixels"), ("--view-noise", cfg.view_noise, 0.0))
                   if v != off]
    engine_only += [g.in_use(cfg) for g in cfg.OPTION_GROUPS if g.kind in ENGINE_OPTION_KINDS and g.in_use(cfg)]
    if engine_only and not plugin_cls.engine_optimises:
        raise PrismError(f"{engine_only[0]}: --method {cfg.method} {plugin_cls.without_engine}, so it would change nothing; drop it or pick "
                         f"an optimising method (e.g. sre2l, prism)")
    priors = make_priors(cfg, info, device)  # e.g. the CLIP prior: its model loads (or fails) before any other work
    # a plug-in that learns the whole set jointly gets one class-major batch of every unit
    batches = (plan_batches(info.num_classes, cfg.ipc, info.num_classes * cfg.ipc, "class") if plugin_cls.whole_set
               else plan_batches(info.num_classes, cfg.ipc, cfg.batch_size, cfg.pack))
    sets = batch_teacher_sets(cfg, cfg.primary, pool, batches)
    source = init_source(cfg, info) if cfg.init_from else None
    before = preset_file("recover", cfg.method).get("starts_from") if cfg.method else None
    if before and source is None and ctx.rank == 0:
        logger.info(f"[recover] note: {cfg.method}'s reference starts from a {before} run's images; without "
                    f"--init-from (a {before} recover folder) this run starts as its preset says (FIDELITY.md); "
                    f"`prismdd run` chains both")
    starts = (choose_starts(cfg, train, info, primary and primary.model, device) if cfg.init == "real" and source is None
              else None)
    # the plug-in checks its options and loads its models (t2i, d4m: minutes, or a one-line refusal) before
    # --force touches the folder: a call that fails its checks leaves a finished set as it was
    plugin = plugin_cls(cfg, info, train, teachers, pool, device)
    if cfg.force and ctx.rank == 0:  # every file of the replaced run goes (a smaller IPC leaves no image behind),
        # the files of every method included: the previous run may have been another method (FRePo's labels)
        clear_outputs(out, "records/batch_*.json", "images/*/*.png", "logs/rank*.jsonl",
                      *dict.fromkeys(f for name in PLUGINS.names() for f in PLUGINS.get(name).owned_files))
    if ctx.rank == 0:  # teachers retrained in place since the finished batches were made: refused
        guard_inputs(out, {**teacher_digests({a: t.folder for a, t in teachers.items()}),
                           **({"init_from": images_digest(source.images, source.targets)} if source else {}),
                           **{f"prior/{p.name}": p.digest() for p in priors},
                     **{f"plugin/{k}": v for k, v in plugin.input_digests().items()}},  # e.g. a selection's scores
                     force=cfg.force)
        check_finished_images(out)  # a finished set's images edited since: refused, not kept as recovered
    dist.barrier(ctx)
    chash = config_hash(cfg)
    for p in sorted((out / "records").glob("batch_*.json")):  # every batch of the folder, not only ours
        reusable(p, chash, what="a recovery batch")  # made with other settings: refused, never mixed in
    mine = [b for b in range(len(batches)) if b % ctx.world_size == ctx.rank]
    present = plugin.outputs_present(out)  # e.g. FRePo's learned labels deleted: its one batch is made again
    todo = [b for b in mine if not (present and _batch_done(out, b, batches[b]))]
    if ctx.rank == 0 and len(todo) < len(mine):
        logger.info(f"[recover] resuming: {len(mine) - len(todo)} of {len(mine)} batches already finished")
    log = JsonlLog(out / "logs" / f"rank{ctx.rank}.jsonl")
    plugin_inputs = plugin.prepare(out, ctx.rank)
    with ExitStack() as stack:
        engine = Engine(cfg, info, primary, teachers, device, stack, plugin, priors)
        bar = progress(total=len(todo), desc=f"recover {cfg.method}", disable=None if ctx.rank == 0 else True)
        # a line a minute without a terminal: per iteration where the engine optimises (a batch can take half an
        # hour), per batch otherwise (a whole-set method such as FRePo says its own steps)
        per_iter = plugin_cls.engine_optimises
        beat = Heartbeat(f"recover {cfg.method}", sum(max(image_budget(cfg, k, c) for c, k in batches[b]) for b in todo)
                         if per_iter else len(todo), enabled=ctx.rank == 0)
        for b in todo:
            units = batches[b]
            start = start_indices(cfg, units, starts) if starts is not None else None
            if source is not None:
                x0, picks = images_from(cfg, units, source, info)
            else:
                x0, picks = initial_images(cfg, b, units, train, info, start), None
            t0 = Timer()
            made = plugin.synthesize(b, units, x0)
            if made is None:
                x, record = engine.run_batch(b, units, sets[b], x0, log, beat if per_iter else None)
            else:  # a method that does not optimise pixels (RDED, D4M)
                x, extras = made
                record = {"batch": b, "units": [list(u) for u in units], "bn_set": [], "primary": cfg.primary,
                          "iterations": 0, "budgets": [0] * len(units), "final_losses": {}, **extras}
            for (c, k), img in zip(units, x):
                save_image(image_path(out, c, k), img, info)
            record["seconds"] = round(t0.elapsed, 2)
            record["config_hash"] = chash
            if start is not None:  # provenance: which real images each synthetic image grew from
                record["start_indices"] = start
            if picks is not None:  # provenance: which image of --init-from each one grew from (its position there)
                record["init_from"] = picks
            write_json(record_path(out, b), record)  # last: marks the batch finished
            bar.update(1)
            bar.set_postfix(ce=record["final_losses"].get("ce"), bn=record["final_losses"].get("bn_mean"))
            if not per_iter:
                beat.step()
        bar.close()
    dist.barrier(ctx)
    if ctx.rank == 0:
        records = [read_json(record_path(out, b)) for b in range(len(batches))]
        images = {f"{c}_{k}": {"file": str(image_path(out, c, k).relative_to(out)), "class": c, "ipc_index": k,
                               "teachers": r["bn_set"] if cfg.selection != "rotate" else sorted(r.get("rotation_counts", {})),
                               "primary": r["primary"], "batch": r["batch"], "iterations": r["budgets"][i],
                               "start_indices": r.get("start_indices", [None] * len(r["units"]))[i],
                               **({"init_from": r["init_from"][i]} if "init_from" in r else {})}
                  for r in records for i, (c, k) in enumerate(map(tuple, r["units"]))}
        write_manifest(out, "recover", cfg,
                       inputs={"dataset": info.to_dict(),
                               "teachers": {a: {"folder": t.folder, "test_top1": t.card.get("test_top1"),
                                                "role": ("primary" if a == cfg.primary else "bn")}
                                            for a, t in teachers.items()},
                               "bn_pool": pool, "plugin": {"name": cfg.plugin, **plugin_inputs},
                               "param": PARAMS.get(cfg.param)(cfg, info, device).describe(),
                               **({"priors": {p.name: p.describe() for p in priors}} if priors else {}),
                               **({"init_from": {"folder": str(source.folder), "method": source.manifest.get(
                                   "config", {}).get("method"), "images": images_digest(source.images, source.targets)}}
                                  if source is not None else {}),
                               "digests": teacher_digests({a: t.folder for a, t in teachers.items()})},
                       outputs={"images": images, "num_images": len(images), "batches": records,
                                "images_sha256": seal_distilled(out, images),  # also seals each entry of images
                                **({"files": seal_files(out, plugin_cls.sealed_files)} if plugin_cls.sealed_files
                                   else {})},
                       wall_time=timer.elapsed,
                       extra={"world_size": ctx.world_size})
        logger.info(f"[recover] {len(images)} images -> {out / 'images'} ({timer.elapsed:.1f}s)")
    dist.barrier(ctx)
    return out
