"""D4M (plug-in ``d4m``): VAE encoding, the reference's MiniBatchKMeans prototype loop, a tiny end-to-end run with a
randomly initialised Stable Diffusion (a few thousand parameters, saved locally: nothing is downloaded), and the
one-line error when the model or the diffusion extra is missing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import MiniBatchKMeans

from prismdd.artifacts import image_path, load_distilled, record_path, save_image
from prismdd.core.data import load_splits
from prismdd.core.errors import PrismError
from prismdd.core.io import tensors_metadata
from prismdd.core.runtime import make_generator
from prismdd.methods import d4m as d4m_module
from prismdd.methods.d4m import D4M, D4M_PROTOTYPES_FILE, chunked, encode_images, kmeans_prototypes, load_pipeline
from prismdd.stages.recover import recover, recover_config
from conftest import TINY_RECOVER
from tiny_models import tiny_sd_parts


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A randomly initialised Stable Diffusion img2img pipeline (VAE downsampling 2, 4 latent channels, a one-layer
    CLIP text encoder), saved with ``save_pretrained`` like a real diffusers folder."""
    from diffusers import StableDiffusionImg2ImgPipeline

    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_parts(root))
    pipe.save_pretrained(root / "model")
    return root / "model"


def _reference_kmeans(latents: np.ndarray, ipc: int, km_expand: int) -> np.ndarray:
    """gen_prototype.py (initialize_km_models + prototype_kmeans + gen_prototype) for one class, literally: latents
    arrive one by one, a partial_fit whenever km_expand * ipc have gathered, the rest fitted if it holds >= ipc."""
    model = MiniBatchKMeans(n_clusters=ipc, random_state=0, batch_size=(km_expand * ipc), n_init="auto")
    pending = []
    for latent in latents:
        pending.append(latent.reshape(1, -1))
        if len(pending) == km_expand * ipc:
            model.partial_fit(np.vstack(pending))
            pending = []
    if len(pending) >= ipc:
        model.partial_fit(np.vstack(pending))
    return model.cluster_centers_


@pytest.mark.parametrize("n, ipc, km_expand", [(23, 3, 2), (20, 3, 2), (7, 4, 3)])
def test_kmeans_prototypes_are_the_reference_minibatch_loop(n, ipc, km_expand):
    latents = np.random.default_rng(n).normal(size=(n, 4, 2, 2)).astype(np.float32)
    flat = latents.reshape(n, -1)
    ours = kmeans_prototypes((flat[s] for s in chunked(n, km_expand * ipc)), ipc, km_expand, seed=0)
    np.testing.assert_array_equal(ours, _reference_kmeans(latents, ipc, km_expand))
    assert ours.shape == (ipc, 16) and len(np.unique(ours.round(5), axis=0)) == ipc


def test_kmeans_needs_ipc_latents():
    with pytest.raises(PrismError, match="--ipc 5"):
        kmeans_prototypes([np.zeros((3, 4), np.float32)], 5, 1, seed=0)


def test_encoding_is_one_sample_of_the_vae_posterior(tiny_sd):
    """The reference (pipeline_stable_diffusion_gen_latents.py prepare_init_latents): image in [-1, 1],
    ``vae.encode(image).latent_dist.sample(generator) * scaling_factor``; here per image with its own generator."""
    pipe = load_pipeline(str(tiny_sd), torch.device("cpu"))
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    ours = encode_images(pipe.vae, images, 16, [make_generator(0, "d4m-encode", i) for i in range(3)])
    assert ours.shape == (3, 4, 8, 8)
    for i in range(3):
        x = torch.nn.functional.interpolate(images[i:i + 1].float().expand(-1, 3, -1, -1) / 255, size=(16, 16),
                                            mode="bilinear", align_corners=False, antialias=True)
        ref = pipe.vae.encode(x * 2 - 1).latent_dist.sample(make_generator(0, "d4m-encode", i))
        torch.testing.assert_close(ours[i:i + 1], ref * pipe.vae.config.scaling_factor)


