"""Label sources (methods/labels.py): validate finds and reads label vectors a method wrote beside its images through
the registry, never by the method's name. A source of the test's own, registered for one test, is found, read,
recorded and refused exactly as FRePo's learned labels are (tests/stages/test_frepo.py and
tests/jobs/test_faults_round3.py hold FRePo's cases)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from prismdd.artifacts import MANIFEST, DistilledSet, centred_onehot, load_distilled
from prismdd.core.errors import PrismError
from prismdd.core.io import load_tensors, read_json, save_tensors, write_json
from prismdd.methods import LABEL_SOURCES, LabelSource, label_source, sources_text
from prismdd.methods.frepo import LEARNED, LEARNED_LABELS
from prismdd.stages.validate import validate, validate_config


class TinyVectors(LabelSource):
    file = "tiny_vectors.safetensors"
    what = "tiny vectors"
    method = "Tiny"
    writer = "a test"
    loss = "mse"
    protocol = "frepo"
    reads: list = []

    def made(self, manifest: dict) -> bool:
        return (manifest.get("config") or {}).get("tiny") is True

    def read(self, folder, ds: DistilledSet) -> torch.Tensor:
        self.reads.append(Path(folder))
        return load_tensors(Path(folder) / self.file)["labels"]


@pytest.fixture
def tiny(monkeypatch):
    """TinyVectors registered beside FRePo's source for one test (the registry's own dict, restored after)."""
    source = TinyVectors()
    source.reads = []
    monkeypatch.setattr(LABEL_SOURCES, "_items", {**LABEL_SOURCES._items, "tiny": source})
    return source


@pytest.fixture
def tiny_set(prism_run, tmp_path) -> Path:
    """A copy of the session's PRISM set with tiny vectors: twice the centred one-hot labels."""
    folder = tmp_path / "set"
    shutil.copytree(prism_run, folder)
    ds = load_distilled(folder)
    save_tensors({"labels": 2 * centred_onehot(ds.targets, ds.info.num_classes)}, folder / TinyVectors.file)
    return folder


def test_frepo_registers_its_learned_labels():
    assert LABEL_SOURCES.get("frepo") is LEARNED
    assert (LEARNED.file, LEARNED.loss, LEARNED.protocol) == (LEARNED_LABELS, "mse", "frepo")
    assert sources_text("mse") == f"learned labels ({LEARNED_LABELS}, written by recover --method frepo)"


def test_the_registry_answers_for_a_folder(tiny, tiny_set, prism_run):
    assert label_source(tiny_set) is tiny
    assert label_source(tiny_set, loss="kl") is None  # asked for another loss's vectors: none
    assert label_source(prism_run) is None
    assert sources_text("mse").endswith(" or tiny vectors (tiny_vectors.safetensors, written by a test)")


def test_validate_trains_on_a_registered_source(tiny, tiny_set, tmp_path, capsys):
    """--protocol frepo (loss mse) on a folder whose vectors no FRePo code knows: found, read, recorded."""
    validate(validate_config("frepo", distilled=str(tiny_set), epochs=1, student_width=0.25, device="cpu",
                             out=str(tmp_path / "v")))
    assert f"training on the tiny vectors of {tiny_set}" in capsys.readouterr().out
    assert tiny.reads == [tiny_set]
    assert read_json(tmp_path / "v" / "accuracy.json")["protocol"]["soft_labels"] == f"learned:{tiny_set}"
    digest = hashlib.sha256((tiny_set / TinyVectors.file).read_bytes()).hexdigest()
    assert read_json(tmp_path / "v" / MANIFEST)["inputs"]["digests"]["tiny vectors"] == digest


def test_a_registered_source_refuses_another_loss_and_a_lost_file(tiny, tiny_set, tmp_path):
    with pytest.raises(PrismError, match=r"holds tiny vectors \(tiny_vectors.safetensors\); they train with --loss "
                                         r"mse \(or --protocol frepo\)"):
        validate(validate_config("frepo", distilled=str(tiny_set), labels=str(tiny_set), loss="mse+ce",
                                 epochs=1, student_width=0.25, device="cpu", out=str(tmp_path / "v")))
    m = read_json(tiny_set / MANIFEST)
    write_json(tiny_set / MANIFEST, {**m, "config": {**m["config"], "tiny": True}})
    (tiny_set / TinyVectors.file).unlink()
    with pytest.raises(PrismError, match="tiny_vectors.safetensors: missing: .* is a Tiny set and its tiny vectors "
                                         "were deleted"):
        label_source(tiny_set)
