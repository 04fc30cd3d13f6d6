"""Text-to-image generators as a method (plug-in ``t2i``, seed appendix E): the per-family defaults, a tiny end-to-end
run with a randomly initialised Stable Diffusion (saved locally: nothing is downloaded) and its per-image seeds, resume
and --force, a tiny SDXL Turbo loaded by the same auto pipeline, the one-line error when the model or the diffusion
extra is missing, and the seed Table 6 configs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prismdd.artifacts import image_path, load_distilled, record_path
from prismdd.core.config import build_config, load_yaml
from prismdd.core.data import load_splits
from prismdd.core.errors import PrismError
from prismdd.core.runtime import make_generator
from prismdd.methods.t2i import FAMILIES, UNKNOWN, TextToImage, family_defaults, load_text2image, model_name
from prismdd.stages.recover import RecoverConfig, recover, recover_config
from conftest import TINY_RECOVER
from tiny_models import save_tiny_sd, tiny_clip_tokenizer, tiny_text_encoder

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "seed-table6"
# t2i uses no teacher: the tiny runs need none (no --teachers); 2 denoising steps keep them fast
SETTINGS = dict(TINY_RECOVER, t2i_steps=2)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A randomly initialised Stable Diffusion text-to-image pipeline (VAE downsampling 2, native side 8 x 2 = 16 px,
    a one-layer CLIP text encoder), saved with ``save_pretrained``; its folder name marks no Turbo model."""
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def tiny_sdxl_turbo(tmp_path_factory):
    """A randomly initialised SDXL pipeline (two CLIP text encoders, the second with a projection; VAE downsampling 8,
    so the Turbo card's 512 px are 64 x 64 latents) with SDXL Turbo's scheduler (Euler ancestral, trailing
    timesteps), in a folder named like a Turbo model."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer, vocab_size = tiny_clip_tokenizer(root)
    torch.manual_seed(0)
    # cross attention reads both encoders' hidden states side by side (16 + 16); the added time embedding reads the
    # pooled projection (16) and the 6 size/crop numbers (4 each)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=2, sample_size=512)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_text_encoder(vocab_size), tokenizer=tokenizer,
                                     text_encoder_2=tiny_text_encoder(vocab_size, projection=True), tokenizer_2=tokenizer,
                                     unet=unet, scheduler=scheduler)
    pipe.save_pretrained(root / "tiny-sdxl-turbo")
    return root / "tiny-sdxl-turbo"


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").glob("*/*.png"))}


# ----------------------------------------------------------------------------- the family table
@pytest.mark.parametrize("pipeline, name, rule, steps, guidance, size, extra", [
    ("StableDiffusionPipeline", "stable-diffusion-v1-5", "sd", 50, 7.5, None, {}),
    ("StableDiffusionPipeline", "stable-diffusion-2-1", "sd", 50, 7.5, None, {}),
    ("StableDiffusionXLPipeline", "stable-diffusion-xl-base-1.0", "sdxl", 50, 5.0, 1024, {}),
    ("StableDiffusionXLPipeline", "SDXL-Turbo", "sdxl-turbo", 1, 0.0, 512, {}),
    ("StableDiffusion3Pipeline", "stable-diffusion-3.5-large", "sd3", 28, 3.5, 1024, {}),
    ("StableDiffusion3Pipeline", "stable-diffusion-3.5-large-turbo", "sd3-turbo", 4, 0.0, 1024, {}),
    ("FluxPipeline", "FLUX.1-schnell", "flux-schnell", 4, 0.0, 1024, {"max_sequence_length": 256}),
    ("FluxPipeline", "FLUX.1-dev", "flux-dev", 50, 3.5, 1024, {"max_sequence_length": 512}),
    ("StableDiffusionPipeline", "sd-turbo", "sd", 50, 7.5, None, {}),  # no SD 1.x/2.x Turbo row: the base row
])
def test_family_defaults_follow_the_pipeline_class_and_the_name(pipeline, name, rule, steps, guidance, size, extra):
    assert family_defaults(pipeline, name) == (rule, dict(steps=steps, guidance=guidance, size=size, extra=extra))
    assert FAMILIES[rule]["pipeline"] == pipeline


def test_unknown_pipelines_and_model_names():
    assert family_defaults("PixArtAlphaPipeline", "pixart-turbo") == (UNKNOWN, {})
    assert model_name("stabilityai/sdxl-turbo") == "sdxl-turbo"
    assert model_name("/weights/turbo-runs/sdxl-base") == "sdxl-base"  # a parent folder's name does not count
    assert model_name("/c/hub/models--stabilityai--sdxl-turbo/snapshots/0123abc") == "stabilityai/sdxl-turbo"


# ----------------------------------------------------------------------------- end to end
def test_t2i_end_to_end_resume_and_force(tiny_sd, tmp_path, monkeypatch):
    calls = []
    real_generate = TextToImage.generate

    def generate(self, units):  # one pipeline call per invocation
        calls.append(list(units))
        return real_generate(self, units)

    monkeypatch.setattr(TextToImage, "generate", generate)
    out = tmp_path / "t2i"
    settings = dict(SETTINGS, out=str(out), t2i_model=str(tiny_sd))
    recover(recover_config("t2i", **settings))
    assert [len(c) for c in calls] == [4, 4, 4, 4, 4]  # batches of 8, 8, 4 in calls of --t2i-batch 4
    ds = load_distilled(out)
    assert len(ds) == 20 and ds.images.shape == (20, 1, 8, 8) and float(ds.images.float().std()) > 0
    assert sorted((out / "images").glob("*/*.png")) == sorted(image_path(out, c, k) for c in range(10)
                                                              for k in range(2))
    plugin = json.loads((out / "manifest.json").read_text())["inputs"]["plugin"]
    assert plugin["name"] == "t2i" and plugin["model"] == str(tiny_sd)
    assert plugin["pipeline"] == "StableDiffusionPipeline" and plugin["scheduler"] == "PNDMScheduler"
    assert (plugin["rule"], plugin["steps"], plugin["guidance"], plugin["size"]) == ("sd", 2, 7.5, 16)
    assert plugin["overridden"] == ["steps"] and plugin["dtype"] == "torch.float32"
    assert plugin["prompts"][3] == "a photo of a 3" and plugin["negative_prompt"] == ""
    records = {b: json.loads(record_path(out, b).read_text()) for b in range(3)}
    for r in records.values():
        assert r["iterations"] == 0 and r["bn_set"] == []
        assert r["t2i_prompts"] == [f"a photo of a {c}" for c, _ in r["units"]]
        assert r["t2i_seeds"] == [[0, "t2i", c, k] for c, k in r["units"]]

    # image (3, 1) re-made alone, literally: the pipeline with its prompt and generator, resized to 8 px, made grey;
    # equal to the saved PNG up to its 8-bit rounding (so it did not depend on the images of its batch)
    cfg = recover_config("t2i", **settings)
    train, _, info = load_splits(cfg)
    pipe = TextToImage(cfg, info, train, {}, [], torch.device("cpu")).pipe
    ref = pipe(prompt="a photo of a 3", num_inference_steps=2, guidance_scale=7.5, height=16, width=16,
               generator=make_generator(0, "t2i", 3, 1), output_type="pt").images
    ref = F.interpolate(ref, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    grey = 0.299 * ref[0, 0] + 0.587 * ref[0, 1] + 0.114 * ref[0, 2]
    saved = ds.images[3 * 2 + 1, 0].float() / 255
    assert (saved - grey).abs().max() <= 0.5 / 255 + 1e-4
    assert (saved - ds.images[3 * 2, 0].float() / 255).abs().max() > 0  # images 0 and 1 of a class differ

    # resume: batch 1 (units 8-15) lost its record and images; only it is made again, byte for byte the same
    first = _pngs(out)
    for c, k in records[1]["units"]:
        image_path(out, c, k).unlink()
    record_path(out, 1).unlink()
    calls.clear()
    recover(recover_config("t2i", **settings))
    assert sorted(u for c in calls for u in map(tuple, c)) == sorted(map(tuple, records[1]["units"]))
    assert _pngs(out) == first

    # --force with another --t2i-batch (memory only, not hashed): every image made again, the same bytes
    calls.clear()
    recover(recover_config("t2i", **dict(settings, force=True, t2i_batch=3)))
    assert sum(map(len, calls)) == 20 and max(map(len, calls)) == 3
    assert _pngs(out) == first


def test_sdxl_turbo_loads_through_the_same_auto_pipeline(tiny_sdxl_turbo, tmp_path):
    """Another family, and the Turbo card's defaults (1 step, no guidance, 512 px) picked by the folder's name."""
    out = recover(recover_config("t2i", **dict(TINY_RECOVER, ipc=1, out=str(tmp_path / "xl"),
                                                t2i_model=str(tiny_sdxl_turbo))))
    assert load_distilled(out).images.shape == (10, 1, 8, 8)
    plugin = json.loads((out / "manifest.json").read_text())["inputs"]["plugin"]
    assert plugin["pipeline"] == "StableDiffusionXLPipeline"
    assert plugin["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert (plugin["rule"], plugin["steps"], plugin["guidance"], plugin["size"]) == ("sdxl-turbo", 1, 0.0, 512)
    assert "contains 'turbo'" in plugin["matched"] and plugin["overridden"] == []


def test_bad_settings_are_refused_before_any_image(tiny_sd, tmp_path):
    cfg = recover_config("t2i", **dict(SETTINGS, out=str(tmp_path / "o"), t2i_model=str(tiny_sd), t2i_size=17))
    train, _, info = load_splits(cfg)
    with pytest.raises(PrismError, match=r"^--t2i-size 17: StableDiffusionPipeline needs a multiple of 2"):
        TextToImage(cfg, info, train, {}, [], torch.device("cpu"))
    with pytest.raises(PrismError, match=r"^--init real: t2i makes its own images"):
        recover(recover_config("t2i", **dict(SETTINGS, out=str(tmp_path / "o"), t2i_model=str(tiny_sd), init="real")))
    with pytest.raises(PrismError, match=r"^--param multires: --method t2i does not optimise pixels"):
        recover(recover_config("t2i", **dict(SETTINGS, out=str(tmp_path / "o"), t2i_model=str(tiny_sd),
                                             param="multires")))
    assert not (tmp_path / "o" / "images").exists() and not (tmp_path / "o" / "records").exists()


# ----------------------------------------------------------------------------- missing weights
@pytest.mark.parametrize("model, reason", [
    ("nope", "not a local folder and not in the local Hugging Face cache (nothing is downloaded)"),
    ("empty", "cannot load a diffusers text-to-image pipeline"),  # a folder that holds no model
    ("", "no model given")])
def test_missing_model_fails_up_front_in_one_line(model, reason, tmp_path):
    out = tmp_path / "t2i"
    value = str(tmp_path / model) if model else ""
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrismError) as err:
        recover(recover_config("t2i", **dict(SETTINGS, out=str(out), t2i_model=value)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--t2i-model {value or repr('')}: {reason}")
    assert "pip install 'prismdd[diffusion]'" in message and "local diffusers folder" in message
    assert "hf download" in message
    assert not (out / "images").exists() and not (out / "records").exists()


def test_missing_extra_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(PrismError, match=r"^--t2i-model m: diffusers/transformers are not installed; .*"
                                         r"prismdd\[diffusion\]"):
        load_text2image("m", torch.device("cpu"))


# ----------------------------------------------------------------------------- seed Table 6 configs
# file -> (the pipeline class its model's model_index.json names, the FAMILIES rule it must get)
TABLE6 = {"sd-1.yaml": ("StableDiffusionPipeline", "sd"), "sd-2.1.yaml": ("StableDiffusionPipeline", "sd"),
          "sdxl.yaml": ("StableDiffusionXLPipeline", "sdxl"),
          "sdxl-turbo.yaml": ("StableDiffusionXLPipeline", "sdxl-turbo"),
          "sd-3.5-turbo.yaml": ("StableDiffusion3Pipeline", "sd3-turbo"),
          "flux-schnell.yaml": ("FluxPipeline", "flux-schnell")}


@pytest.mark.parametrize("name", sorted(TABLE6))
def test_seed_table6_configs_load_and_get_their_family(name):
    cfg = build_config(RecoverConfig, load_yaml(CONFIGS / name))
    assert cfg.method == "t2i" and cfg.plugin == "t2i" and cfg.dataset == "imagefolder" and cfg.resolution == 224
    assert cfg.t2i_model and cfg.ipc == 1200  # seed Table 6: "IPC ~ 1200"
    pipeline, rule = TABLE6[name]
    assert family_defaults(pipeline, model_name(cfg.t2i_model))[0] == rule
    assert "prismdd recover --config configs/seed-table6/" + name in (CONFIGS / name).read_text()
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(TABLE6)


@pytest.mark.slow
def test_torchrun_two_ranks_make_the_single_process_images(tiny_sd, tmp_path):
    """torchrun shards t2i's batches as recover shards any method's: two ranks write the images one process writes."""
    from conftest import run_torchrun

    single = recover(recover_config("t2i", **dict(SETTINGS, out=str(tmp_path / "one"), t2i_model=str(tiny_sd))))
    out = tmp_path / "ddp"
    run_torchrun(["recover", "--method", "t2i", "--dataset", "digits", "--t2i-model", tiny_sd, "--t2i-steps", "2",
                  "--ipc", "2", "--batch-size", "8", "--device", "cpu", "--seed", "0", "--out", out])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["outputs"]["num_images"] == 20
    a, b = load_distilled(single), load_distilled(out)
    assert torch.equal(a.targets, b.targets)
    assert (a.images.int() - b.images.int()).abs().max() <= 1  # per-image seeds; batched kernels: 8-bit rounding
