"""Issue 35, "nothing lost, nothing silent, third round": the hostile cases of that issue as tests.

Each destructive step must come after every check (a failed call leaves a finished set byte-identical), every file
a stage writes is sealed and checked, a failed call leaves nothing behind, and safetensors files honour the umask
and are byte-reproducible. RELIABILITY.md lists each case with its test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prismdd.artifacts import CARD, WEIGHTS, WEIGHTS_DIGEST
from prismdd.core.errors import PrismError
from prismdd.core.io import load_tensors, read_json, save_tensors, tensors_metadata, write_json
from prismdd.methods.frepo import LEARNED_LABELS, STATE_FILE
from prismdd.stages.recover import recover, recover_config
from prismdd.stages.validate import validate, validate_config

from conftest import TINY_RECOVER

FREPO = dict(dataset="digits", ipc=2, iterations=4, frepo_real_batch=32, frepo_width=0.25, frepo_pool=2,
             frepo_online_steps=4, device="cpu", seed=0)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): 'byte-identical after the failed call'."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prismdd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(recover_run, tmp_path_factory) -> Path:
    """A finished tiny PRISM set; tests copy it before they touch it."""
    return recover_run(tmp_path_factory.mktemp("finished") / "set")


@pytest.fixture(scope="module")
def frepo_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frepo") / "set"
    return recover(recover_config("frepo", **dict(FREPO, out=str(out))))


# ----------------------------------------------------------------------------- 1. nothing destroyed before the checks
@pytest.mark.parametrize("method, option", [("t2i", "--t2i-model"), ("d4m", "--d4m-model")])
def test_force_with_an_unusable_model_leaves_the_finished_set(finished, zoo, tmp_path, cli, capsys, method, option):
    """recover --force --method t2i/d4m used to clear the set and then check the model: now the model is loaded (or
    refused) first, and the finished set is byte-identical after the failed call."""
    out = tmp_path / "set"
    shutil.copytree(finished, out)
    before = snapshot(out)
    code = cli(["recover", "--method", method, "--dataset", "digits", "--ipc", 2, "--teachers", zoo, "--out", out,
                "--device", "cpu", "--force", option, tmp_path / "missing"])
    one_line(capsys, code, option)
    assert snapshot(out) == before


@pytest.mark.parametrize("method, option", [("t2i", "--t2i-model"), ("d4m", "--d4m-model")])
def test_failed_model_check_leaves_no_file_and_the_next_recover_runs(zoo, recover_run, tmp_path, cli, capsys, method,
                                                                     option):
    """A failed t2i/d4m call used to leave inputs.json ({}) and an empty logs/, and the next recover into that folder
    was refused ('teacher convnet is new'). Into a new folder it leaves no folder; into an existing one, no file."""
    fresh, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    for out in (fresh, existing):
        code = cli(["recover", "--method", method, "--dataset", "digits", "--ipc", 2, "--teachers", zoo, "--out",
                    out, "--device", "cpu", option, tmp_path / "missing"])
        one_line(capsys, code, option)
    assert not fresh.exists() and list(existing.iterdir()) == []
    recover_run(existing)  # not refused
    assert read_json(existing / "manifest.json")["stage"] == "recover"


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def rgb_set(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, teachers, finished set) of a 10-class 32 px RGB ImageFolder DD-Ranking knows as CIFAR10."""
    root = tmp_path_factory.mktemp("rgb")
    data = root / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in range(10):
            d = data / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    from prismdd.cli import main

    common = ["--dataset", "imagefolder", "--data-root", str(data), "--device", "cpu"]
    assert main(["squeeze", *common, "--arch", "convnet", "--width", "1", "--epochs", "1", "--batch-size", "40",
                 "--out", str(root / "zoo")]) in (0, None)
    assert main(["recover", *common, "--method", "sre2l", "--teachers", str(root / "zoo"), "--ipc", "1",
                 "--iterations", "1", "--batch-size", "10", "--out", str(root / "set")]) in (0, None)
    return data, root / "zoo", root / "set"


def test_export_refuses_an_out_that_is_holds_or_is_inside_its_source(rgb_set, tmp_path, cli, capsys):
    """export --force --out <the set> (or a parent of it) used to delete the set, then fail on its first image."""
    _, zoo, finished = rgb_set
    src = tmp_path / "runs" / "set"
    shutil.copytree(finished, src)
    before = snapshot(src)
    for out, where in ((src, "is the distilled folder"), (src.parent, "contains the distilled folder"),
                       (src / "images" / "x", "is inside the distilled folder")):
        code = cli(["export", src, "--as-dataset", "CIFAR10", "--teachers", zoo, "--out", out, "--force"])
        one_line(capsys, code, f"--out {out}: {where}")
        assert snapshot(src) == before
    assert not (src / "images" / "x").exists()


