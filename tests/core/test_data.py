"""Datasets: IDX parsing, IDX dataset discovery, digits, imagefolder, subsets, check_data."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from prismdd.core import data as D
from prismdd.core.data import registry
from prismdd.core.config import CommonConfig, build_config
from prismdd.core.data import FASHION_CLASSES, IDX_FILES, check_data, list_datasets, load_dataset, load_splits, read_idx, write_idx
from prismdd.core.errors import PrismError


# ----------------------------------------------------------------------------- IDX files
@pytest.mark.parametrize("name", ["imgs-idx3-ubyte", "imgs-idx3-ubyte.gz"])
def test_idx_roundtrip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    path = tmp_path / name
    write_idx(path, arr)
    raw = path.read_bytes()
    if name.endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"  # really gzipped
        raw = gzip.decompress(raw)
    assert raw[:4] == bytes([0, 0, 0x08, 3]) and len(raw) == 4 + 3 * 4 + arr.size
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (5, 4, 3)
    np.testing.assert_array_equal(got, arr)


def test_idx_labels_1d(tmp_path):
    lbl = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "l-idx1-ubyte", lbl)
    np.testing.assert_array_equal(read_idx(tmp_path / "l-idx1-ubyte"), lbl)


def test_idx_big_endian_int32(tmp_path):
    # element type 0x0C: big-endian int32
    vals = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "x.idx").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + vals.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), [1, -2, 70000])


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_body_names_the_file(tmp_path, gz):
    arr = np.ones((4, 6, 6), dtype=np.uint8)
    full = tmp_path / "full-idx3-ubyte"
    write_idx(full, arr)
    data = full.read_bytes()[:-10]
    path = tmp_path / ("cut-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(PrismError, match="truncated") as ei:
        read_idx(path)
    assert str(path) in str(ei.value)


def test_idx_truncated_gzip_stream_names_the_file(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(50, 8, 8), dtype=np.uint8)
    good = tmp_path / "good-idx3-ubyte.gz"
    write_idx(good, arr)
    bad = tmp_path / "bad-idx3-ubyte.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # the download stopped half-way
    with pytest.raises(PrismError) as ei:
        read_idx(bad)
    assert str(bad) in str(ei.value)


def test_idx_truncated_header_names_the_file(tmp_path):
    path = tmp_path / "hdr-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0]))  # claims 3 dims, holds 3 bytes of them
    with pytest.raises(PrismError) as ei:
        read_idx(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n....", b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", b"\x00"])
def test_idx_bad_magic(tmp_path, content):
    path = tmp_path / "junk-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(PrismError, match="magic") as ei:
        read_idx(path)
    assert str(path) in str(ei.value)


def test_idx_unknown_element_type(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(PrismError, match="element type"):
        read_idx(path)


# ----------------------------------------------------------------------------- IDX datasets
def _fake_idx_folder(folder, n_train=12, n_test=5, gz=True, size=28):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img_stem, lbl_stem = IDX_FILES[split]
        ext = ".gz" if gz else ""
        write_idx(folder / (img_stem + ext), rng.integers(0, 256, size=(n, size, size), dtype=np.uint8))
        write_idx(folder / (lbl_stem + ext), np.arange(n, dtype=np.uint8) % 10)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_fake_fashion_mnist_loads_from_data_root(tmp_path, gz):
    _fake_idx_folder(tmp_path / "fashion-mnist", gz=gz)
    # data_root may be the folder itself or its parent
    for root in (tmp_path, tmp_path / "fashion-mnist"):
        train, test, info = load_dataset("fashion-mnist", str(root))
        assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
        assert test.images.shape == (5, 1, 28, 28)
        assert train.targets.dtype == torch.int64
        assert train.targets.tolist() == [i % 10 for i in range(12)]
        assert info.class_names == FASHION_CLASSES and info.num_classes == 10
        assert (info.channels, info.resolution) == (1, 28)
        assert info.source == str(tmp_path / "fashion-mnist")
        assert len(info.mean) == len(info.std) == 1 and 0.3 < info.mean[0] < 0.7


def test_idx_dataset_length_mismatch(tmp_path):
    folder = _fake_idx_folder(tmp_path / "fashion-mnist")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(PrismError, match="differ"):
        load_dataset("fashion-mnist", str(folder))


def test_missing_idx_dataset_lists_places_and_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DEBIAN_ROOT", tmp_path / "debian")  # this machine may have the real package
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(PrismError) as ei:
        load_dataset("fashion-mnist", str(root))
    msg = str(ei.value)
    for place in (root, root / "fashion-mnist", root / "fashion_mnist", tmp_path / "debian" / "fashion-mnist"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and "--download" in msg
    assert "\n" not in msg


def test_incomplete_idx_folder_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DEBIAN_ROOT", tmp_path / "debian")
    folder = _fake_idx_folder(tmp_path / "fashion-mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(PrismError, match="not found"):
        load_dataset("fashion-mnist", str(tmp_path))
    assert D.DATASETS.get("fashion-mnist").available(str(tmp_path)) is None


# ----------------------------------------------------------------------------- digits
def test_digits_split_is_fixed():
    tr1, te1, info = load_dataset("digits")
    tr2, te2, _ = load_dataset("digits")
    assert (len(tr1), len(te1)) == (1437, 360)
    assert tr1.images.shape == (1437, 1, 8, 8) and tr1.images.dtype == torch.uint8
    assert torch.equal(tr1.images, tr2.images) and torch.equal(tr1.targets, tr2.targets)
    assert torch.equal(te1.targets, te2.targets)
    assert info.class_names == [str(i) for i in range(10)] and info.resolution == 8
    assert int(tr1.images.max()) == 255 and int(tr1.images.min()) == 0
    # stratified: every class in both splits, in proportion
    counts = torch.bincount(te1.targets, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


def test_digits_split_matches_sklearn_indices():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.images)), test_size=0.2, random_state=0, stratify=d.target)
    train, test, _ = load_dataset("digits")
    assert train.targets.tolist() == d.target[tr].tolist()
    assert test.targets.tolist() == d.target[te].tolist()
    # pixel values: 0..16 scaled to 0..255
    np.testing.assert_array_equal(train.images[:, 0].numpy(), np.round(d.images[tr] / 16 * 255).astype(np.uint8))


def test_digits_resolution_override():
    train, test, info = load_dataset("digits", resolution=16)
    assert train.images.shape[-2:] == (16, 16) and test.images.shape[-2:] == (16, 16)
    assert info.resolution == 16


def test_list_datasets_reports_digits_available():
    rows = {r["name"]: r for r in list_datasets()}
    assert {"digits", "fashion-mnist", "mnist", "imagefolder", "cifar10"} <= set(rows)
    assert rows["digits"]["available"] == "scikit-learn"
    assert rows["imagefolder"]["available"] is None  # no --data-root
    assert all(r["description"] for r in rows.values())


# ----------------------------------------------------------------------------- subsets
@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_subset_via_load_splits(tmp_path, suffix):
    full, _, _ = load_dataset("digits")
    idx = np.array([5, 0, 17, 1436, 3], dtype=np.int64)
    path = tmp_path / ("idx" + suffix)
    np.save(path, idx) if suffix == ".npy" else path.write_text("\n".join(map(str, idx)) + "\n")
    cfg = build_config(CommonConfig, dict(dataset="digits", subset=str(path)))
    train, test, info = load_splits(cfg)
    assert len(train) == 5 and len(test) == 360
    assert torch.equal(train.images, full.images[torch.from_numpy(idx)])
    assert torch.equal(train.targets, full.targets[torch.from_numpy(idx)])
    assert str(path) in info.source


@pytest.mark.parametrize("bad", [[0, 1437], [-1, 2], [[0, 1], [2, 3]]])
def test_subset_out_of_range_or_not_flat(tmp_path, bad):
    path = tmp_path / "bad.npy"
    np.save(path, np.array(bad, dtype=np.int64))
    cfg = build_config(CommonConfig, dict(dataset="digits", subset=str(path)))
    with pytest.raises(PrismError, match=r"\[0, 1437\)"):
        load_splits(cfg)


def test_subset_unreadable_file(tmp_path):
    path = tmp_path / "idx.txt"
    path.write_text("1\ntwo\n")
    cfg = build_config(CommonConfig, dict(dataset="digits", subset=str(path)))
    with pytest.raises(PrismError, match="cannot read indices"):
        load_splits(cfg)


# ----------------------------------------------------------------------------- imagefolder
def _png_tree(root, classes=("cat", "ant"), per_class=2, size=(20, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i}.png")
            (d / "notes.txt").write_text("not an image")  # ignored: not an image extension
    return root


def test_imagefolder_loads_sorted_classes(tmp_path):
    root = _png_tree(tmp_path / "tree")
    train, test, info = load_dataset("imagefolder", str(root), resolution=8)
    assert info.class_names == ["ant", "cat"]  # sorted by folder name, not creation order
    assert (info.channels, info.resolution) == (3, 8)
    assert len(train) == 4 and len(test) == 4
    assert train.targets.tolist() == [0, 0, 1, 1]
    x, y = train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(y) == 0
    assert "ant" in train.samples[0][0]
    assert train.get_images(torch.tensor([0, 3])).shape == (2, 3, 8, 8)
    assert D.DATASETS.get("imagefolder").available(str(root)) == str(root)


def test_imagefolder_resolution_inferred_or_given(tmp_path):
    root = _png_tree(tmp_path / "tree", per_class=1)  # 20 x 12 RGB: the shorter side, 12 px, is the default
    train, _, info = load_dataset("imagefolder", str(root))
    assert (info.channels, info.resolution) == (3, 12) and train[0][0].shape == (3, 12, 12)
    train, _, info = load_dataset("imagefolder", str(root), resolution=224)
    assert info.resolution == 224 and train[0][0].shape == (3, 224, 224)


def test_imagefolder_needs_root_and_splits(tmp_path):
    with pytest.raises(PrismError, match="--data-root"):
        load_dataset("imagefolder", None)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(PrismError, match="val/"):
        load_dataset("imagefolder", str(tmp_path))


def test_imagefolder_val_class_not_in_train(tmp_path):
    root = _png_tree(tmp_path / "tree")
    (root / "val" / "zebra").mkdir()
    with pytest.raises(PrismError, match="zebra"):
        load_dataset("imagefolder", str(root), resolution=8)


def test_corrupt_image_named_and_listed(tmp_path, cli, capsys):
    root = _png_tree(tmp_path / "tree")
    bad = root / "val" / "cat" / "cat_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(PrismError) as ei:  # decoding the split into its cache names the bad file
        load_dataset("imagefolder", str(root), resolution=8)
    assert str(bad) in str(ei.value) and "check-data" in str(ei.value)
    test = D.FolderImages([(str(bad), 0)], 8)  # the lazy path (PRISMDD_CACHE=off) names it too
    with pytest.raises(PrismError, match="check-data"):
        test[0]

    res = check_data("imagefolder", str(root), resolution=8)
    assert (res["train"], res["test"], res["classes"]) == (4, 4, 2)
    assert len(res["bad_files"]) == 1 and str(bad) in res["bad_files"][0]

    capsys.readouterr()
    assert cli(["check-data", "--dataset", "imagefolder", "--data-root", root, "--resolution", 8]) == 1
    out = capsys.readouterr().out
    assert "1 unreadable files" in out and str(bad) in out


def test_check_data_clean_dataset(cli, capsys):
    res = check_data("digits")
    assert res == {"dataset": "digits", "train": 1437, "test": 360, "classes": 10, "resolution": 8, "channels": 1,
                   "bad_files": [], "notes": []}
    assert cli(["check-data", "--dataset", "digits"]) == 0
    assert "0 unreadable files" in capsys.readouterr().out
