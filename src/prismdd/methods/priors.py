"""Extra loss terms any recovery method can add, beside its own (seed appendix D).

The CLIP prior (``--clip-prior MODEL``): for every augmented view the teachers see, the cosine between its CLIP image
embedding and the CLIP text embedding of its class's prompt (``--clip-prompt``, "a photo of a {name}"), added to the
loss as ``clip_weight * (1 - cosine)`` averaged over the views. The seed's appendix D adds "semantic priors derived
from CLIP embeddings" to SRe2L (seed Table 5, "+ CLIP"); DAS (Fort & Whitaker 2025) steers images by the same cosine.

CLIP comes from transformers (``pip install 'prismdd[clip]'``), loaded with ``local_files_only=True``: a local folder
or a model id already in the Hugging Face cache; nothing is downloaded. A missing extra or missing weights fail in one
line before any batch. The view is taken back to [0, 1] pixels, made RGB (greyscale repeated), resized bicubically to
CLIP's input side and normalised with CLIP's own mean and std (its image-processor config, else OpenAI CLIP's), all
differentiably, so the gradient reaches the synthetic pixels.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..core.classnames import SYNSET, readable_names
from ..core.config import opt
from ..core.data import denormalize
from ..core.log import say_once
from ..core.errors import PrismError
from .base import Options, options
from .d4m import load_failure, module_digest  # the same words and digest as the diffusers plug-ins

# OpenAI CLIP's preprocessing statistics (used when the model folder has no image-processor config)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@options("clip", kind="prior")
class ClipOptions(Options):
    """The CLIP prior's settings (``--clip-prior MODEL``; any optimising method)."""

    clip_prior: str = opt("", "a CLIP model (a local transformers folder, or a model id already in the local Hugging Face "
                              "cache; never downloaded; pip install 'prismdd[clip]'): adds clip_weight * (1 - cosine) "
                              "between the CLIP embedding of every view and the text embedding of --clip-prompt for its "
                              "class; '' = off")
    clip_weight: float = opt(1.0, "weight of the CLIP prior", minimum=0.0)
    clip_prompt: str = opt("a photo of a {name}", "CLIP prior: the text per class, {name} = the class name (ImageFolder "
                                                  "folder names; ImageNet synset folders get their WordNet names)")

    @staticmethod
    def in_use(cfg) -> str | None:
        return f"--clip-prior {cfg.clip_prior}" if cfg.clip_prior else None

    @staticmethod
    def check(cfg) -> None:
        if "{name}" not in cfg.clip_prompt:
            raise PrismError(f"--clip-prompt {cfg.clip_prompt!r}: must contain {{name}} (the class name)")
        if not cfg.clip_prior and cfg.clip_weight != 1.0:
            raise PrismError(f"--clip-weight {cfg.clip_weight}: weighs the CLIP prior, and no --clip-prior is given; "
                             f"drop it or add --clip-prior MODEL")


def missing_clip(model: str, reason: str) -> PrismError:
    reason = " ".join(str(reason).split())
    return PrismError(f"--clip-prior {model}: {reason}; the CLIP prior needs transformers (pip install "
                      f"'prismdd[clip]') and CLIP weights on disk: pass a local folder (e.g. made by `hf download "
                      f"openai/clip-vit-base-patch32 --local-dir DIR` where there is internet), or --clip-prior '' for none")


def load_clip(model: str, device: torch.device):
    """(CLIPModel, tokenizer, mean, std, side) from a local folder or the local cache; any failure: ``missing_clip``."""
    if importlib.util.find_spec("transformers") is None:
        raise missing_clip(model, "transformers is not installed")
    try:
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        clip = CLIPModel.from_pretrained(model, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as e:  # OSError, ValueError, huggingface_hub's LocalEntryNotFoundError, ImportError ...
        raise missing_clip(model, load_failure(model, "a CLIP model", e)) from None
    mean, std = CLIP_MEAN, CLIP_STD
    try:  # the model's own preprocessing statistics where its folder has them
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(model, local_files_only=True)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:  # no preprocessor_config.json: OpenAI CLIP's statistics, said in the manifest
        pass
    clip = clip.to(device).eval().requires_grad_(False)
    return clip, tokenizer, mean, std, int(clip.config.vision_config.image_size)


def _embedding(out) -> torch.Tensor:
    """transformers 4 returns the projected embedding; 5 returns an output whose pooler_output is it."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipPrior:
    """``weight * (1 - cos(CLIP(view), CLIP(prompt of its class)))``, averaged over the views."""

    name = "clip"

    def __init__(self, cfg, info, device: torch.device):
        self.cfg, self.info, self.weight = cfg, info, cfg.clip_weight
        self._digest: str | None = None
        self.model, tokenizer, mean, std, self.side = load_clip(cfg.clip_prior, device)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.stats = "model" if (mean, std) != (CLIP_MEAN, CLIP_STD) else "openai"
        names = readable_names(info.class_names)
        unknown = [n for n in names if SYNSET.match(n)]
        if unknown:
            say_once(("clip-synsets", info.name), f"[recover] note: {len(unknown)} synset folder names are not "
                                                  f"ImageNet-1K classes (e.g. {unknown[0]}); their prompts use the id",
                     logger="recover.clip")
        self.prompts = [cfg.clip_prompt.format(name=n) for n in names]
        tokens = tokenizer(self.prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.no_grad():
            self.text = F.normalize(_embedding(self.model.get_text_features(**tokens)).float(), dim=-1)

    def image_embedding(self, xa: torch.Tensor) -> torch.Tensor:
        """Unit CLIP embeddings of normalised dataset views (B, C, R, R), differentiable."""
        u = denormalize(xa.float(), self.info).clamp(0, 1)
        if u.shape[1] == 1:
            u = u.expand(-1, 3, -1, -1)
        if u.shape[-1] != self.side:
            u = F.interpolate(u, size=(self.side, self.side), mode="bicubic", align_corners=False)
        return F.normalize(_embedding(self.model.get_image_features(pixel_values=(u - self.mean) / self.std)).float(),
                           dim=-1)

    def __call__(self, xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = (self.image_embedding(xa) * self.text[y]).sum(-1)
        return self.weight * (1 - cos).mean()

    def digest(self) -> str:
        """sha256 of the CLIP weights and config as loaded (a resume with weights replaced in place is refused)."""
        if self._digest is None:
            self._digest = module_digest(self.model)
        return self._digest

    def describe(self) -> dict:
        return {"model": self.cfg.clip_prior, "weight": self.weight, "input_side": self.side,
                "normalisation": self.stats, "prompts": self.prompts, "sha256": self.digest()}


def make_priors(cfg, info, device) -> list:
    """The extra loss terms this run's settings ask for (each loads its model now, so a missing one fails early)."""
    return [ClipPrior(cfg, info, device)] if cfg.clip_prior else []
