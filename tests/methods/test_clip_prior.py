"""The CLIP prior (--clip-prior): a tiny randomly initialised CLIP saved like a real transformers folder (nothing is
downloaded). The term is weight * (1 - cos(image embedding of the view, text embedding of its class prompt)); a step
against its gradient raises that cosine; it joins the engine's total with any method; missing weights or a missing
extra fail in one line before any work; synset folders are prompted by their ImageNet names."""
from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F

from prismdd.core.classnames import readable_names
from prismdd.core.data import denormalize, load_dataset, normalize
from prismdd.core.errors import PrismError
from prismdd.methods import priors as priors_module
from prismdd.methods.engine import Engine
from prismdd.methods.priors import ClipPrior, load_clip, make_priors
from prismdd.stages.recover import load_teachers, recover_config
from tiny_models import CLIP_MEAN, CLIP_STD, save_tiny_clip

MEAN, STD = CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "model")


@pytest.fixture(scope="module")
def digits_info():
    return load_dataset("digits")[2]


def _prior(tiny_clip, info, **kw):
    cfg = recover_config("sre2l", dataset="digits", clip_prior=str(tiny_clip), clip_prompt="a {name}", **kw)
    return ClipPrior(cfg, info, torch.device("cpu"))


def test_term_is_weighted_one_minus_cosine_as_written_out(tiny_clip, digits_info):
    prior = _prior(tiny_clip, digits_info, clip_weight=2.5)
    assert prior.prompts[:3] == ["a 0", "a 1", "a 2"] and prior.side == 16
    x = normalize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), digits_info)
    y = torch.tensor([0, 3, 3, 9])
    # by hand: transformers' own CLIP forward on the preprocessed images and the tokenised prompts
    model, tok, mean, std, side = load_clip(str(tiny_clip), torch.device("cpu"))
    assert (mean, std) == (MEAN, STD)
    u = F.interpolate(denormalize(x, digits_info).clamp(0, 1).expand(-1, 3, -1, -1), size=(16, 16), mode="bicubic",
                      align_corners=False)
    tokens = tok([f"a {c}" for c in range(10)], padding=True, return_tensors="pt")
    out = model(pixel_values=(u - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), **tokens)
    cos = (out.image_embeds[:, None] * out.text_embeds[None]).sum(-1)  # both unit length (CLIP's own heads)
    expected = 2.5 * (1 - cos[torch.arange(4), y]).mean()
    torch.testing.assert_close(prior(x, y), expected)


def test_a_step_against_its_gradient_raises_the_cosine_to_the_class_prompt(tiny_clip, digits_info):
    prior = _prior(tiny_clip, digits_info)
    gen = torch.Generator().manual_seed(0)
    x = normalize(torch.randint(64, 192, (6, 1, 8, 8), dtype=torch.uint8, generator=gen), digits_info)
    y = torch.arange(6)
    x.requires_grad_(True)
    loss = prior(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().sum() > 0
    with torch.no_grad():
        before = (prior.image_embedding(x) * prior.text[y]).sum(-1)
        after = (prior.image_embedding(x - 0.05 * g / g.abs().max()) * prior.text[y]).sum(-1)
    assert (after > before).all()  # every image moved towards its own class's text
    # and the cosine to the class prompt, not to any text: the gradient for class 0's prompt differs
    (g0,) = torch.autograd.grad(prior(x, torch.zeros_like(y)), x)
    assert (g0 - g).abs().max() > 0


def test_the_engine_adds_it_to_any_method_total(tiny_clip, digits_info, zoo):
    cfg = recover_config("sre2l", dataset="digits", teachers=str(zoo), device="cpu", clip_prior=str(tiny_clip),
                         clip_prompt="a {name}", clip_weight=3.0)
    primary, teachers, _ = load_teachers(cfg, digits_info, torch.device("cpu"))
    priors = make_priors(cfg, digits_info, torch.device("cpu"))
    x = normalize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), digits_info)
    y = torch.tensor([1, 2, 3, 4])
    with ExitStack() as stack:
        with_prior = Engine(cfg, digits_info, primary, teachers, torch.device("cpu"), stack, priors=priors)
        plain = Engine(cfg, digits_info, primary, teachers, torch.device("cpu"), stack)
        a = with_prior.losses(x, y, cfg.primary, [cfg.primary], None)
        b = plain.losses(x, y, cfg.primary, [cfg.primary], None)
    torch.testing.assert_close(a["total"], b["total"] + priors[0](x, y))
    assert "clip" in a and "clip" not in b