def test_export_force_replaces_only_what_an_export_writes(rgb_set, tmp_path, cli, capsys):
    _, zoo, src = rgb_set
    out = tmp_path / "export"
    args = ["export", src, "--as-dataset", "CIFAR10", "--teachers", zoo, "--out", out]
    assert cli(args) == 0
    written = snapshot(out)
    shutil.copyfile(out / "teachers/CIFAR10/ConvNet-3-BN/ckpt_best.pt", zoo.parent / "first.pt")
    (out / "notes.txt").write_text("mine")
    (out / "images" / "stale.png").write_bytes(b"x")  # inside a folder an export writes: goes
    assert cli(args) == 2  # not empty, no --force
    assert cli(args + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    now = snapshot(out)
    assert now.keys() == {*written, "notes.txt"}
    # torch.save names its zip records after the (temporary) file, so the checkpoint is compared by content
    pt = "teachers/CIFAR10/ConvNet-3-BN/ckpt_best.pt"
    assert all(now[k] == v for k, v in written.items() if k != pt)
    a, b = torch.load(out / pt, weights_only=True), torch.load(zoo.parent / "first.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".export-tmp")]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # the folder has the umask's mode


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ----------------------------------------------------------------------------- 2. learned labels sealed
def test_learned_labels_are_sealed_and_checked(frepo_set, tmp_path, cli, capsys):
    """Labels shifted by one class used to train to chance with exit status 0: the manifest seals them and both the
    reader (validate) and a re-run of recover refuse a changed file in one line."""
    out = tmp_path / "set"
    shutil.copytree(frepo_set, out)
    files = read_json(out / "manifest.json")["outputs"]["files"]
    assert set(files) == {LEARNED_LABELS, STATE_FILE}
    d = load_tensors(out / LEARNED_LABELS)
    save_tensors({**d, "labels": d["labels"].roll(1, dims=1)}, out / LEARNED_LABELS,
                 metadata=tensors_metadata(out / LEARNED_LABELS))
    code = cli(["validate", "--protocol", "frepo", "--distilled", out, "--epochs", 1, "--student-width", 0.25,
                "--device", "cpu", "--out", tmp_path / "v"])
    one_line(capsys, code, str(out / LEARNED_LABELS), "changed since recover wrote it")
    with pytest.raises(PrismError, match="changed since recover wrote it"):
        recover(recover_config("frepo", **dict(FREPO, out=str(out))))


def test_deleted_learned_labels_refused_then_remade_by_a_rerun(frepo_set, tmp_path, cli, capsys):
    """With the file deleted, validate used to regress one-hot labels and report it as the FRePo result, and a re-run
    of recover reported the folder finished. Now validate refuses, and the re-run makes the same file again."""
    out = tmp_path / "set"
    shutil.copytree(frepo_set, out)
    (out / LEARNED_LABELS).unlink()
    code = cli(["validate", "--protocol", "frepo", "--distilled", out, "--epochs", 1, "--student-width", 0.25,
                "--device", "cpu", "--out", tmp_path / "v"])
    one_line(capsys, code, str(out / LEARNED_LABELS), "missing", "re-run the recover command")
    recover(recover_config("frepo", **dict(FREPO, out=str(out))))
    assert (out / LEARNED_LABELS).read_bytes() == (frepo_set / LEARNED_LABELS).read_bytes()
    assert snapshot(out / "images") == snapshot(frepo_set / "images")
    m, ref = read_json(out / "manifest.json"), read_json(frepo_set / "manifest.json")
    assert m["outputs"]["files"] == ref["outputs"]["files"]
    assert m["outputs"]["batches"][0]["final_losses"] == ref["outputs"]["batches"][0]["final_losses"]


def test_force_with_another_method_removes_the_frepo_files(frepo_set, zoo, tmp_path, capsys):
    """recover --force --method prism into a former FRePo folder kept its learned labels, and validate then trained
    the new images on them; now every file the old method wrote goes."""
    out = tmp_path / "set"
    shutil.copytree(frepo_set, out)
    recover(recover_config("prism", **dict(TINY_RECOVER, teachers=str(zoo), out=str(out), force=True)))
    for name in (LEARNED_LABELS, STATE_FILE, "logs/frepo.jsonl"):
        assert not (out / name).exists(), name
    validate(validate_config("frepo", distilled=str(out), epochs=1, student_width=0.25, device="cpu",
                             out=str(tmp_path / "v")))
    assert "learned labels of" not in capsys.readouterr().out
    assert read_json(tmp_path / "v" / "accuracy.json")["protocol"]["soft_labels"] == "centred one-hot"


# ----------------------------------------------------------------------------- 3. squeeze checks the weights
@pytest.mark.parametrize("damage", ["truncated", "deleted", "changed", "no digest"])
def test_squeeze_retrains_a_teacher_whose_weights_are_damaged(zoo, tmp_path, cli, capsys, damage):
    """A finished card with truncated or deleted weights used to be 'finished teacher found, skipping' (rc 0)."""
    out = tmp_path / "zoo"
    shutil.copytree(zoo, out)
    w = out / "convnet" / WEIGHTS
    good = w.read_bytes()
    if damage == "truncated":
        w.write_bytes(good[: len(good) // 2])
    elif damage == "deleted":
        w.unlink()
    elif damage == "no digest":  # a card save_model did not write: its weights cannot be vouched for
        card = read_json(out / "convnet" / CARD)
        del card[WEIGHTS_DIGEST]
        write_json(out / "convnet" / CARD, card)
    else:
        d = load_tensors(w)
        save_tensors({k: v + 1 if v.is_floating_point() else v for k, v in d.items()}, w)
    capsys.readouterr()
    assert cli(["squeeze", "--dataset", "digits", "--arch", "convnet", "--width", 0.25, "--epochs", 2,
                "--batch-size", 256, "--device", "cpu", "--out", out]) == 0
    said = capsys.readouterr().out
    assert "training the teacher again" in said and "skipping" not in said, said
    assert w.read_bytes() == good  # the same seeded training: the same weights again
    assert read_json(out / "convnet" / CARD)[WEIGHTS_DIGEST] == read_json(zoo / "convnet" / CARD)[WEIGHTS_DIGEST]


# ----------------------------------------------------------------------------- 4. safetensors files
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_safetensors_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_tensors({"x": torch.zeros(3)}, tmp_path / "a.safetensors", metadata={"k": "v"})
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == mode


WRITE = textwrap.dedent("""
    import sys, torch
    from prismdd.core.io import save_tensors
    t = {f"t{i}": torch.arange(i + 3, dtype=torch.float16 if i % 2 else torch.float32) for i in range(6)}
    save_tensors(t, sys.argv[1], metadata={f"key{i}": str(i) * i for i in range(12)})
""")


@pytest.mark.slow
def test_safetensors_files_are_byte_reproducible_across_processes(tmp_path):
    """The header's metadata came out in a per-process hash order: the same labels had other bytes (and digests)."""
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]  # 12 keys: two processes hash them alike 1 in 12!
    for p in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(p)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    data = [p.read_bytes() for p in paths]
    assert all(d == data[0] for d in data)
    n = int.from_bytes(data[0][:8], "little")
    assert n % 8 == 0
    header = json.loads(data[0][8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert tensors_metadata(paths[0]) == {f"key{i}": str(i) * i for i in range(12)}
    assert torch.equal(load_tensors(paths[0])["t4"], torch.arange(7, dtype=torch.float32))


# ----------------------------------------------------------------------------- 5. options checked whatever sets them
@pytest.mark.parametrize("k, why", [(3, "does not split into 3 equal parts"), (1000, "does not split into 1000"),
                                    (20, "20 passes of 1 image")])
def test_grad_accum_checked_against_the_automatic_batch(finished, zoo, tmp_path, cli, capsys, k, why):
    """--grad-accum 3 with the automatic batch size (20 images here) ran parts of 7/7/6; 20 ran one-image passes
    through train-mode BatchNorm. The same was already refused with an explicit --batch-size."""
    out = tmp_path / "v"
    code = cli(["validate", "--distilled", finished, "--teachers", zoo, "--grad-accum", k, "--epochs", 1,
                "--student-width", 0.25, "--device", "cpu", "--out", out])
    one_line(capsys, code, f"--grad-accum {k}: the batch of 20 images (--batch-rule seed", why)
    assert not out.exists()


@pytest.mark.parametrize("value, needle", [(150, "at most 100"), (0.9, "multiply it by 100 (--full-top1 90)"),
                                           (1, "multiply it by 100"), (5, "at or below chance (10.00 %")])
def test_full_top1_is_a_percentage_above_chance(finished, zoo, tmp_path, cli, capsys, value, needle):
    out = tmp_path / "v"
    code = cli(["validate", "--distilled", finished, "--teachers", zoo, "--full-top1", value, "--epochs", 1,
                "--student-width", 0.25, "--device", "cpu", "--out", out])
    one_line(capsys, code, f"--full-top1 {value}", needle)
    assert not out.exists()


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["class linked to the root", "sub-folder linked to its class", "link outside"])
def test_symlink_loops_and_links_out_of_the_root_are_refused(tmp_path, cli, capsys, case):
    """A class folder linked to the dataset root put every val/ image into training as that class, and check-data
    counted them without a word."""
    root = _folder(tmp_path / "data")
    if case == "class linked to the root":
        (root / "train" / "c").symlink_to(root, target_is_directory=True)
        (root / "val" / "c").mkdir()
        needle = "a symlink loop"
    elif case == "sub-folder linked to its class":
        (root / "train" / "a" / "more").symlink_to(root / "train" / "a", target_is_directory=True)
        needle = "a symlink loop"
    else:
        _folder(tmp_path / "elsewhere")
        (root / "train" / "c").symlink_to(tmp_path / "elsewhere" / "train" / "a", target_is_directory=True)
        (root / "val" / "c").symlink_to(tmp_path / "elsewhere" / "val" / "a", target_is_directory=True)
        needle = "outside the data root"
    code = cli(["check-data", "--dataset", "imagefolder", "--data-root", root])
    one_line(capsys, code, needle)
    from prismdd.core.data import load_dataset

    with pytest.raises(PrismError, match=needle):
        load_dataset("imagefolder", str(root))


def test_a_link_inside_the_root_is_followed(tmp_path):
    """The checks refuse loops and links out, nothing else: a class folder linked to a folder inside the root loads."""
    root = _folder(tmp_path / "data")
    shutil.move(root / "train" / "b", root / "store_b")
    (root / "train" / "b").symlink_to(root / "store_b", target_is_directory=True)
    from prismdd.core.data import check_data

    assert check_data("imagefolder", str(root))["train"] == 4


@pytest.mark.parametrize("overrides, needle", [
    (dict(multires_step=2), "--multires-step 2: only --param multires uses it"),
    (dict(multires_optimizer="sgd"), "--multires-optimizer sgd: only --param multires uses it"),
    (dict(clip_weight=2.0), "--clip-weight 2.0: weighs the CLIP prior, and no --clip-prior is given"),
    (dict(min_rounds=2), "--min-rounds 2: only --budget rounds (DELT) draws round counts"),
    (dict(budget="rounds", iterations=8, early_late_step=0.25, min_rounds=5), "--min-rounds 5: above the 4 rounds"),
    (dict(frepo_lr_floor=5.0), "--frepo-lr-floor 5.0: the factor the cosine falls to from 1")])
def test_options_that_change_nothing_are_refused(overrides, needle):
    with pytest.raises(PrismError) as err:
        recover_config("sre2l", **dict(TINY_RECOVER, **overrides))
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)
    recover_config("delt", **dict(TINY_RECOVER, budget="rounds", iterations=8, early_late_step=0.25, min_rounds=4))


def test_frepo_refusal_of_engine_options_says_what_frepo_does(tmp_path):
    """The refusal said FRePo 'does not optimise pixels'; it does, in a loop of its own."""
    with pytest.raises(PrismError, match=r"^--view-noise 0.2: --method frepo optimises its pixels in its own loop, "
                                         r"not with recover's engine"):
        recover(recover_config("frepo", **dict(FREPO, out=str(tmp_path / "f"), view_noise=0.2)))


def test_squeeze_says_when_a_teacher_ends_at_chance(tmp_path, capsys, monkeypatch):
    from prismdd.core.config import build_config
    from prismdd.stages import squeeze as sq

    monkeypatch.setattr(sq, "fit", lambda *a, **k: {"final": {"top1": 10.0, "top5": 50.0}, "seconds": 0.0})
    sq.squeeze(build_config(sq.SqueezeConfig, dict(dataset="digits", arch="convnet", width=0.25, epochs=1,
                                                   out=str(tmp_path / "t"), device="cpu")))
    assert "convnet: note: test top-1 10.00% is at chance level (10.0% for 10 classes)" in capsys.readouterr().out


def test_export_of_a_frepo_set_says_it_drops_the_learned_labels(rgb_set, tmp_path, capsys):
    data, zoo, _ = rgb_set
    src = recover(recover_config("frepo", **dict(FREPO, dataset="imagefolder", data_root=str(data), ipc=1,
                                                 iterations=2, frepo_real_batch=8, out=str(tmp_path / "f"))))
    from prismdd.export import ExportConfig, export

    capsys.readouterr()
    export(ExportConfig(distilled=str(src), as_dataset="CIFAR10", teachers=str(zoo), out=str(tmp_path / "x")))
    assert f"its learned labels ({LEARNED_LABELS}) are not exported" in capsys.readouterr().out
    assert not (tmp_path / "x" / LEARNED_LABELS).exists()


def test_stored_labels_record_how_they_were_made(finished, zoo, tmp_path, cli, capsys):
    """relabel with the primary alone, by mean (what relabel without --protocol did before its default became
    validate's); validate --labels (protocol prism) recorded label_teachers primary,pool and ensemble norm-matched.
    Now the difference is said once and the record is true."""
    labels = tmp_path / "labels"
    assert cli(["relabel", "--distilled", finished, "--teachers", zoo, "--epochs", 1, "--out", labels,
                "--label-teachers", "primary", "--ensemble", "mean", "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "v"
    assert cli(["validate", "--distilled", finished, "--labels", labels, "--epochs", 1, "--student-width", 0.25,
                "--device", "cpu", "--out", out]) == 0
    said = capsys.readouterr().out
    assert (f"the labels in {labels} were made by teachers convnet with ensemble mean; --protocol prism labels with "
            f"primary,pool and norm-matched") in said, said
    assert "relabel --protocol prism" in said
    proto = read_json(out / "accuracy.json")["protocol"]
    assert (proto["label_teachers"], proto["ensemble"]) == (["convnet"], "mean")
    made_by = read_json(out / "manifest.json")["inputs"]["labels_made_by"]
    assert (made_by["label_teachers"], made_by["ensemble"]) == (["convnet"], "mean")
    # relabel's default protocol is validate's (prism): its labels are the protocol's, nothing to say, the record
    # names its teachers
    capsys.readouterr()
    assert cli(["relabel", "--distilled", finished, "--teachers", zoo, "--epochs", 1,
                "--out", tmp_path / "labels-prism", "--device", "cpu"]) == 0
    assert cli(["validate", "--distilled", finished, "--labels", tmp_path / "labels-prism", "--epochs", 1,
                "--student-width", 0.25, "--device", "cpu", "--out", tmp_path / "v2"]) == 0
    assert "note: the labels in" not in capsys.readouterr().out
    proto = read_json(tmp_path / "v2" / "accuracy.json")["protocol"]
    assert proto["ensemble"] == "norm-matched" and len(proto["label_teachers"]) == 3


def test_changed_label_file_refused_by_validate_and_by_a_relabel_rerun(finished, zoo, tmp_path, cli, capsys):
    """relabel's manifest seals every epoch file: other logits under the same header are refused, not trained on."""
    labels = tmp_path / "labels"
    args = ["relabel", "--distilled", finished, "--teachers", zoo, "--epochs", 2, "--out", labels, "--device", "cpu"]
    assert cli(args) == 0
    assert set(read_json(labels / "manifest.json")["outputs"]["files"]) == {"epoch_0000.safetensors",
                                                                            "epoch_0001.safetensors"}
    path = labels / "epoch_0001.safetensors"
    d = load_tensors(path)
    save_tensors({**d, "logits": d["logits"].roll(1, dims=1)}, path, metadata=tensors_metadata(path))
    capsys.readouterr()
    code = cli(["validate", "--distilled", finished, "--labels", labels, "--epochs", 2, "--student-width", 0.25,
                "--device", "cpu", "--out", tmp_path / "v"])
    one_line(capsys, code, str(path), "changed since relabel wrote it")
    one_line(capsys, cli(args), str(path), "changed since relabel wrote it", "re-run the relabel command")


def test_relabel_force_with_a_bad_input_keeps_the_finished_labels(finished, zoo, tmp_path, cli, capsys):
    """relabel --force cleared its epoch files before it read --distilled: a typo there cost the labels."""
    labels = tmp_path / "labels"
    assert cli(["relabel", "--distilled", finished, "--teachers", zoo, "--epochs", 1, "--out", labels,
                "--device", "cpu"]) == 0
    before = snapshot(labels)
    capsys.readouterr()
    for bad in (["--distilled", tmp_path / "missing", "--teachers", zoo],
                ["--distilled", finished, "--teachers", zoo, "--label-teachers", "vgg99"]):
        code = cli(["relabel", *bad, "--epochs", 1, "--out", labels, "--device", "cpu", "--force"])
        one_line(capsys, code)
        assert snapshot(labels) == before
