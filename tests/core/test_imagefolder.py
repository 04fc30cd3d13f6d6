"""ImageFolder as a first-class dataset: size and channels inferred from the images, the decoded cache,
16-bit and float images, the ImageNet eval crop, check-data's report."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import prismdd.core.data as D
from prismdd.core.data import check_data, load_dataset


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMDD_CACHE", str(tmp_path / "cache"))


def tree(root, arrays: dict, mode=None):
    """``{"train/a/0.png": array, ...}`` -> files; a ``val/`` copy of every class is made when not given."""
    for rel, arr in arrays.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode).save(p) if mode else Image.fromarray(arr).save(p)
    for c in {r.split("/")[1] for r in arrays if r.startswith("train/")}:
        if not (root / "val" / c).exists():
            first = next(r for r in arrays if r.startswith(f"train/{c}/"))
            (root / "val" / c).mkdir(parents=True)
            (root / "val" / c / "v.png").write_bytes((root / first).read_bytes())
    return root


def grey(side, value=None, seed=0):
    rng = np.random.default_rng(seed)
    return (np.full((side, side), value, np.uint8) if value is not None
            else rng.integers(0, 256, (side, side), dtype=np.uint8))


def test_grey_28px_inferred_as_1_channel_28px(tmp_path):
    root = tree(tmp_path, {f"train/{c}/{i}.png": grey(28, seed=i) for c in "ab" for i in range(3)})
    train, test, info = load_dataset("imagefolder", str(root))
    assert (info.channels, info.resolution) == (1, 28)
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (2, 1, 28, 28)
    # grey sets are normalised with their own statistics (RGB sets get ImageNet's, for pretrained teachers)
    x = train.images.float() / 255
    assert info.mean[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert np.array_equal(train.images[0, 0].numpy(), grey(28, seed=0))  # no resampling at the native size


def test_mixed_sizes_majority_with_notice_and_overrides(tmp_path, capsys):
    arrays = {f"train/a/{i}.png": grey(16, seed=i) for i in range(3)}
    arrays["train/a/big.png"] = grey(40)
    arrays["train/b/rgb.png"] = np.zeros((16, 24, 3), np.uint8)  # one colour image makes the set RGB
    root = tree(tmp_path, arrays)
    _, _, info = load_dataset("imagefolder", str(root))
    notice = [ln for ln in capsys.readouterr().out.splitlines() if "images have" in ln]
    assert (info.resolution, info.channels) == (16, 3)
    assert len(notice) == 1 and "most common, 16 px" in notice[0] and "--resolution" in notice[0]
    train, _, info = load_dataset("imagefolder", str(root), resolution=8, channels=1)
    assert (info.resolution, info.channels) == (8, 1) and train.images.shape[1:] == (1, 8, 8)
    assert "images have" not in capsys.readouterr().out  # a given --resolution needs no notice


def test_large_photos_default_to_224(tmp_path, capsys):
    rgb = np.zeros((300, 400, 3), np.uint8)
    root = tree(tmp_path, {"train/a/0.jpg": rgb, "train/b/0.jpg": rgb})
    _, test, info = load_dataset("imagefolder", str(root))
    assert (info.resolution, info.channels) == (224, 3) and test.images.shape[-1] == 224
    assert "using 224 px" in capsys.readouterr().out


def test_cache_decodes_once_and_notices_a_changed_file(tmp_path, monkeypatch):
    root = tree(tmp_path / "data", {f"train/{c}/{i}.png": grey(12, seed=i) for c in "ab" for i in range(2)})
    calls = []
    real = D.load_image
    monkeypatch.setattr(D, "load_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    train, _, _ = load_dataset("imagefolder", str(root))
    assert isinstance(train, D.CachedFolderImages) and len(calls) == 6  # 4 train + 2 val, decoded once
    assert (tmp_path / "cache" / "imagefolder" / train.cache.name / "images.u8").exists()
    calls.clear()
    again, _, _ = load_dataset("imagefolder", str(root))
    assert calls == [] and torch.equal(again.images, train.images)  # the second load decodes nothing
    # the same data asked for with explicit (equal) settings reuses the same arrays
    load_dataset("imagefolder", str(root), resolution=12, channels=1)
    assert calls == []
    changed = root / "train" / "b" / "1.png"
    Image.fromarray(grey(12, value=7)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third, _, _ = load_dataset("imagefolder", str(root))
    assert str(changed) in calls  # a changed file invalidates the cache
    assert (third.images[3] == 7).all() and not torch.equal(third.images, train.images)


def test_cache_off_is_file_backed(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMDD_CACHE", "off")
    root = tree(tmp_path, {f"train/{c}/{i}.png": grey(10, seed=i) for c in "ab" for i in range(2)})
    train, _, info = load_dataset("imagefolder", str(root))
    assert isinstance(train, D.FolderImages) and (info.resolution, info.channels) == (10, 1)
    assert train.get_images(torch.tensor([1])).shape == (1, 1, 10, 10)
    threaded, _, _ = load_dataset("imagefolder", str(root), num_workers=2)  # a batch decoded by 2 threads
    assert threaded.workers == 2 and torch.equal(threaded.get_images(torch.arange(4)), train.get_images(torch.arange(4)))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_images_scaled_not_white(tmp_path, suffix):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    root = tree(tmp_path, {f"train/a/{i}{suffix}": ramp for i in range(2)} | {"train/b/0.png": grey(16)})
    with Image.open(root / "train" / "a" / f"0{suffix}") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    train, _, info = load_dataset("imagefolder", str(root))
    x = train.images[0, 0].numpy().astype(int)
    assert info.channels == 1
    assert np.abs(x - np.round(ramp / 257.0)).max() <= 1  # 65535 -> 255: the ramp survives, not all white
    assert x.min() == 0 and x.max() >= 250
    res = check_data("imagefolder", str(root))
    assert res["bad_files"] == [] and any("16-bit" in n and "257" in n for n in res["notes"])


def test_float_images_in_unit_range(tmp_path):
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    root = tree(tmp_path, {"train/a/0.tif": f, "train/b/0.tif": f[::-1].copy()}, mode="F")
    train, _, _ = load_dataset("imagefolder", str(root))
    assert np.abs(train.images[0, 0].numpy().astype(int) - np.round(f * 255)).max() <= 1


def test_check_data_reports_flat_images(tmp_path, cli, capsys):
    root = tree(tmp_path, {"train/a/0.png": grey(8, value=255), "train/b/0.png": grey(8)})
    assert cli(["check-data", "--dataset", "imagefolder", "--data-root", root]) == 0
    out = capsys.readouterr().out
    assert "8 px x 1 channels" in out and "L x 4" in out and "one flat value" in out


def test_imagenet_eval_crop(tmp_path):
    img = np.zeros((32, 32), np.uint8)
    img[:2], img[-2:], img[:, :2], img[:, -2:] = 255, 255, 255, 255  # a 2 px white frame
    root = tree(tmp_path, {"train/a/0.png": img, "train/b/0.png": img})
    train, test, _ = load_dataset("imagefolder", str(root), resolution=28, eval_crop="imagenet")
    # train: shorter side to 28, frame kept; test: shorter side to 28*256/224 = 32, centre 28 kept: frame cut off
    assert train.images[0, 0, 0].float().mean() > 100 and int(test.images.max()) == 0
    _, test, _ = load_dataset("imagefolder", str(root), resolution=28, eval_crop="none")
    assert test.images[0, 0, 0].float().mean() > 100
    assert D.crop_ratio("auto", 224) == 224 / 256 and D.crop_ratio("auto", 64) == 1.0
    # in-memory sets: only the test split changes
    tr0, te0, _ = load_dataset("digits")
    tr1, te1, _ = load_dataset("digits", eval_crop="imagenet")
    assert torch.equal(tr0.images, tr1.images) and not torch.equal(te0.images, te1.images)
    assert te1.images.shape == te0.images.shape


def test_channels_override_on_in_memory_sets():
    tr, te, info = load_dataset("digits", channels=3)
    assert info.channels == 3 and tr.images.shape[1] == 3 and len(info.mean) == 3
    assert torch.equal(tr.images[:, 0], tr.images[:, 2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_batches_normalise_the_same_on_cuda(tmp_path):
    root = tree(tmp_path, {f"train/{c}/{i}.png": grey(16, seed=i) for c in "ab" for i in range(2)})
    train, _, info = load_dataset("imagefolder", str(root))
    x = train.images[torch.tensor([0, 3])]
    assert torch.allclose(D.normalize(x.cuda(), info).cpu(), D.normalize(x, info), atol=1e-6)
