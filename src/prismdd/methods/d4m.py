"""D4M (Su et al., CVPR 2024): distilled images decoded from k-means prototypes in Stable Diffusion's latent space.

No optimisation and no teacher. As in suduo94/D4M (``distillation/gen_prototype.py``, ``gen_syn_image.py`` and the
two pipelines in ``scripts/``):

1. prepare: every real training image of a class (``d4m_max_images`` of them at most, a seeded random subset) is
   resized to ``d4m_size`` (512 in the reference), mapped to [-1, 1] and encoded by the VAE: one sample of its
   latent Gaussian, times the VAE's scaling factor (the reference's ``StableDiffusionGenLatentsPipeline`` returns
   exactly these ``init_latents``; no noise is added before clustering);
2. per class, scikit-learn's ``MiniBatchKMeans(n_clusters=ipc, random_state=seed, batch_size=km_expand * ipc,
   n_init="auto")`` is fed the flattened latents by ``partial_fit`` in chunks of ``km_expand * ipc`` (a last, shorter
   chunk only if it holds at least ``ipc`` latents); its ``ipc`` centres are the class's prototypes;
3. synthesize: prototype k of class c becomes image k: Stable Diffusion img2img started from the prototype latent
   (noised to ``d4m_strength``, then denoised in ``d4m_steps * d4m_strength`` steps of the model's own scheduler)
   with the class name as prompt, ``d4m_negative_prompt`` and classifier-free guidance ``d4m_guidance``. The
   reference's ``StableDiffusionLatents2ImgPipeline`` is diffusers' img2img pipeline given latents instead of an
   image, which stock ``StableDiffusionImg2ImgPipeline`` accepts unchanged (a 4-channel ``image`` is not encoded);
4. the decoded image is resized (bicubic, antialiased: PIL's default resize) to the dataset's resolution (the
   reference resizes to 224) and, for greyscale datasets, converted with ITU-R 601 luma weights (PIL's "L").

Determinism: the image subset and chunk order of class c come from ``make_generator(seed, "d4m", c)``; the VAE sample
of training image i from ``(seed, "d4m-encode", i)``; the img2img noise of unit (c, k) from ``(seed, "d4m-generate",
c, k)``: no image depends on the batch it falls in, the resume point or the rank. The prototypes are stored in the
recover folder (``d4m_prototypes.safetensors``; header: a digest of the VAE's weights and config, and the settings that
shape them) and a resumed run reuses them instead of encoding and clustering again; other settings, another VAE or
``--force`` recompute them.

The diffusion models come from the optional ``diffusers`` extra (``pip install 'prismdd[diffusion]'``), loaded with
``local_files_only=True``: nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import load_if_header, settings_header
from ..core.config import opt
from ..core.data import class_indices, normalize
from ..core.errors import PrismError
from ..core.io import save_tensors
from ..core.runtime import make_generator, progress
from .base import Options, PLUGINS, Plugin, options

ENCODE_BATCH = 10    # images per VAE forward (the reference's loader batch); results do not depend on it
GENERATE_BATCH = 10  # units per img2img call (memory only: every unit has its own noise generator)
LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> "L"
D4M_PROTOTYPES_FILE = "d4m_prototypes.safetensors"  # in a recover output folder: the per-class k-means centres
D4M_PROTOTYPES_FORMAT = "prismdd-d4m-prototypes/1"


def missing_weights(flag: str, model: str, reason: str, method: str, weights: str, example: str) -> PrismError:
    """The one-line error of a plug-in that cannot load its diffusers model: the option and its value, why, and the
    fix (the extra and a local folder; ``example`` is a Hugging Face id to download where there is internet)."""
    reason = " ".join(str(reason).split())
    return PrismError(f"{flag} {model}: {reason}; {method} needs the diffusion extra (pip install 'prismdd[diffusion]') "
                      f"and {weights} on disk: pass {flag} a local diffusers folder (e.g. made by "
                      f"`hf download {example} --local-dir DIR` where there is internet)")


def missing_model(model: str, reason: str) -> PrismError:
    """The one-line error for a D4M run that cannot load its diffusion model."""
    return missing_weights("--d4m-model", model, reason, "D4M", "Stable Diffusion weights",
                           "stable-diffusion-v1-5/stable-diffusion-v1-5")


NOT_LOCAL = "not a local folder and not in the local Hugging Face cache (nothing is downloaded)"


def load_failure(model: str, what: str, e: Exception) -> str:
    """Why ``from_pretrained(model, local_files_only=True)`` failed, in words: a name that is neither a folder here
    nor in the cache says so (the libraries word it as a failed connection or a missing model_index.json); anything
    else gives the first sentence of the error."""
    if not Path(model).exists():
        return NOT_LOCAL
    detail = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    detail = detail if len(detail) <= 150 else detail[:147] + "..."
    return f"cannot load {what} ({type(e).__name__}: {detail})"


def load_local(load: Callable[[], Any], model: str, what: str, missing: Callable[[str, str], PrismError]):
    """``load()`` (a diffusers ``from_pretrained(..., local_files_only=True)``: never the network) with diffusers'
    advice silenced and its progress bars off. The extra not installed, or any failure of ``load``: ``missing(model,
    reason)``, one line that names ``what`` could not be loaded and the first sentence of why."""
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None:
        raise missing(model, "diffusers/transformers are not installed")
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # no "accelerate not found" advice on every run
        pipe = load()
    except Exception as e:  # OSError, ValueError, huggingface_hub's LocalEntryNotFoundError, ImportError ...
        raise missing(model, load_failure(model, what, e)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str, device: torch.device):
    """diffusers' ``StableDiffusionImg2ImgPipeline`` from a local folder or the local Hugging Face cache (never the
    network); fp16 on CUDA (the reference's ``torch_dtype``), fp32 elsewhere. Any failure: ``missing_model``."""
    def load():
        from diffusers import StableDiffusionImg2ImgPipeline

        return StableDiffusionImg2ImgPipeline.from_pretrained(model, local_files_only=True, safety_checker=None,
                                                              requires_safety_checker=False)

    pipe = load_local(load, model, "a Stable Diffusion img2img pipeline", missing_model)
    return pipe.to(device, torch.float16 if device.type == "cuda" else torch.float32)


# ----------------------------------------------------------------------------- the pieces (tested one by one)
@torch.no_grad()
def encode_images(vae, images: torch.Tensor, size: int, gens: list[torch.Generator]) -> torch.Tensor:
    """uint8 (B, C, H, W) real images -> (B, latent C, size/f, size/f) float32 CPU latents: resize to size x size
    (bilinear, antialiased), grey -> RGB, [0, 1] -> [-1, 1], one sample of the VAE's latent Gaussian per image
    (mean + std * N(0, 1) drawn from that image's generator), times the VAE's scaling factor."""
    p = next(vae.parameters())
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    dist = vae.encode((x * 2 - 1).to(p.device, p.dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens]).to(p.device, p.dtype)
    return ((dist.mean + dist.std * noise) * vae.config.scaling_factor).float().cpu()


def kmeans_prototypes(chunks: Iterable[np.ndarray], ipc: int, km_expand: int, seed: int) -> np.ndarray:
    """The reference's per-class MiniBatchKMeans: ``partial_fit`` on each chunk of flattened latents (chunks of
    ``km_expand * ipc``; a shorter chunk is used only when it holds at least ``ipc``). Returns the (ipc, D) centres."""
    from sklearn.cluster import MiniBatchKMeans  # a core dependency; imported here to keep `import prismdd` light

    km = MiniBatchKMeans(n_clusters=ipc, random_state=seed % 2 ** 32, batch_size=km_expand * ipc, n_init="auto")
    fitted = False
    for chunk in chunks:
        if len(chunk) >= ipc:
            km.partial_fit(chunk)
            fitted = True
    if not fitted:
        raise PrismError(f"d4m: fewer than --ipc {ipc} latents to cluster; lower --ipc or raise --d4m-max-images")
    return km.cluster_centers_


def chunked(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def to_dataset(images: torch.Tensor, info) -> torch.Tensor:
    """[0, 1] RGB (B, 3, S, S) decoded images -> normalised (B, C, R, R) images of the dataset: bicubic antialiased
    resize to its resolution, clamped, greyscale by luma when it has one channel."""
    x = F.interpolate(images.float(), size=(info.resolution, info.resolution), mode="bicubic", align_corners=False,
                      antialias=True).clamp(0, 1)
    if info.channels == 1:
        x = (x * torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return normalize(x * 255.0, info)


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a diffusers (or transformers) model as loaded: every state-dict tensor (name, dtype, shape, bytes) and
    its config (keys starting with "_", such as the folder it was read from, and the library version that wrote it
    left out), so a moved copy has the same digest."""
    h = hashlib.sha256()
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' configs are objects
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the plug-in
@options("d4m", kind="plugin")
class D4MOptions(Options):
    """D4M's settings (``--method d4m``): the prototypes and the img2img diffusion run."""

    d4m_model: str = opt("stable-diffusion-v1-5/stable-diffusion-v1-5", "d4m: a local diffusers Stable Diffusion folder, "
                         "or a model id already in the local Hugging Face cache (never downloaded; needs "
                         "pip install 'prismdd[diffusion]')")
    d4m_size: int = opt(512, "d4m: side the real images are resized to before VAE encoding; the generated images have "
                             "it too before the resize to --resolution (gen_prototype.py --size 512)", minimum=8)
    d4m_max_images: int | None = opt(None, "d4m: real images per class encoded and clustered, a seeded random subset "
                                           "(None: all, the reference)", minimum=1)
    d4m_km_expand: int = opt(1, "d4m: MiniBatchKMeans is fed chunks of km_expand * ipc latents "
                                "(gen_prototype_imgnt.sh --km_expand 1)", minimum=1)
    d4m_strength: float = opt(0.7, "d4m: img2img strength: how far each prototype is noised before denoising "
                                   "(gen_syn_image_imgnt.sh --strength 0.7)", minimum=0.0)
    d4m_guidance: float = opt(8.0, "d4m: classifier-free guidance scale (--guidance_scale 8)", minimum=0.0)
    d4m_steps: int = opt(50, "d4m: scheduler steps for strength 1; strength * steps are run (diffusers' default 50)",
                         minimum=1)
    d4m_prompt: str = opt("{name}", "d4m: prompt per class, {name} = the class name (the reference: the label text)")
    d4m_negative_prompt: str = opt("cartoon, anime, painting", "d4m: negative prompt (gen_syn_image.py); empty = none")

    @staticmethod
    def check(cfg) -> None:
        if cfg.d4m_strength > 1:
            raise PrismError(f"--d4m-strength {cfg.d4m_strength}: expected 0 to 1")
        if "{name}" not in cfg.d4m_prompt:
            raise PrismError(f"--d4m-prompt {cfg.d4m_prompt!r}: must contain {{name}} (the class name)")


@PLUGINS.register("d4m")
class D4M(Plugin):
    name = "d4m"
    engine_optimises = False  # decoded diffusion prototypes
    owned_files = (D4M_PROTOTYPES_FILE,)

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        if cfg.init == "real":  # the engine's starts would be recorded as these images' provenance
            raise PrismError("--init real: d4m starts from its own prototypes; use --init noise (the d4m preset's)")
        self.pipe = load_pipeline(cfg.d4m_model, device)  # fails up front, before any image is encoded
        factor = self.pipe.vae_scale_factor  # checked here: recover --force clears the folder only after this
        if cfg.d4m_size % factor:
            raise PrismError(f"--d4m-size {cfg.d4m_size}: must be a multiple of the VAE's downsampling factor "
                             f"{factor} (reference: 512)")
        self.prototypes: dict[int, torch.Tensor] = {}

    def prompt(self, c: int) -> str:
        return self.cfg.d4m_prompt.format(name=self.info.class_names[c])

    def prepare(self, out: Path, rank: int = 0) -> dict:
        cfg, info, vae = self.cfg, self.info, self.pipe.vae
        settings, digest = self.prototype_settings(), module_digest(vae)
        stored = None if cfg.force else load_prototypes(out, settings, digest)
        if stored is None:
            self.prototypes, used = self.make_prototypes(rank)
            if rank == 0:  # every rank computes the same prototypes (seeded); rank 0 stores them
                save_prototypes(out, {**{f"class_{c:05d}": p for c, p in self.prototypes.items()},
                                      "images_per_class": torch.tensor(used)}, settings, digest)
        else:
            self.prototypes = {c: stored[f"class_{c:05d}"] for c in range(info.num_classes)}
            used = stored["images_per_class"].tolist()
        return {"model": cfg.d4m_model, "pipeline": type(self.pipe).__name__,
                "scheduler": type(self.pipe.scheduler).__name__, "dtype": str(self.pipe.unet.dtype),
                "latent_shape": list(self.prototypes[0].shape[1:]), "images_per_class": used,
                "prompts": [self.prompt(c) for c in range(info.num_classes)],
                "prototypes": {"file": str(Path(out) / D4M_PROTOTYPES_FILE), "computed": stored is None,
                               "vae_digest": digest}}

    def prototype_settings(self) -> dict:
        """What the prototypes depend on besides the VAE (the file header)."""
        cfg, info = self.cfg, self.info
        return {"dataset": info.name, "resolution": info.resolution, "train_images": len(self.train.targets),
                "num_classes": info.num_classes, "model": cfg.d4m_model, "dtype": str(self.pipe.vae.dtype),
                "seed": cfg.seed, "ipc": cfg.ipc, "max_images": cfg.d4m_max_images, "size": cfg.d4m_size,
                "km_expand": cfg.d4m_km_expand, "kmeans": "MiniBatchKMeans(n_init=auto) partial_fit per chunk"}

    def make_prototypes(self, rank: int = 0) -> tuple[dict[int, torch.Tensor], list[int]]:
        """Per class: encode its (seeded subset of) real images, cluster the latents; (class -> (ipc, C, s, s)
        float32 prototypes, images used per class)."""
        cfg, info, vae = self.cfg, self.info, self.pipe.vae
        side = cfg.d4m_size // self.pipe.vae_scale_factor
        prototypes, used = {}, []
        members = class_indices(self.train.targets, info.num_classes)
        for c in progress(range(info.num_classes), desc="d4m prototypes", disable=None if rank == 0 else True):
            gen = make_generator(cfg.seed, "d4m", c)
            taken = members[c][torch.randperm(len(members[c]), generator=gen)][:cfg.d4m_max_images]
            if len(taken) < cfg.ipc:
                raise PrismError(f"--ipc {cfg.ipc}: class {info.class_names[c]!r} gives only {len(taken)} real "
                                 f"images to cluster (--d4m-max-images {cfg.d4m_max_images}); lower --ipc")

            def chunks():
                for part in chunked(len(taken), cfg.d4m_km_expand * cfg.ipc):
                    idx = taken[part]
                    yield torch.cat([encode_images(vae, self.train.get_images(idx[s]), cfg.d4m_size,
                                                   [make_generator(cfg.seed, "d4m-encode", int(i)) for i in idx[s]])
                                     for s in chunked(len(idx), ENCODE_BATCH)]).flatten(1).numpy()

            centres = kmeans_prototypes(chunks(), cfg.ipc, cfg.d4m_km_expand, cfg.seed)
            prototypes[c] = torch.from_numpy(centres).float().view(cfg.ipc, -1, side, side)
            used.append(len(taken))
        return prototypes, used

    @torch.no_grad()
    def synthesize(self, b, units, x0):
        cfg, pipe = self.cfg, self.pipe
        made = []
        for part in chunked(len(units), GENERATE_BATCH):
            sub = units[part]
            latents = torch.stack([self.prototypes[c][k] for c, k in sub]).to(self.device, pipe.unet.dtype)
            images = pipe(prompt=[self.prompt(c) for c, _ in sub], image=latents, strength=cfg.d4m_strength,
                          guidance_scale=cfg.d4m_guidance, num_inference_steps=cfg.d4m_steps,
                          negative_prompt=[cfg.d4m_negative_prompt] * len(sub) if cfg.d4m_negative_prompt else None,
                          generator=[make_generator(cfg.seed, "d4m-generate", c, k) for c, k in sub],
                          output_type="pt").images
            made.append(to_dataset(images.float().cpu(), self.info))
        return torch.cat(made), {"d4m_prompts": [self.prompt(c) for c, _ in units]}


# ----------------------------------------------------------------------------- the stored prototypes


def load_prototypes(out, settings: dict, model_digest: str) -> dict[str, torch.Tensor] | None:
    """A recover folder's stored D4M prototypes when they were made from the same diffusion model (``model_digest``)
    and ``settings``; None otherwise (recompute and overwrite)."""
    return load_if_header(Path(out) / D4M_PROTOTYPES_FILE,
                          settings_header(D4M_PROTOTYPES_FORMAT, settings, model_digest=model_digest))


def save_prototypes(out, tensors: dict[str, torch.Tensor], settings: dict, model_digest: str) -> Path:
    """Write D4M's prototypes atomically into the recover folder (header: format, model digest, settings)."""
    path = Path(out) / D4M_PROTOTYPES_FILE
    save_tensors(tensors, path, metadata=settings_header(D4M_PROTOTYPES_FORMAT, settings, model_digest=model_digest))
    return path
