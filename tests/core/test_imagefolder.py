"""ImageFolder as a first-class dataset: size and channels inferred from the images, the decoded cache (checked,
rebuilt when damaged, one copy under concurrent builders), 16-bit and float images, EXIF orientation, transparency,
hidden files, notices said once, the ImageNet eval crop, check-data's report."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prismdd.core.data as D
import prismdd.core.data.cache as data_cache
import prismdd.core.data.decode as decode
from prismdd.core.data import check_data, load_dataset
from prismdd.core.errors import PrismError


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
    for _ in range(3):  # every stage of `prismdd run` loads the data: the notices are said once per process
        _, _, info = load_dataset("imagefolder", str(root))
    out = capsys.readouterr().out.splitlines()
    sizes = [ln for ln in out if "different sizes" in ln]
    kinds = [ln for ln in out if "mixed image kinds" in ln]
    assert (info.resolution, info.channels) == (16, 3)
    assert sizes == ["[data] imagefolder: images of different sizes (shorter side 16-40 px; 1 of the 5 images differs "
                     "from 16 px): all resized to 16 px, the most common size; pass --resolution N to choose"]
    assert kinds == ["[data] imagefolder: mixed image kinds (5 greyscale and 2 colour of the 7 images): all converted "
                     "to RGB (greyscale copied into all 3 channels)"]
    train, _, info = load_dataset("imagefolder", str(root), resolution=8, channels=1)
    assert (info.resolution, info.channels) == (8, 1) and train.images.shape[1:] == (1, 8, 8)
    out = capsys.readouterr().out
    assert "different sizes" not in out  # a given --resolution needs no notice
    assert "converted to greyscale (colour by its luma)" in out


def test_large_photos_default_to_224(tmp_path, capsys):
    rgb = np.zeros((300, 400, 3), np.uint8)
    root = tree(tmp_path, {"train/a/0.jpg": rgb, "train/b/0.jpg": rgb})
    _, test, info = load_dataset("imagefolder", str(root))
    assert (info.resolution, info.channels) == (224, 3) and test.images.shape[-1] == 224
    assert "all resized to 224 px, ImageNet's convention" in capsys.readouterr().out


def test_cache_decodes_once_and_notices_a_changed_file(tmp_path, monkeypatch):
    root = tree(tmp_path / "data", {f"train/{c}/{i}.png": grey(12, seed=i) for c in "ab" for i in range(2)})
    calls = []
    real = decode.load_image
    monkeypatch.setattr(decode, "load_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
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


# ----------------------------------------------------------------------------- what decoding decides, said once
def quadrants(side=16) -> np.ndarray:
    """A grey RGB image whose four quadrants differ, so every rotation and mirror of it is told apart."""
    h = side // 2
    out = np.zeros((side, side, 3), np.uint8)
    out[:h, :h], out[:h, h:], out[h:, :h], out[h:, h:] = 250, 170, 90, 10
    return out


def test_exif_orientation_is_applied_by_the_cache_per_batch_decoding_and_check_data(tmp_path, monkeypatch, capsys):
    """A phone photo is stored sideways with EXIF Orientation 6; every decoding path shows it upright."""
    root = tmp_path / "data"
    exif = Image.Exif()
    exif[decode.EXIF_ORIENTATION] = 6  # "turn 90 degrees clockwise to view"
    for split in ("train", "val"):
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            Image.fromarray(quadrants()).save(root / split / c / "upright.jpg", quality=95)
            Image.fromarray(np.rot90(quadrants()).copy()).save(root / split / c / "phone.jpg", quality=95, exif=exif)
    upright = torch.from_numpy(quadrants()).permute(2, 0, 1).int()
    train, test, _ = load_dataset("imagefolder", str(root))
    for split in (train, test):  # the decoded cache
        assert isinstance(split, D.CachedFolderImages)
        assert all((split.images[i].int() - upright).abs().max() <= 12 for i in range(len(split)))  # JPEG noise only
    out = capsys.readouterr().out
    assert "[data] imagefolder: 4 of the 8 images carry an EXIF orientation" in out and "turned upright" in out
    assert "skipped" not in out and "transparency" not in out and "mixed" not in out  # nothing else to say
    monkeypatch.setenv("PRISMDD_CACHE", "off")
    lazy, _, _ = load_dataset("imagefolder", str(root))  # decoded per batch
    assert isinstance(lazy, D.FolderImages) and torch.equal(lazy.get_images(torch.arange(4)), train.images)
    res = check_data("imagefolder", str(root))
    assert res["exif_turned"] == 4 and any("4 of the 8 images carry an EXIF orientation" in n for n in res["notes"])


def test_transparency_is_composited_on_white_and_said_once(tmp_path, capsys):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:] = (0, 0, 200, 255)  # left half fully transparent over black, right half opaque blue
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, :, 1] = 128  # black at half opacity: mid grey on white
    root = tree(tmp_path, {"train/a/0.png": rgba, "train/b/0.png": la, "train/b/1.png": np.zeros((8, 8, 3), np.uint8)})
    for _ in range(2):
        train, _, info = load_dataset("imagefolder", str(root))
    assert info.channels == 3
    x = train.images[0]
    assert (x[:, :, :4] == 255).all() and x[:, :, 4:].flatten(1).unique(dim=1).tolist() == [[0], [0], [200]]
    assert abs(int(train.images[1].float().mean()) - 127) <= 1  # LA: composited the same way
    notes = [ln for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("[data] imagefolder: ") and "transparency" in ln]
    assert notes == ["[data] imagefolder: 4 of the 5 images have transparency: composited on white (255) before use"]
    assert check_data("imagefolder", str(root))["transparent"] == 4


def test_hidden_files_and_folders_are_skipped_with_one_notice(tmp_path, cli, capsys):
    root = tree(tmp_path, {f"train/{c}/{i}.png": grey(8, seed=i) for c in "ab" for i in range(2)})
    (root / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata, not a PNG
    (root / "val" / "b" / "._v.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")  # not an image name: skipped as before, not counted
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a hidden "class" folder
    Image.fromarray(grey(8)).save(root / "train" / ".ipynb_checkpoints" / "x.png")
    for _ in range(2):
        train, test, info = load_dataset("imagefolder", str(root))
    assert info.class_names == ["a", "b"] and (len(train), len(test)) == (4, 2)
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[data] imagefolder: skipped")]
    assert notes == ["[data] imagefolder: skipped 2 hidden files and 1 hidden folder (names starting with '.', e.g. "
                     "macOS '._' companions): not images of the set"]
    assert cli(["check-data", "--dataset", "imagefolder", "--data-root", root]) == 0
    assert "note: skipped 2 hidden files and 1 hidden folder" in capsys.readouterr().out


def test_fewer_than_two_classes_refused_by_the_loader_and_check_data(tmp_path, cli, capsys):
    root = tree(tmp_path, {f"train/only/{i}.png": grey(8, seed=i) for i in range(3)})
    with pytest.raises(PrismError, match="train/ has 1 class folder .only 'only'.; classification needs at least 2"):
        load_dataset("imagefolder", str(root))
    assert cli(["check-data", "--dataset", "imagefolder", "--data-root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("prismdd: error:") == 1 and "at least 2 classes" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the decoded cache under damage
DAMAGE = {"truncated images.u8": "bytes, ", "cut-off meta.json": "meta.json cannot be read: JSONDecodeError",
          "garbled meta.json": "meta.json cannot be read: UnicodeDecodeError",
          "changed bytes, same size": "checksummed chunks differ", "meta.json deleted": "meta.json is missing"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_rebuilt_with_one_notice(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setattr(data_cache, "CHECK_CHUNK", 256)  # 4 chunks of 12 x 12 x 7 images: chunk hashing runs in threads
    root = tree(tmp_path / "data", {f"train/{c}/{i}.png": grey(12, seed=i) for c in "ab" for i in range(4)})
    train, _, _ = load_dataset("imagefolder", str(root))
    ref, folder = train.images.clone(), train.cache
    assert len(json.loads((folder / "meta.json").read_text())["sha256"]) == 5  # ceil(8 * 144 / 256)
    data = folder / "images.u8"
    if damage == "truncated images.u8":
        os.truncate(data, data.stat().st_size - 100)
    elif damage == "cut-off meta.json":
        (folder / "meta.json").write_text('{"shape": [8, 1, 12')
    elif damage == "garbled meta.json":
        (folder / "meta.json").write_bytes(b'{"shape": [8, 1, \xff')
    elif damage == "meta.json deleted":
        (folder / "meta.json").unlink()
    else:
        raw = bytearray(data.read_bytes())
        raw[300] ^= 0xFF  # one byte of the second chunk
        data.write_bytes(bytes(raw))
    del train
    capsys.readouterr()
    again, _, _ = load_dataset("imagefolder", str(root))
    said = [ln for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("[data] imagefolder train: the decoded cache")]
    assert len(said) == 1 and str(folder) in said[0] and DAMAGE[damage] in said[0], said
    assert "decoding it again" in said[0]
    assert torch.equal(again.images, ref)  # the rebuilt copy, never the damaged bytes
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == sorted(  # no leftovers of the old copy
        p.name for p in folder.parent.iterdir() if p.is_dir() and "." not in p.name)


def test_cache_checksums_are_verified_once_per_process(tmp_path, monkeypatch):
    root = tree(tmp_path / "data", {f"train/{c}/{i}.png": grey(12, seed=i) for c in "ab" for i in range(2)})
    load_dataset("imagefolder", str(root))  # builds both splits (sealing them counts as their check)
    calls = []
    real = data_cache._chunk_digests
    monkeypatch.setattr(data_cache, "_chunk_digests", lambda *a: calls.append(a[0]) or real(*a))
    load_dataset("imagefolder", str(root))
    assert calls == []  # sealed by this process: not hashed again
    data_cache._VERIFIED.clear()  # as a new process finds them
    load_dataset("imagefolder", str(root))
    load_dataset("imagefolder", str(root))
    assert len(calls) == 2  # train and test, once each


def _build(root: str, result: str) -> None:
    """A second process's load of the same ImageFolder (forked: torch is already imported), decoding slowly so
    that the two builds overlap; what it loaded and said goes to ``result``."""
    import contextlib
    import io

    real = decode.load_image
    decode.load_image = lambda *a, **k: time.sleep(0.05) or real(*a, **k)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        train, test, _ = load_dataset("imagefolder", root)
    Path(result).write_text(json.dumps({"sums": [int(train.images.sum()), int(test.images.sum())],
                                        "cache": train.cache.name, "said": said.getvalue()}))


@pytest.mark.slow
def test_two_processes_building_one_cache_end_with_one_good_copy(tmp_path):
    import multiprocessing

    root = tree(tmp_path / "data", {f"train/{c}/{i}.png": grey(12, seed=i) for c in "ab" for i in range(8)})
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build, args=(str(root), str(tmp_path / f"r{i}.json"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    res = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert res[0]["sums"] == res[1]["sums"] and res[0]["cache"] == res[1]["cache"]
    assert sum(r["said"].count("decoded 16 images once") for r in res) == 1  # the train split was decoded once
    cache = tmp_path / "cache" / "imagefolder"
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 2 and all("." not in f for f in folders)  # train and test, no .tmp or .old copies
    data_cache._VERIFIED.clear()
    train, _, _ = load_dataset("imagefolder", str(root))  # and the copy they left passes its checksums
    assert int(train.images.sum()) == res[0]["sums"][0] and train.cache.name == res[0]["cache"]
