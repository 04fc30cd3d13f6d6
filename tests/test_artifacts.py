"""artifacts: the one resume guard over every record format, model cards, and the compatibility names."""
from __future__ import annotations

import json

import pytest
import torch

from prismdd.artifacts import load_distilled, reusable
from prismdd.core.config import build_config, config_hash
from prismdd.core.errors import PrismError
from prismdd.core.io import save_tensors, torch_save, write_json
from prismdd.pipeline import RunConfig
from prismdd.stages.relabel import RelabelConfig, relabel
from prismdd.stages.squeeze import SqueezeConfig


@pytest.mark.parametrize("kind", ["json", "pt", "safetensors"])
def test_resume_guard_reuses_matching_and_refuses_other_settings(tmp_path, kind):
    path = tmp_path / f"record.{kind}"
    assert reusable(path, "abc") is None  # nothing yet: make it
    if kind == "json":
        write_json(path, {"config_hash": "abc", "x": 1})
    elif kind == "pt":
        torch_save({"config_hash": "abc", "x": torch.ones(1)}, path)
    else:
        save_tensors({"x": torch.ones(1)}, path, metadata={"config_hash": "abc"})
    assert reusable(path, "abc")["config_hash"] == "abc"
    assert reusable(path, "other", force=True) is None  # --force: make it anew
    with pytest.raises(PrismError, match=r"other settings; use --force"):
        reusable(path, "other")


def test_config_hash_skips_fields_that_do_not_shape_results():
    a = build_config(SqueezeConfig, {"out": "a", "device": "cpu", "eval_every": 1, "channels_last": False})
    b = build_config(SqueezeConfig, {"out": "b", "device": "auto", "eval_every": 3, "channels_last": True})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(build_config(SqueezeConfig, {"lr": 0.1}))
    assert config_hash(a, arch="resnet18") == config_hash(build_config(SqueezeConfig, {"arch": "resnet18"}))


def test_presets_are_one_mechanism():
    quick = build_config(RunConfig, {"quick": True})
    assert (quick.teacher_steps, quick.iterations, quick.student_epochs) == (120, 60, 60)  # presets/run/quick.yaml
    assert build_config(RunConfig, {"quick": True, "iterations": 7}).iterations == 7  # what the user sets wins
    assert build_config(RunConfig, {}).iterations == 300


def test_relabel_refuses_labels_made_with_other_settings(prism_run, zoo, tmp_path):
    args = dict(dataset="digits", distilled=str(prism_run), teachers=str(zoo), epochs=2, out=str(tmp_path / "l"),
                device="cpu")
    relabel(build_config(RelabelConfig, args))
    with pytest.raises(PrismError, match="epoch_0000.safetensors: a label file made with other settings"):
        relabel(build_config(RelabelConfig, dict(args, topk=2)))
    relabel(build_config(RelabelConfig, dict(args, epochs=3)))  # more epochs extend the folder
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert m["outputs"]["epochs"] == 3 and m["config"]["dataset"] == "digits"


def test_relabel_records_the_distilled_sets_dataset(prism_run, zoo, tmp_path):
    """Without --dataset the config used to record the default (fashion-mnist) for a digits set."""
    relabel(build_config(RelabelConfig, dict(distilled=str(prism_run), teachers=str(zoo), epochs=1,
                                              out=str(tmp_path / "l"), device="cpu")))
    assert json.loads((tmp_path / "l" / "manifest.json").read_text())["config"]["dataset"] == "digits"


def test_distilled_set_exposes_recorded_starts(prism_run):
    ds = load_distilled(prism_run)
    starts = ds.start_indices
    assert len(starts) == len(ds) and all(isinstance(s, list) and len(s) == 1 for s in starts)


def test_a_different_dataset_than_the_distilled_folders_is_refused(prism_run, zoo, tmp_path):
    with pytest.raises(PrismError, match=r"--dataset fashion-mnist: .* was distilled from 'digits'"):
        relabel(build_config(RelabelConfig, dict(dataset="fashion-mnist", distilled=str(prism_run),
                                                  teachers=str(zoo), epochs=1, out=str(tmp_path / "l"))))
