"""Text-to-image generators as a distillation method (the seed paper's appendix E, Table 6): the distilled set is one
image per (class, IPC index) drawn by a text-to-image model from a prompt made of the class name.

No optimisation, no teacher, no real image. The model is any local diffusers text-to-image folder that
``AutoPipelineForText2Image`` loads (Stable Diffusion 1.x / 2.x, SDXL, SDXL Turbo, SD 3 / 3.5, FLUX.1): it picks the
pipeline class from the folder's ``model_index.json``, so every family loads the same way.

1. __init__: the pipeline is loaded once, ``local_files_only=True`` (nothing is downloaded); fp16 on CUDA, bf16 for
   FLUX and SD 3 (their cards' ``torch_dtype``), fp32 on CPU; SD 1.x's safety checker is left out. Steps, guidance,
   side and extra arguments come from ``FAMILIES`` (each row from its model card), picked by the loaded pipeline's
   class and, for the few-step distilled models (Turbo, Schnell), the model's name; ``--t2i-steps`` /
   ``--t2i-guidance`` / ``--t2i-size`` override; an unknown pipeline runs with its own ``__call__`` defaults;
2. prepare: the resolved settings and the rule that gave them go to the manifest (and are printed);
3. synthesize: unit (c, k) is ``pipe(prompt=--t2i-prompt.format(name=class name), generator=make_generator(seed,
   "t2i", c, k))`` in calls of ``--t2i-batch`` units (class names made readable: ImageNet's synset folders get their
   category names); the image (``output_type="pt"``, [0, 1] RGB) is centre-cropped to a square when it is not one,
   then resized like D4M's (bicubic, antialiased) to the dataset's resolution and, for greyscale datasets, converted
   by ITU-R 601 luma.

Determinism: every image has its own generator keyed by (seed, class, IPC index), passed as a list so diffusers draws
each image's latents (and an ancestral scheduler's noise) from it alone: no image depends on the batch it falls in,
the resume point or the rank (up to float differences of batched kernels, below 8-bit rounding on CPU).

What the seed does not say (its prompt, steps, guidance, resolution): FIDELITY.md, t2i section.
"""
from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import torch

from ..core.classnames import readable_names
from ..core.config import opt
from ..core.errors import PrismError
from ..core.runtime import make_generator
from .base import Options, PLUGINS, Plugin, options
from .d4m import chunked, load_local, missing_weights, to_dataset
from ..core.log import get_logger

logger = get_logger("recover.t2i")

