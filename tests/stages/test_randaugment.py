"""DELT's student-side RandAugment (``--rand-augment``, set by ``--protocol delt``): timm's
``rand_augment_transform('rand-m6-n2-mstd1.0', hparams={'translate_const': 117, 'img_mean': (124, 116, 104)})``
on each uint8 image before the crop (DELT evaluation/validation/main.py:119-125), one seeded draw per image
and epoch, stored with the views so relabel's labels replay exactly. FIDELITY.md "Student protocols", DELT."""
from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from prismdd.core import augment
from prismdd.core.augment import EpochPlan, ViewConfig, epoch_plan, make_inputs, rand_augment_images
from prismdd.core.config import build_config
from prismdd.core.data import DatasetInfo, load_dataset
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json
from prismdd.stages.relabel import RelabelConfig, relabel
from prismdd.stages.validate import validate, validate_config

timm_aa = pytest.importorskip("timm.data.auto_augment")
DELT = "rand-m6-n2-mstd1.0"
STUDENT = dict(dataset="digits", device="cpu", student_width=0.25, lr=0.01)
INFO = DatasetInfo("t", [str(i) for i in range(10)], 3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "test")


def fixed_images(c: int, size: int = 32, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def literal_delt(img, seed: int):
    """DELT's transform written out: timm's function with DELT's arguments, on a PIL image, Python's ``random``
    and numpy's global generator seeded as prismdd seeds them for this image."""
    from PIL import Image
    tfm = timm_aa.rand_augment_transform(config_str=DELT, hparams={"translate_const": 117,
                                                                   "img_mean": (124, 116, 104)})
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    return np.asarray(tfm(Image.fromarray(img)))


@pytest.mark.parametrize("channels", [3, 1])
def test_applied_transform_is_timms_with_delts_arguments(channels):
    x = fixed_images(channels)
    seeds = torch.tensor([0, 1, 12345, 2 ** 40 + 7, 2 ** 62, 99])
    out = rand_augment_images(x, seeds, DELT)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i, s in enumerate(seeds.tolist()):
        if channels == 3:
            want = literal_delt(x[i].permute(1, 2, 0).numpy(), s).transpose(2, 0, 1)
        else:  # a grey image goes in as RGB with equal channels (DELT's loader), its luminance comes back
            from PIL import Image
            rgb = literal_delt(np.asarray(Image.fromarray(x[i, 0].numpy()).convert("RGB")), s)
            want = np.asarray(Image.fromarray(rgb).convert("L"))[None]
        assert np.array_equal(out[i].numpy(), want), (channels, s)
    assert (out != x).any(1).float().mean() > 0.3  # the transform did change the images
    # the same seed gives the same draw; another seed another one
    assert torch.equal(rand_augment_images(x, seeds, DELT), out)
    assert not torch.equal(rand_augment_images(x, seeds + 1, DELT), out)


def test_global_random_states_are_left_alone():
    random.seed(5)
    np.random.seed(6)
    py, npy = random.getstate(), np.random.get_state()
    x = fixed_images(3, 16, 4)
    plan = epoch_plan(4, 0, 3, ViewConfig(2, 0.5, "cutmix", rand_augment=DELT), 16)
    for _, _, idx, views, mix in plan.batches(2):
        make_inputs(x[idx], INFO, views, mix, "cpu", DELT)
    assert random.getstate() == py
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(after, npy))


@pytest.mark.parametrize("shuffle", [0, 2])
def test_plans_without_rand_augment_keep_their_random_stream(shuffle):
    plain = epoch_plan(30, 2, 7, ViewConfig(8, 0.25, "cutmix", patch_shuffle=shuffle), 8)
    ra = epoch_plan(30, 2, 7, ViewConfig(8, 0.25, "cutmix", patch_shuffle=shuffle, rand_augment=DELT), 8)
    assert plain.views.ra_seeds is None and "rand_augment_seeds" not in plain.to_tensors()
    d_plain, d_ra = plain.to_tensors(), ra.to_tensors()
    assert set(d_ra) - set(d_plain) == {"rand_augment_seeds"}
    assert all(torch.equal(d_plain[k], d_ra[k]) for k in d_plain)  # order, boxes, flips, shuffles, mixes
    seeds = ra.views.ra_seeds
    assert seeds.dtype == torch.int64 and len(seeds.unique()) == 30
    back = EpochPlan.from_tensors(d_ra, 8)
    assert torch.equal(back.views.ra_seeds, seeds)
    assert torch.equal(back.views[3:9].ra_seeds, seeds[3:9])
    assert not torch.equal(epoch_plan(30, 3, 7, ViewConfig(8, 0.25, "cutmix", rand_augment=DELT), 8).views.ra_seeds,
                           seeds)