def test_d4m_end_to_end_with_a_tiny_diffusion_model(tiny_sd, zoo, tmp_path):
    settings = dict(TINY_RECOVER, teachers=str(zoo), out=str(tmp_path / "d4m"), d4m_model=str(tiny_sd), d4m_size=16,
                    d4m_max_images=12, d4m_steps=3)
    out = recover(recover_config("d4m", **settings))
    ds = load_distilled(out)
    assert len(ds) == 20 and ds.images.shape == (20, 1, 8, 8)
    manifest = json.loads((out / "manifest.json").read_text())
    plugin = manifest["inputs"]["plugin"]
    assert plugin["name"] == "d4m" and plugin["model"] == str(tiny_sd)
    assert plugin["latent_shape"] == [4, 8, 8] and plugin["images_per_class"] == [12] * 10
    assert plugin["prompts"][3] == "3" and plugin["scheduler"] == "PNDMScheduler"
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("batch_*.json"))]
    assert all(r["iterations"] == 0 and len(r["d4m_prompts"]) == len(r["units"]) for r in records)
    assert float(ds.images.float().std()) > 0
    # image (3, 1) re-made alone, literally as gen_syn_image.py: img2img from prototype 1 of class 3 with the class
    # name as prompt, then resized to 8 px and made grey; equal to the saved PNG up to its 8-bit rounding (so it did
    # not depend on the other units of its batch, and a second prepare() gives the same prototypes)
    cfg = recover_config("d4m", **settings)
    train, _, info = load_splits(cfg)
    plugin = D4M(cfg, info, train, {}, [], torch.device("cpu"))
    plugin.prepare(tmp_path, 0)
    ref = plugin.pipe(prompt="3", image=plugin.prototypes[3][1:2], strength=0.7, guidance_scale=8.0,
                      negative_prompt="cartoon, anime, painting", num_inference_steps=3,
                      generator=make_generator(0, "d4m-generate", 3, 1), output_type="pt").images
    ref = F.interpolate(ref, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    grey = 0.299 * ref[0, 0] + 0.587 * ref[0, 1] + 0.114 * ref[0, 2]
    saved = ds.images[3 * 2 + 1, 0].float() / 255
    assert (saved - grey).abs().max() <= 0.5 / 255 + 1e-4
    assert (saved - ds.images[3 * 2, 0].float() / 255).abs().max() > 0  # prototypes 0 and 1 differ


def test_missing_model_fails_up_front_in_one_line(zoo, tmp_path):
    out = tmp_path / "d4m"
    cfg = recover_config("d4m", **dict(TINY_RECOVER, teachers=str(zoo), out=str(out), d4m_model=str(tmp_path / "nope")))
    with pytest.raises(PrismError) as err:
        recover(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--d4m-model {tmp_path / 'nope'}:")
    assert "pip install 'prismdd[diffusion]'" in message and "local diffusers folder" in message
    assert not (out / "images").exists() and not (out / "records").exists()


def test_missing_extra_names_the_extra(monkeypatch):
    real = d4m_module.importlib.util.find_spec
    monkeypatch.setattr(d4m_module.importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(PrismError, match=r"--d4m-model m: diffusers/transformers are not installed; .*prismdd\[diffusion\]"):
        load_pipeline("m", torch.device("cpu"))


def test_d4m_prototypes_are_stored_and_reused_on_resume(tiny_sd, zoo, tmp_path, monkeypatch):
    """The per-class prototypes go to the recover folder (safetensors, header: VAE digest + settings); a resumed run
    neither encodes nor clusters again and redoes a batch with the same images (floats, bit for bit); another setting,
    another VAE or --force recompute them."""
    import prismdd.stages.recover as R

    calls = {"encode": 0, "kmeans": 0}
    real_encode, real_kmeans = d4m_module.encode_images, d4m_module.kmeans_prototypes

    def encode(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    def kmeans(*args, **kwargs):
        calls["kmeans"] += 1
        return real_kmeans(*args, **kwargs)

    made = {}

    def keep(path, x, info):
        made.setdefault(path.name, []).append(x.detach().clone())
        return save_image(path, x, info)

    monkeypatch.setattr(d4m_module, "encode_images", encode)
    monkeypatch.setattr(d4m_module, "kmeans_prototypes", kmeans)
    monkeypatch.setattr(R, "save_image", keep)
    out = tmp_path / "d4m"
    settings = dict(TINY_RECOVER, teachers=str(zoo), out=str(out), d4m_model=str(tiny_sd), d4m_size=16,
                    d4m_max_images=12, d4m_steps=3)
    recover(recover_config("d4m", **settings))
    path = out / D4M_PROTOTYPES_FILE
    header = tensors_metadata(path)
    assert json.loads(header["ipc"]) == 2 and json.loads(header["max_images"]) == 12 and json.loads(header["seed"]) == 0
    assert json.loads(header["km_expand"]) == 1 and len(header["model_digest"]) == 64
    assert json.loads((out / "manifest.json").read_text())["inputs"]["plugin"]["prototypes"]["computed"]
    first = dict(calls)
    assert first["kmeans"] == 10 and first["encode"] >= 10

    record = json.loads(record_path(out, 1).read_text())  # resume: batch 1 redone
    record_path(out, 1).unlink()
    for c, k in record["units"]:
        image_path(out, c, k).unlink()
    recover(recover_config("d4m", **settings))
    assert calls == first  # no encoding, no k-means
    manifest = json.loads((out / "manifest.json").read_text())["inputs"]["plugin"]
    assert not manifest["prototypes"]["computed"] and manifest["images_per_class"] == [12] * 10
    redone = [image_path(out, c, k).name for c, k in record["units"]]
    assert all(len(made[n]) == 2 and torch.equal(made[n][0], made[n][1]) for n in redone)

    # each against a copy of the stored file: the same settings reuse it; another setting, another VAE or --force
    # compute again
    cfg = recover_config("d4m", **settings)
    train, _, info = load_splits(cfg)
    checks = [(dict(), False, False), (dict(d4m_max_images=10), False, True), (dict(d4m_km_expand=2), False, True),
              (dict(force=True), False, True), (dict(), True, True)]
    for i, (over, other_vae, recomputed) in enumerate(checks):
        folder = tmp_path / f"check{i}"
        folder.mkdir()
        shutil.copy(path, folder / D4M_PROTOTYPES_FILE)
        plugin = D4M(recover_config("d4m", **{**settings, **over}), info, train, {}, [], torch.device("cpu"))
        if other_vae:
            with torch.no_grad():
                next(plugin.pipe.vae.parameters()).add_(1e-3)
        before = calls["kmeans"]
        assert plugin.prepare(folder, 0)["prototypes"]["computed"] == recomputed
        assert calls["kmeans"] == before + (10 if recomputed else 0)