# Per-family generation defaults, tried in order: a row applies when the loaded pipeline's class is ``pipeline`` and,
# for rows with a ``marker``, the model's name contains it (case-insensitive; a few-step distilled model shares its
# base model's pipeline class). size None: the model's native side (unet/transformer sample_size x VAE factor).
# ``extra``: further keyword arguments of the pipeline call.
FAMILIES: dict[str, dict] = {
    # stabilityai/sdxl-turbo card: `pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`, trained at 512 x 512
    "sdxl-turbo": dict(pipeline="StableDiffusionXLPipeline", marker="turbo", steps=1, guidance=0.0, size=512),
    # stabilityai/stable-diffusion-xl-base-1.0 card: `pipe(prompt=prompt)`, i.e. StableDiffusionXLPipeline.__call__'s
    # 50 steps and guidance 5.0, at the native 1024 x 1024
    "sdxl": dict(pipeline="StableDiffusionXLPipeline", marker=None, steps=50, guidance=5.0, size=1024),
    # stabilityai/stable-diffusion-3.5-large-turbo card: num_inference_steps=4, guidance_scale=0.0, 1024 x 1024
    "sd3-turbo": dict(pipeline="StableDiffusion3Pipeline", marker="turbo", steps=4, guidance=0.0, size=1024),
    # stabilityai/stable-diffusion-3.5-large card: num_inference_steps=28, guidance_scale=3.5, 1024 x 1024
    "sd3": dict(pipeline="StableDiffusion3Pipeline", marker=None, steps=28, guidance=3.5, size=1024),
    # black-forest-labs/FLUX.1-schnell card: guidance_scale=0.0, num_inference_steps=4, max_sequence_length=256 (the
    # most its T5 prompt may hold), 1024 x 1024
    "flux-schnell": dict(pipeline="FluxPipeline", marker="schnell", steps=4, guidance=0.0, size=1024,
                         extra={"max_sequence_length": 256}),
    # black-forest-labs/FLUX.1-dev card: height=1024, width=1024, guidance_scale=3.5, num_inference_steps=50,
    # max_sequence_length=512
    "flux-dev": dict(pipeline="FluxPipeline", marker=None, steps=50, guidance=3.5, size=1024,
                     extra={"max_sequence_length": 512}),
    # stable-diffusion-v1-5/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 cards: `pipe(prompt)`, i.e.
    # StableDiffusionPipeline.__call__'s 50 steps and guidance 7.5, at the native side (64 x 8 = 512, 96 x 8 = 768)
    "sd": dict(pipeline="StableDiffusionPipeline", marker=None, steps=50, guidance=7.5, size=None),
}
UNKNOWN = "pipeline-defaults"  # the rule of a pipeline class no row names: its own __call__ defaults
# CUDA dtype by the pipeline class's prefix: the FLUX.1 and SD 3.5 cards load in bfloat16 (fp16 overflows in their
# T5 text encoder); the others' cards use float16
CUDA_DTYPES = {"Flux": torch.bfloat16, "StableDiffusion3": torch.bfloat16}
# pipelines whose transformer reads 2 x 2 latent patches: their side must be a multiple of twice the VAE factor
PATCHED = ("Flux", "StableDiffusion3")


def model_name(model: str) -> str:
    """The name the Turbo/Schnell markers are looked for in: the folder's (or the Hub id's) last component, or, for a
    folder inside the Hugging Face cache (``models--org--name/snapshots/<hash>``), the cached repository's name."""
    p = Path(model)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--"):].replace("--", "/")
    return p.name


def family_defaults(pipeline: str, name: str) -> tuple[str, dict]:
    """(rule, defaults) for a pipeline class name and a model name: the first ``FAMILIES`` row that applies, or
    (``UNKNOWN``, {}) when no row names the class."""
    for rule, row in FAMILIES.items():
        if row["pipeline"] == pipeline and (row["marker"] is None or row["marker"] in name.lower()):
            return rule, {k: row.get(k) for k in ("steps", "guidance", "size")} | {"extra": dict(row.get("extra", {}))}
    return UNKNOWN, {}


def missing_model(model: str, reason: str) -> PrismError:
    """The one-line error for a t2i run that cannot load its text-to-image model."""
    # a Hub id that is not in the local cache: the download command for that very model
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not Path(model).exists()
    example = model if hub_id else "stabilityai/sdxl-turbo"
    return missing_weights("--t2i-model", model if model else "''", reason, "t2i",
                           "text-to-image weights (SD 1.x/2.x, SDXL, SD 3.5, FLUX)", example)


def load_text2image(model: str, device: torch.device):
    """diffusers' ``AutoPipelineForText2Image`` from a local folder or the local Hugging Face cache (never the
    network), in the dtype its card uses on CUDA and fp32 elsewhere. Any failure: ``missing_model``."""
    if not model:
        raise missing_model(model, "no model given")

    def load():
        from diffusers import AutoPipelineForText2Image

        # model_index.json first (small): the class decides the dtype, and whether there is a safety checker to drop,
        # before gigabytes of weights are read
        with warnings.catch_warnings():
            # diffusers >= 0.3x renamed torch_dtype to dtype (only the old name works in every version the extra
            # allows); huggingface_hub warns of an argument diffusers still passes: advice for them, not for users
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            index = AutoPipelineForText2Image.load_config(model, local_files_only=True)
            name = str(index.get("_class_name", ""))
            dtype = torch.float32
            if device.type == "cuda":
                dtype = next((d for prefix, d in CUDA_DTYPES.items() if name.startswith(prefix)), torch.float16)
            kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            return AutoPipelineForText2Image.from_pretrained(model, local_files_only=True, torch_dtype=dtype, **kwargs)

    pipe = load_local(load, model, "a diffusers text-to-image pipeline", missing_model)
    return pipe.to(device)


