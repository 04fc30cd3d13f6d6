"""--param multires (Direct Ascent Synthesis' multi-resolution parametrisation) and --view-noise: the render is the
tanh of the start plus the sum of its upsampled parts, the first render is the starting image, the LR is shared among
the components, SGD steps follow the engine's schedule, and a whole recover run with any method works and resumes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from prismdd.artifacts import image_path, load_distilled, record_path
from prismdd.core.data import denormalize, load_dataset, normalize
from prismdd.core.errors import PrismError
from prismdd.methods.params import PARAMS, MultiRes, multires_sides
from prismdd.stages.recover import recover_config


@pytest.fixture(scope="module")
def digits_info():
    return load_dataset("digits")[2]


def test_sides_run_from_one_pixel_to_the_full_side():
    assert multires_sides(28, 4) == [1, 5, 9, 13, 17, 21, 25, 28]
    assert multires_sides(224, 4)[:3] == [1, 5, 9] and multires_sides(224, 4)[-2:] == [221, 224]
    assert multires_sides(8, 1) == list(range(1, 9))
    assert multires_sides(8, 100) == [1, 8]


def test_render_is_tanh_of_start_plus_the_sum_of_upsampled_parts(digits_info):
    cfg = recover_config("sre2l", dataset="digits", param="multires", multires_step=3)
    p = MultiRes(cfg, digits_info, torch.device("cpu"))
    x0 = normalize(torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8), digits_info)
    leaves = p.init(x0)
    assert [tuple(t.shape) for t in leaves] == [(3, 1, s, s) for s in (1, 4, 7, 8)]
    # all-zero parts: the first render is the starting image (up to the artanh clipping of 0 and 255)
    u0 = denormalize(x0, digits_info)
    assert (denormalize(p.render(leaves), digits_info) - u0).abs().max() < 1e-4
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in leaves:
            t.copy_(torch.randn(t.shape, generator=gen))
    # the same sum written out by hand: the 1 px part is a constant per channel, the others bicubic, the 8 px itself
    raw = torch.atanh(2 * u0.clamp(1e-5, 1 - 1e-5) - 1)
    by_hand = raw + leaves[0].expand(-1, -1, 8, 8) + leaves[3]
    for t in leaves[1:3]:
        by_hand = by_hand + F.interpolate(t, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(denormalize(p.render(leaves), digits_info), (torch.tanh(by_hand) + 1) / 2)
    # every render is a valid image, whatever the parts hold
    with torch.no_grad():
        leaves[0].fill_(50.0)
    u = denormalize(p.render(leaves), digits_info)
    assert u.min() >= 0 and u.max() <= 1


def test_gradient_reaches_every_part_and_coarse_parts_gather_it(digits_info):
    cfg = recover_config("sre2l", dataset="digits", param="multires", multires_step=3)
    p = MultiRes(cfg, digits_info, torch.device("cpu"))
    leaves = p.init(torch.zeros(2, 1, 8, 8))
    target = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = (p.render(leaves) - target).pow(2).sum()
    grads = torch.autograd.grad(loss, leaves)
    assert all(g.abs().sum() > 0 for g in grads)
    # the 1 px part's gradient is the sum of the per-pixel gradients of the raw sum (SGD moves it first, DAS)
    full = grads[-1]  # the full-side part's gradient IS the raw per-pixel gradient
    torch.testing.assert_close(grads[0], full.sum(dim=(2, 3), keepdim=True))


def test_lr_is_shared_among_parts_under_adam_and_whole_under_sgd(digits_info):
    adam = MultiRes(recover_config("sre2l", dataset="digits", param="multires"), digits_info, torch.device("cpu"))
    assert adam.sides == [1, 5, 8] and not adam.sgd and adam.lr_scale(0) == pytest.approx(1 / 3)  # 8 px, step 4
    sgd = MultiRes(recover_config("sre2l", dataset="digits", param="multires", multires_optimizer="sgd"),
                   digits_info, torch.device("cpu"))
    assert sgd.sgd and sgd.lr_scale(0) == 1.0


def test_pixels_param_is_the_engine_default(digits_info):
    cfg = recover_config("prism", dataset="digits")
    assert cfg.param == "pixels" and PARAMS.get("pixels").name == "pixels"
    p = PARAMS.get(cfg.param)(cfg, digits_info, torch.device("cpu"))
    x0 = torch.randn(2, 1, 8, 8)
    leaves = p.init(x0)
    assert leaves[0] is not x0 and torch.equal(p.render(leaves), x0)
    assert "multires" in PARAMS.names()


def test_param_choices_are_checked():
    with pytest.raises(PrismError, match="param"):
        recover_config("sre2l", param="wavelets")


def test_sre2l_with_multires_end_to_end_and_resume(recover_run, tmp_path):
    out = recover_run(tmp_path / "mr", "sre2l", param="multires", iterations=4, view_noise=0.2)
    ds = load_distilled(out)
    assert ds.images.shape == (20, 1, 8, 8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["param"]["name"] == "multires" and manifest["inputs"]["param"]["sides"] == [1, 5, 8]
    assert manifest["config"]["view_noise"] == 0.2
    record = json.loads(record_path(out, 1).read_text())
    assert record["param"]["lr_scale"] == pytest.approx(1 / 3)
    first = {(c, k): image_path(out, c, k).read_bytes() for c, k in record["units"]}
    record_path(out, 1).unlink()
    for c, k in record["units"]:
        image_path(out, c, k).unlink()
    recover_run(tmp_path / "mr", "sre2l", param="multires", iterations=4, view_noise=0.2)
    assert {(c, k): image_path(out, c, k).read_bytes() for c, k in record["units"]} == first


def test_multires_moves_the_image_and_differs_from_pixels(recover_run, tmp_path):
    """Same method, seed and start: the multires images are not the pixel ones, and they left their start."""
    pix = load_distilled(recover_run(tmp_path / "px", "prism", iterations=4)).images.float()
    mr = load_distilled(recover_run(tmp_path / "mr", "prism", param="multires", iterations=4)).images.float()
    start = load_distilled(recover_run(tmp_path / "st", "prism", iterations=1, lr=0.0)).images.float()
    assert (mr - pix).abs().max() > 0 and (mr - start).abs().max() > 0


def test_sgd_steps_follow_the_schedule(recover_run, tmp_path):
    out = recover_run(tmp_path / "sgd", "sre2l", param="multires", multires_optimizer="sgd", lr=0.01, iterations=3)
    assert load_distilled(out).images.shape == (20, 1, 8, 8)


def test_methods_that_do_not_optimise_pixels_refuse_the_engine_options(recover_run, tmp_path):
    with pytest.raises(PrismError, match=r"^--param multires: --method rded does not optimise pixels"):
        recover_run(tmp_path / "r", "rded", param="multires")
    with pytest.raises(PrismError, match=r"^--view-noise 0.2: --method rded"):
        recover_run(tmp_path / "r", "rded", view_noise=0.2)
    assert not (tmp_path / "r" / "images").exists()


TABLE5 = {"sre2l.yaml": ("pixels", "", 0.0), "sre2l-clip.yaml": ("pixels", "openai/clip-vit-base-patch32", 0.0),
          "sre2l-multires.yaml": ("multires", "", 0.2),
          "sre2l-clip-multires.yaml": ("multires", "openai/clip-vit-base-patch32", 0.2)}


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_seed_table5_configs_load_as_their_row(name):
    from pathlib import Path

    from prismdd.core.config import build_config, load_yaml
    from prismdd.stages.recover import RecoverConfig

    folder = Path(__file__).resolve().parents[2] / "configs" / "seed-table5"
    cfg = build_config(RecoverConfig, load_yaml(folder / name))
    assert (cfg.method, cfg.primary, cfg.bn_pool, cfg.resolution, cfg.lr) == ("sre2l", "resnet18", "resnet18", 224, 0.25)
    assert (cfg.param, cfg.clip_prior, cfg.view_noise) == TABLE5[name]
    assert f"prismdd recover --config configs/seed-table5/{name}" in (folder / name).read_text()
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(TABLE5)


@pytest.mark.parametrize("s, side", [(5, 28), (17, 28), (25, 28), (9, 224), (221, 224)])
def test_the_matrix_form_is_the_bicubic_upsampling(s, side):
    from prismdd.methods.params import bicubic_matrix, upsample

    p = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(s))
    a = bicubic_matrix(s, side)
    torch.testing.assert_close(a @ p @ a.T, upsample(p, side), atol=1e-5, rtol=1e-5)
