"""recover: optimise synthetic pixels through frozen teachers (PRISM, and the SRe2L family as presets).

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
from ..core.config import CommonConfig, build_config, comma_list, config_hash, opt
from ..core.data import DatasetInfo, load_splits
from ..core.errors import PrismError
from ..core.io import JsonlLog, read_json, write_json
from ..core.models import has_batchnorm
from ..core.presets import METHODS, preset_file
from ..core.runtime import Heartbeat, Timer, default_channels_last, make_generator, progress
from ..methods import PARAMS, PLUGINS
from ..methods.engine import Engine, Teacher, image_budget
from ..methods.priors import make_priors
from ..methods.starts import choose_starts, images_from, init_source, initial_images, start_indices
from ..core.log import get_logger

logger = get_logger("recover")

SELECTIONS = ("intra", "pre", "all", "single", "rotate")
INIT_SELECTS = ("first", "random", "low-loss", "mid-loss", "delt-medium")


@dataclass
class RecoverConfig(CommonConfig):
    PRESET_FAMILY: ClassVar[str] = "recover"
    PRESET_FIELD: ClassVar[str] = "method"

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
                             "images); replaces --init/--init-select/--init-tiles; '' = off", path=True, neutral="")
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
                             "class gets all rounds", minimum=0, neutral=0)
    tv_l2: float = opt(0.0, "total-variation (L2) image prior weight", minimum=0.0)
    l2: float = opt(0.0, "L2 image prior weight", minimum=0.0)
    param: str = opt("pixels", "how an image is held while it is optimised: pixels (every pixel a parameter) | multires "
                               "(Direct Ascent Synthesis: a sum of components from 1 px up to the full side, each "
                               "upsampled, squashed into the valid range by tanh; any method, e.g. --method sre2l "
                               "--param multires)", choices=PARAMS.names(), neutral="pixels")
    multires_step: int = opt(4, "multires: component sides 1, 1 + step, 1 + 2 step, ... and always the full side (DAS: "
                                "range(1, side + 1, 4)); 1 = every side", minimum=1, neutral=4)
    multires_optimizer: str = opt("engine", "multires: engine (the method's Adam, schedule and budget on every component, "
                                            "its LR divided by the number of components) | sgd (DAS: plain gradient "
                                            "steps of size --lr, the same cosine; coarse components, which gather the "
                                            "gradient of many pixels, move first)", choices=("engine", "sgd"),
                                  neutral="engine")
    view_noise: float = opt(0.0, "uniform noise in [0, s) (in [0, 1] pixel units) added to every view before the "
                                 "teachers see it, then clipped to the valid range (DAS's augmentation: 0.2); 0 = off",
                            minimum=0.0, neutral=0.0)
    clip_prior: str = opt("", "a CLIP model (a local transformers folder, or a model id already in the local Hugging Face "
                              "cache; never downloaded; pip install 'prismdd[clip]'): adds clip_weight * (1 - cosine) "
                              "between the CLIP embedding of every view and the text embedding of --clip-prompt for its "
                              "class; '' = off", neutral="")
    clip_weight: float = opt(1.0, "weight of the CLIP prior", minimum=0.0, neutral=1.0)
    clip_prompt: str = opt("a photo of a {name}", "CLIP prior: the text per class, {name} = the class name (ImageFolder "
                                                  "folder names; ImageNet synset folders get their WordNet names)",
                           neutral="a photo of a {name}")
    channels_last: bool | None = opt(None, "NHWC convolutions; None: per device: on for CUDA (gpu_check.sh times "
                                           "both), off on CPU, where on measured 0.8-1.3x run to run "
                                           "(BENCHMARKS.md section 1)", hashed=False)
    compile: bool = opt(False, "torch.compile the teachers (cold compile costs seconds to minutes)", hashed=False)
    amp: bool = opt(False, "bf16 autocast on CUDA")
    log_every: int = opt(50, "iterations between JSON-lines loss records", minimum=1, hashed=False)
    force: bool = opt(False, "redo finished batches", hashed=False)
    plugin: str = opt("none", "a method's mechanism beyond the engine (set by its preset): none | " + " | ".join(
        n for n in PLUGINS.names() if n != "none"), choices=PLUGINS.names(), neutral="none")
    # --- plug-in settings (each plug-in's fields carry its name as a prefix) ---
    rded_mipc: int = opt(300, "rded: random real images per class whose crops are scored (RDED scripts: --mipc 300; "
                              "a class with fewer gives all it has)", minimum=1, neutral=300)
    rded_num_crop: int = opt(5, "rded: RandomResizedCrops scored per real image; its best is kept (--num-crop 5)",
                             minimum=1, neutral=5)
    rded_factor: int = opt(2, "rded: f, each image stitched from f x f crops of side resolution // f (--factor: 2 for "
                              "ImageNet subsets, 1 for CIFAR and Tiny-ImageNet)", minimum=1, neutral=2)
    rded_crop_scale: tuple[float, float] = opt((0.08, 1.0), "rded: RandomResizedCrop area range of the scored crops "
                                                            "(square)", neutral=(0.08, 1.0))
    gvbsm_r_loss: float = opt(0.01, "gvbsm: weight of the summed BN + conv statistics term (recover.sh --r-loss 0.01)",
                              minimum=0.0, neutral=0.01)
    gvbsm_momentum: float = opt(0.4, "gvbsm: EMA momentum of the synthetic statistics (--training-momentum, default "
                                     "0.4)", minimum=0.0, neutral=0.4)
    gvbsm_dd_weight: float = opt(1.0, "gvbsm: weight of the data-densification loss (recover.sh --nuc-norm 1.)",
                                 minimum=0.0, neutral=1.0)
    gvbsm_tau: float = opt(4.0, "gvbsm: temperature of the densification target softmax(l / tau) (--tau 4.0)",
                           minimum=0.0, neutral=4.0)
    gvbsm_dd_pool: int = opt(32, "gvbsm: side the views are average-pooled to before the per-class Gram matrix "
                                 "(the reference's 32 at 224 px)", minimum=1, neutral=32)
    gvbsm_stats_images: int | None = opt(None, "gvbsm: real training images in the one-off conv-statistics pass per "
                                               "teacher (None: all, the reference); stored beside the teacher",
                                         minimum=1, neutral=None)
    dwa_rho: float = opt(0.0, "dwa: total length of the primary's weight adjustment before each batch (scripts: --rho "
                              "15e-3); 0 = off", minimum=0.0, neutral=0.0)
    dwa_steps: int = opt(1, "dwa: normalised CE-ascent steps of length rho / steps on the batch's starting images "
                            "(--steps: 15 ImageNet-1K, 12 CIFAR and Tiny-ImageNet)", minimum=1, neutral=1)
    dwa_var_weight: float = opt(1.0, "dwa: weight of the variance part of the primary's R_BN (--r-var: 2 ImageNet-1K, "
                                     "11 CIFAR and Tiny-ImageNet); 1 = the engine's", minimum=0.0, neutral=1.0)
    dwa_carry_grad: bool = opt(False, "dwa: the reference's leftover teacher gradient: the first adjustment step of a "
                                      "batch also carries the sum of the previous batch's weight gradients (same IPC "
                                      "index; its teacher is never frozen); needs --pack ipc and one process",
                               neutral=False)
    edc_weight: float = opt(0.0, "edc: weight of the soft category-aware statistics term (recover.sh --r-loss 0.1); "
                                 "0 = off", minimum=0.0, neutral=0.0)
    edc_class_weight: float = opt(0.5, "edc: share of the class-statistics part in each layer's term, the rest "
                                       "matches the running statistics (--category-aware global: 0.5)",
                                  minimum=0.0, neutral=0.5)
    edc_momentum: float = opt(0.8, "edc: EMA momentum of the synthetic statistics (--training-momentum 0.8); 0 = "
                                   "none", minimum=0.0, neutral=0.8)
    edc_stats_images: int | None = opt(None, "edc: training images (random, seeded) in the one-off pass that makes the "
                                             "global conv and the class statistics (None: all, the reference)",
                                       minimum=1, neutral=None)
    edc_conv: bool = opt(False, "edc: also match every Conv2d input's channel and 16x16-patch statistics (G-VBSM's "
                                "conv hooks, EDC's default); off: BatchNorm layers only", neutral=False)
    edc_swap_patch_targets: bool = opt(False, "edc: the reference's class files hold patch mean and variance under "
                                              "each other's names (utils.py:359-362); on: match them that way",
                                       neutral=False)
    edc_round_robin: bool = opt(False, "edc: one teacher of the batch's set per iteration, counter mod n, for CE and "
                                       "statistics (the reference's counter)", neutral=False)
    edc_order: str | None = opt(None, "edc: the round-robin's order, a comma list; the batch's teachers named here "
                                      "come first, in this order, the rest after in --bn-pool order", neutral=None)
    edc_gpus: int = opt(1, "edc: the reference's processes per batch, each counting its own iterations: batch b (one "
                           "process's share) has counter (b // edc_gpus) * iterations + it (recover.sh: 4)", minimum=1,
                        neutral=1)
    d4m_model: str = opt("stable-diffusion-v1-5/stable-diffusion-v1-5", "d4m: a local diffusers Stable Diffusion folder, "
                         "or a model id already in the local Hugging Face cache (never downloaded; needs "
                         "pip install 'prismdd[diffusion]')", neutral="stable-diffusion-v1-5/stable-diffusion-v1-5")
    d4m_size: int = opt(512, "d4m: side the real images are resized to before VAE encoding; the generated images have "
                             "it too before the resize to --resolution (gen_prototype.py --size 512)", minimum=8,
                        neutral=512)
    d4m_max_images: int | None = opt(None, "d4m: real images per class encoded and clustered, a seeded random subset "
                                           "(None: all, the reference)", minimum=1, neutral=None)
    d4m_km_expand: int = opt(1, "d4m: MiniBatchKMeans is fed chunks of km_expand * ipc latents "
                                "(gen_prototype_imgnt.sh --km_expand 1)", minimum=1, neutral=1)
    d4m_strength: float = opt(0.7, "d4m: img2img strength: how far each prototype is noised before denoising "
                                   "(gen_syn_image_imgnt.sh --strength 0.7)", minimum=0.0, neutral=0.7)
    d4m_guidance: float = opt(8.0, "d4m: classifier-free guidance scale (--guidance_scale 8)", minimum=0.0, neutral=8.0)
    d4m_steps: int = opt(50, "d4m: scheduler steps for strength 1; strength * steps are run (diffusers' default 50)",
                         minimum=1, neutral=50)
    d4m_prompt: str = opt("{name}", "d4m: prompt per class, {name} = the class name (the reference: the label text)",
                          neutral="{name}")
    d4m_negative_prompt: str = opt("cartoon, anime, painting", "d4m: negative prompt (gen_syn_image.py); empty = none",
                                   neutral="cartoon, anime, painting")
    t2i_model: str = opt("", "t2i: a local diffusers text-to-image folder (SD 1.x/2.x, SDXL, SD 3.5, FLUX: anything "
                             "diffusers' AutoPipelineForText2Image loads), or a model id already in the local Hugging "
                             "Face cache; never downloaded; needs pip install 'prismdd[diffusion]'", neutral="")
    t2i_prompt: str = opt("a photo of a {name}", "t2i: prompt per image, {name} = the class name",
                          neutral="a photo of a {name}")
    t2i_negative_prompt: str = opt("", "t2i: negative prompt (models with classifier-free guidance); '' = none",
                                   neutral="")
    t2i_steps: int | None = opt(None, "t2i: denoising steps; None: the model family's default (few-step Turbo and "
                                      "Schnell models: theirs)", minimum=1, neutral=None)
    t2i_guidance: float | None = opt(None, "t2i: classifier-free guidance scale; None: the model family's default "
                                           "(0 for Turbo and Schnell)", minimum=0.0, neutral=None)
    t2i_size: int | None = opt(None, "t2i: side of the generated image before the resize to --resolution; None: the "
                                     "model family's native side", minimum=8, neutral=None)
    t2i_batch: int = opt(4, "t2i: images per generator call (memory only: every image has its own seed)", minimum=1,
                         hashed=False)
    frepo_pool: int = opt(10, "frepo: networks in the online pool (distill.py --num_nn_state 10)", minimum=1, neutral=10)
    frepo_online_steps: int = opt(100, "frepo: online training steps of a pool network on the synthetic set before it "
                                       "is re-initialised (--max_online_updates 100)", minimum=1, neutral=100)
    frepo_online_lr: float = opt(3e-4, "frepo: Adam learning rate of the pool networks' online training (3e-4)",
                                 minimum=0.0, neutral=3e-4)
    frepo_arch: str = opt("convnet", "frepo: the pool networks' architecture, any of `prismdd models` (the reference "
                                     "distils with a BatchNorm ConvNet-D3)", neutral="convnet")
    frepo_width: float = opt(1.0, "frepo: width multiplier of the pool networks (1.0: 128 channels)", minimum=0.01,
                             neutral=1.0)
    frepo_real_batch: int = opt(1024, "frepo: real images T per step (--batch_size 1024)", minimum=1, neutral=1024)
    frepo_lr: float = opt(3e-4, "frepo: LAMB learning rate of the pixels (3e-4; LAMB scales it by each tensor's norm)",
                          minimum=0.0, neutral=3e-4)
    frepo_label_lr: float = opt(3e-4, "frepo: LAMB learning rate of the learned labels (3e-4, the same optimiser); "
                                      "0 = labels stay centred one-hot", minimum=0.0, neutral=3e-4)
    frepo_lr_floor: float = opt(0.1, "frepo: both learning rates follow a cosine from 1 to this factor (alpha 0.1)",
                                minimum=0.0, neutral=0.1)
    frepo_reg: float = opt(1e-6, "frepo: kernel ridge lambda as a multiple of K_SS's mean diagonal (1e-6)",
                           minimum=0.0, neutral=1e-6)
    frepo_margin: float = opt(1.0, "frepo: weight of the label-margin term -min(top1 - top2, 1/C) on the learned "
                                   "labels (the reference adds it with weight 1)", minimum=0.0, neutral=1.0)
    frepo_flip: bool = opt(False, "frepo: S and its mirror image both support the regression (the reference: on for "
                                  "RGB sets, off for MNIST / Fashion-MNIST)", neutral=False)
    frepo_checkpoint_every: int = opt(100, "frepo: steps between checkpoints of the whole state (kill -9 resumes from "
                                           "the last)", minimum=1, hashed=False)

    def check(self):
        if self.init_tiles > 8:
            raise PrismError(f"--init-tiles {self.init_tiles}: expected 1 (off) to 8 tiles per side")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise PrismError(f"--crop-scale {self.crop_scale}: expected 0 < low <= high <= 1")
        if self.slot_prob > 1:
            raise PrismError(f"--slot-prob {self.slot_prob}: a probability, expected 0 to 1")
        if not 0 < self.rded_crop_scale[0] <= self.rded_crop_scale[1] <= 1:
            raise PrismError(f"--rded-crop-scale {self.rded_crop_scale}: expected 0 < low <= high <= 1")
        if self.edc_class_weight > 1:
            raise PrismError(f"--edc-class-weight {self.edc_class_weight}: a share, expected 0 to 1")
        if self.edc_momentum >= 1:
            raise PrismError(f"--edc-momentum {self.edc_momentum}: expected 0 <= momentum < 1")
        if self.d4m_strength > 1:
            raise PrismError(f"--d4m-strength {self.d4m_strength}: expected 0 to 1")
        if "{name}" not in self.d4m_prompt:
            raise PrismError(f"--d4m-prompt {self.d4m_prompt!r}: must contain {{name}} (the class name)")
        for flag, value in (("--clip-prompt", self.clip_prompt), ("--t2i-prompt", self.t2i_prompt)):
            if "{name}" not in value:
                raise PrismError(f"{flag} {value!r}: must contain {{name}} (the class name)")
        # options that would change nothing are refused, not passed over in silence
        if self.param != "multires":
            for flag, value, off in (("--multires-step", self.multires_step, 4),
                                     ("--multires-optimizer", self.multires_optimizer, "engine")):
                if value != off:
                    raise PrismError(f"{flag} {value}: only --param multires uses it (this run holds pixels); drop "
                                     f"it or add --param multires")
        if not self.clip_prior and self.clip_weight != 1.0:
            raise PrismError(f"--clip-weight {self.clip_weight}: weighs the CLIP prior, and no --clip-prior is given; "
                             f"drop it or add --clip-prior MODEL")
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
        if self.frepo_lr_floor > 1:
            raise PrismError(f"--frepo-lr-floor {self.frepo_lr_floor}: the factor the cosine falls to from 1; above 1 "
                             f"both learning rates would rise instead; pass 0 to 1 (FRePo: 0.1)")


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
    engine_only = [f"{f} {v}" for f, v, off in (("--param", cfg.param, "pixels"), ("--clip-prior", cfg.clip_prior, ""),
                                                ("--view-noise", cfg.view_noise, 0.0)) if v != off]
    if engine_only and not plugin_cls.engine_optimises:
        # FRePo does optimise its pixels, in a loop of its own: the message must not say otherwise
        how = ("optimises its pixels in its own loop, not with recover's engine that this option acts on" if
               plugin_cls.name == "frepo" else "does not optimise pixels")
        raise PrismError(f"{engine_only[0]}: --method {cfg.method} {how}, so it would change nothing; drop it or pick "
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
                           **{f"prior/{p.name}": p.digest() for p in priors}},
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