def native_side(pipe) -> int | None:
    """The side the model was trained at: its denoiser's sample_size (or the pipeline's default_sample_size) in
    latent pixels times the VAE's downsampling factor; None when the pipeline says neither."""
    factor = getattr(pipe, "vae_scale_factor", None)
    for part in ("unet", "transformer"):
        size = getattr(getattr(getattr(pipe, part, None), "config", None), "sample_size", None)
        if isinstance(size, int) and factor:
            return size * factor
    size = getattr(pipe, "default_sample_size", None)
    return size * factor if isinstance(size, int) and factor else None


def center_square(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, S, S), S = min(H, W): the centre crop (a square image is returned as it is)."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top:top + s, left:left + s]


# ----------------------------------------------------------------------------- the plug-in
@options("t2i", kind="plugin")
class T2IOptions(Options):
    """The text-to-image generator's settings (``--method t2i``)."""

    t2i_model: str = opt("", "t2i: a local diffusers text-to-image folder (SD 1.x/2.x, SDXL, SD 3.5, FLUX: anything "
                             "diffusers' AutoPipelineForText2Image loads), or a model id already in the local Hugging "
                             "Face cache; never downloaded; needs pip install 'prismdd[diffusion]'")
    t2i_prompt: str = opt("a photo of a {name}", "t2i: prompt per image, {name} = the class name")
    t2i_negative_prompt: str = opt("", "t2i: negative prompt (models with classifier-free guidance); '' = none")
    t2i_steps: int | None = opt(None, "t2i: denoising steps; None: the model family's default (few-step Turbo and "
                                      "Schnell models: theirs)", minimum=1)
    t2i_guidance: float | None = opt(None, "t2i: classifier-free guidance scale; None: the model family's default "
                                           "(0 for Turbo and Schnell)", minimum=0.0)
    t2i_size: int | None = opt(None, "t2i: side of the generated image before the resize to --resolution; None: the "
                                     "model family's native side", minimum=8)
    t2i_batch: int = opt(4, "t2i: images per generator call (memory only: every image has its own seed)", minimum=1,
                         hashed=False)

    @staticmethod
    def check(cfg) -> None:
        if "{name}" not in cfg.t2i_prompt:
            raise PrismError(f"--t2i-prompt {cfg.t2i_prompt!r}: must contain {{name}} (the class name)")


