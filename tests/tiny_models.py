"""Builders of tiny, randomly initialised model parts shared by tests (imported as ``from tiny_models import ...``;
this folder is on ``sys.path`` because ``tests/conftest.py`` lives here). Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_clip_tokenizer(folder: Path):
    """A CLIP tokenizer with a character vocabulary (no BPE merges: one token per character, lower-case letters,
    digits and ``-/, ``), files written into ``folder``. Returns (tokenizer, vocab size); 16 tokens at most, so a
    text encoder built for it needs ``max_position_embeddings=16``, ``bos_token_id=0``, ``eos_token_id=1``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789-/, ":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(vocab)


def tiny_text_encoder(vocab_size: int, projection: bool = False):
    """A one-layer CLIP text encoder (hidden 16) for ``tiny_clip_tokenizer``'s vocabulary; ``projection``: SDXL's
    second encoder, which also returns a pooled projection (16)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=16)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_sd_parts(folder: Path) -> dict:
    """The keyword arguments of a randomly initialised Stable Diffusion pipeline (text-to-image or img2img): VAE
    downsampling 2 (4 latent channels; native side 8 x 2 = 16 px), a 2-level UNet, a one-layer CLIP text encoder, the
    character tokenizer (files in ``folder``), PNDM, no safety checker. Seeded, so two calls build the same model."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    tokenizer, vocab_size = tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    return dict(vae=vae, text_encoder=tiny_text_encoder(vocab_size), tokenizer=tokenizer, unet=unet,
                scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


CLIP_MEAN, CLIP_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # a preprocessor config of its own, so its use is visible


def save_tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP (one-layer towers, 16 px images in 4 px patches, 8-d embeddings) saved like a
    transformers folder, with the character tokenizer and a preprocessor config holding ``CLIP_MEAN``/``CLIP_STD``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=8))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), size={"shortest_edge": 16},
                       crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def save_tiny_sd(folder: Path) -> Path:
    """``tiny_sd_parts`` as a saved text-to-image ``StableDiffusionPipeline`` folder (no Turbo marker in its name)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline(**tiny_sd_parts(folder)).save_pretrained(folder / "tiny-sd")
    return folder / "tiny-sd"