def test_missing_timm_or_a_bad_string_is_one_prism_error(monkeypatch):
    with pytest.raises(PrismError, match="not a timm RandAugment string"):
        augment.rand_augment_transform("rand-q3")
    augment.rand_augment_transform.cache_clear()
    monkeypatch.setitem(sys.modules, "timm.data.auto_augment", None)  # import fails as if timm were missing
    try:
        with pytest.raises(PrismError, match=r"--rand-augment .*pip install 'prismdd\[timm\]'"):
            augment.rand_augment_transform(DELT)
    finally:
        augment.rand_augment_transform.cache_clear()
    with pytest.raises(PrismError, match="no --rand-augment"):
        rand_augment_images(fixed_images(1, 8, 2), None, DELT)


def test_stored_labels_replay_online_rand_augment(prism_run, zoo, tmp_path):
    """relabel --protocol delt stores one RandAugment seed per image and epoch and its config string; validate
    replays them, and the teacher labelling the same augmented, mixed batch online trains a bit-identical
    student. Labels made without the same --rand-augment are refused."""
    labels = relabel(build_config(RelabelConfig, dict(protocol="delt", dataset="digits", distilled=str(prism_run),
                                                      teachers=str(zoo), out=str(tmp_path / "l"), epochs=2,
                                                      batch_size=8, storage="fp32", device="cpu", seed=0)))
    assert read_json(labels / "manifest.json")["views"]["rand_augment"] == DELT
    common = dict(STUDENT, distilled=str(prism_run), epochs=2, eval_every=1, seed=0)
    a = validate(validate_config("delt", out=str(tmp_path / "stored"), labels=str(labels), **common))
    b = validate(validate_config("delt", out=str(tmp_path / "online"), teachers=str(zoo), batch_size=8, **common))
    assert a["protocol"]["rand_augment"] == b["protocol"]["rand_augment"] == DELT
    assert a["curve"] == b["curve"]
    from safetensors.torch import load_file
    sa = load_file(str(tmp_path / "stored" / "convnet_seed0" / "model.safetensors"))
    sb = load_file(str(tmp_path / "online" / "convnet_seed0" / "model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    validate(validate_config("delt", out=str(tmp_path / "plain"), teachers=str(zoo), batch_size=8,
                             **dict(common, rand_augment="")))
    sc = load_file(str(tmp_path / "plain" / "convnet_seed0" / "model.safetensors"))
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # RandAugment did change the inputs
    with pytest.raises(PrismError, match="--rand-augment ''"):
        validate(validate_config("delt", out=str(tmp_path / "refused"), labels=str(labels),
                                 **dict(common, rand_augment="")))


def test_digits_images_survive_the_transform():
    """An 8 x 8 greyscale image (the test dataset) goes through every op timm may draw without error."""
    train, _, _ = load_dataset("digits")
    x = train.images[:64]
    out = rand_augment_images(x, torch.arange(64), DELT)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_posterize_to_zero_bits_gives_black_instead_of_stopping_training():
    """timm's Posterize asks for 0 bits when the magnitude falls below 2.5 (mstd1.0: rare, but 30,000 draws of one
    Fashion-MNIST run hit it); Pillow 13 raises there. prismdd returns the black image older Pillow made."""
    from PIL import Image, ImageOps
    x = fixed_images(3)
    # magnitude 0 without noise: every Posterize keeps 0 bits
    for k in range(8):  # 48 draws of 2 ops out of 15: Posterize comes up several times
        assert rand_augment_images(x, torch.arange(len(x)) + len(x) * k, "rand-m0-n2").shape == x.shape
    op = next(o for o in augment.rand_augment_transform(DELT).ops if o.name == "Posterize")
    img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    assert np.asarray(op.aug_fn(img, 0)).max() == 0
    assert np.array_equal(np.asarray(op.aug_fn(img, 2)), np.asarray(ImageOps.posterize(img, 2)))
    assert np.array_equal(np.asarray(op.aug_fn(img, 8)), np.asarray(img))


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 1])
def test_worker_processes_give_the_serial_result(channels):
    """Each image's draw comes from its own seed, so splitting the batch over processes changes nothing."""
    x = fixed_images(channels)
    seeds = torch.tensor([3, 1, 4, 1, 5, 9])
    serial = rand_augment_images(x, seeds, DELT)
    assert torch.equal(rand_augment_images(x, seeds, DELT, workers=2), serial)  # one pool for both cases (spawn is slow)
    assert torch.equal(rand_augment_images(x[:1], seeds[:1], DELT, workers=2), serial[:1])
    state = random.getstate()
    rand_augment_images(x, seeds, DELT, workers=2)
    assert random.getstate() == state


@pytest.mark.slow
def test_a_process_that_used_the_pool_exits_without_traceback_text():
    """Issue 36: the pool kept for the process's life is shut down at exit while the interpreter is whole; collected
    during its teardown it printed ``Exception ignored in ... weakref_cb ... AttributeError`` after a green run."""
    code = "from prismdd.core.augment import rand_augment_pool\nprint(rand_augment_pool(1).submit(abs, -3).result())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