@PLUGINS.register("t2i")
class TextToImage(Plugin):
    name = "t2i"
    uses_teachers = False
    engine_optimises = False  # generated from text

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        if cfg.init == "real":  # refused before minutes of model loading; the starts would be recorded as provenance
            raise PrismError("--init real: t2i makes its own images from text; use --init noise (the t2i preset's)")
        self.pipe = load_text2image(cfg.t2i_model, device)  # fails up front, before any image is made
        self.settings = self.resolve()
        self.names = readable_names(info.class_names)  # ImageNet's synset folders -> "tench", "goldfish", ...

    def prompt(self, c: int) -> str:
        return self.cfg.t2i_prompt.format(name=self.names[c])

    def resolve(self) -> dict:
        """The generation settings of this run: the family row, the options' overrides, the pipeline's defaults."""
        cfg, pipe = self.cfg, self.pipe
        pipeline, name = type(pipe).__name__, model_name(cfg.t2i_model)
        rule, row = family_defaults(pipeline, name)
        params = inspect.signature(pipe.__call__).parameters

        def pick(option, key: str, arg: str):  # the option, else the family row, else the pipeline's own default
            p = params.get(arg)
            own = None if p is None or p.default is inspect.Parameter.empty else p.default
            return next((v for v in (option, row.get(key), own) if v is not None), None)

        steps = pick(cfg.t2i_steps, "steps", "num_inference_steps")
        guidance = pick(cfg.t2i_guidance, "guidance", "guidance_scale")
        size = next((v for v in (cfg.t2i_size, row.get("size"), native_side(pipe)) if v is not None), None)
        multiple = (getattr(pipe, "vae_scale_factor", 8) or 8) * (2 if pipeline.startswith(PATCHED) else 1)
        if size is not None and size % multiple:
            raise PrismError(f"--t2i-size {size}: {pipeline} needs a multiple of {multiple} (its native side: "
                             f"{native_side(pipe)})")
        if cfg.t2i_negative_prompt and "negative_prompt" not in params:
            raise PrismError(f"--t2i-negative-prompt {cfg.t2i_negative_prompt!r}: {pipeline} takes no negative "
                             f"prompt; pass --t2i-negative-prompt ''")
        extra = {k: v for k, v in row.get("extra", {}).items() if k in params}
        marker = FAMILIES.get(rule, {}).get("marker")
        why = (f"{pipeline}, name {name!r} contains {marker!r}" if marker else
               pipeline if rule != UNKNOWN else f"{pipeline}: no row, its own defaults")
        return {"rule": rule, "matched": why, "steps": steps, "guidance": guidance, "size": size, "extra": extra,
                "overridden": [k for k in ("steps", "guidance", "size") if getattr(cfg, f"t2i_{k}") is not None]}

    def prepare(self, out: Path, rank: int = 0) -> dict:
        cfg, pipe, s = self.cfg, self.pipe, self.settings
        denoiser = next((m for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None)) if m is not None),
                        None)
        if rank == 0:  # which defaults apply is decided by names: shown, so a renamed folder's surprise is visible
            logger.info(f"[t2i] {cfg.t2i_model}: rule {s['rule']} ({s['matched']}): {s['steps']} steps, guidance "
                        f"{s['guidance']}, {s['size'] or 'default'} px" + (f", {s['extra']}" if s["extra"] else ""))
        return {"model": cfg.t2i_model, "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                "dtype": str(denoiser.dtype if denoiser is not None else pipe.dtype), **s,
                "prompts": [self.prompt(c) for c in range(self.info.num_classes)],
                "negative_prompt": cfg.t2i_negative_prompt}

    def call_kwargs(self) -> dict:
        """The pipeline arguments every call shares (None: left to the pipeline)."""
        s = self.settings
        kwargs = {"num_inference_steps": s["steps"], "guidance_scale": s["guidance"], **s["extra"]}
        if s["size"] is not None:
            kwargs.update(height=s["size"], width=s["size"])
        return {k: v for k, v in kwargs.items() if v is not None}

    @torch.no_grad()
    def generate(self, units: list[tuple[int, int]]) -> torch.Tensor:
        """[0, 1] RGB (B, 3, S, S) images of ``units`` in ONE pipeline call, each from its own generator."""
        neg = self.cfg.t2i_negative_prompt  # passed only when set: not every pipeline takes one (checked in resolve)
        return self.pipe(prompt=[self.prompt(c) for c, _ in units],
                         **({"negative_prompt": [neg] * len(units)} if neg else {}),
                         generator=[make_generator(self.cfg.seed, "t2i", c, k) for c, k in units],
                         output_type="pt", **self.call_kwargs()).images

    def synthesize(self, b, units, x0):
        made = []
        for part in chunked(len(units), self.cfg.t2i_batch):
            made.append(to_dataset(center_square(self.generate(units[part]).float().cpu()), self.info))
        return torch.cat(made), {"t2i_prompts": [self.prompt(c) for c, _ in units],
                                 "t2i_seeds": [[self.cfg.seed, "t2i", c, k] for c, k in units]}