def test_recover_with_sre2l_and_the_prior_records_it(recover_run, tiny_clip, tmp_path):
    out = recover_run(tmp_path / "c", "sre2l", clip_prior=str(tiny_clip), clip_prompt="a {name}", iterations=3)
    manifest = json.loads((out / "manifest.json").read_text())
    prior = manifest["inputs"]["priors"]["clip"]
    assert prior["model"] == str(tiny_clip) and prior["prompts"][7] == "a 7" and prior["normalisation"] == "model"
    record = json.loads((out / "records" / "batch_00000.json").read_text())
    assert "clip" in record["final_losses"] and 0 <= record["final_losses"]["clip"] <= 2


def test_missing_weights_fail_in_one_line_before_any_work(recover_run, tmp_path):
    out = tmp_path / "nope-run"
    with pytest.raises(PrismError) as err:
        recover_run(out, "sre2l", clip_prior=str(tmp_path / "nope"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--clip-prior {tmp_path / 'nope'}:")
    assert "pip install 'prismdd[clip]'" in message and "hf download" in message
    assert not (out / "images").exists() and not (out / "records").exists()


def test_missing_extra_names_the_extra(monkeypatch):
    real = priors_module.importlib.util.find_spec
    monkeypatch.setattr(priors_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(PrismError, match=r"--clip-prior m: transformers is not installed; .*prismdd\[clip\]"):
        load_clip("m", torch.device("cpu"))


def test_prompt_needs_the_name():
    with pytest.raises(PrismError, match="--clip-prompt 'a photo': must contain"):
        recover_config("sre2l", clip_prompt="a photo")


def test_synset_folders_read_as_imagenet_names():
    assert readable_names(["n01440764", "n02099601", "golden_retriever", "T-shirt/top"]) == [
        "tench", "golden retriever", "golden retriever", "T-shirt/top"]
    assert readable_names(["n99999999"]) == ["n99999999"]  # not an ImageNet-1K class: the id is kept (said once)


def test_a_hub_id_not_in_the_cache_is_said_so():
    with pytest.raises(PrismError, match=r"^--clip-prior nobody/no-such-clip: not a local folder and not in the local "
                                         r"Hugging Face cache \(nothing is downloaded\)"):
        load_clip("nobody/no-such-clip", torch.device("cpu"))


def test_resume_with_clip_weights_replaced_in_place_is_refused(recover_run, tmp_path):
    """The CLIP weights are an input like the teachers: their digest is in inputs.json, so a batch made with other
    weights is never mixed into the set."""
    from transformers import CLIPModel

    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "c"
    recover_run(out, "sre2l", clip_prior=str(clip), clip_prompt="a {name}", iterations=2)
    assert json.loads((out / "inputs.json").read_text())["prior/clip"] == json.loads(
        (out / "manifest.json").read_text())["inputs"]["priors"]["clip"]["sha256"]
    (out / "records" / "batch_00001.json").unlink()  # as if killed before batch 1 was finished
    model = CLIPModel.from_pretrained(clip)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    model.save_pretrained(clip)
    with pytest.raises(PrismError, match=r"--out .*: its finished work was made from other inputs: prior/clip changed"):
        recover_run(out, "sre2l", clip_prior=str(clip), clip_prompt="a {name}", iterations=2)
