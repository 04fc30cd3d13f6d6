"""The score artifact's one writer and one reader (artifacts/scores.py): kinds, shapes, seals, the wrong split."""
import pytest
import torch

from prismdd.artifacts import MANIFEST, SCORES_FILE, load_scores, save_scores, seal_files
from prismdd.core.errors import PrismError
from prismdd.core.io import write_json


def finished(folder, tensors):
    save_scores(folder, tensors)
    write_json(folder / MANIFEST, {"stage": "score", "outputs": {"files": seal_files(folder, [SCORES_FILE])}})


def test_round_trip_keeps_every_kind_and_casts_dtypes(tmp_path):
    t = {"targets": torch.tensor([0, 1, 1]), "embedding": torch.randn(3, 4, dtype=torch.float64),
         "entropy": torch.rand(3), "correct": torch.ones(2, 5, 3, dtype=torch.bool), "margin": torch.randn(2, 5, 3),
         "el2n": torch.rand(2, 3)}
    finished(tmp_path, t)
    s = load_scores(tmp_path, ["embedding", "dynamics"], targets=torch.tensor([0, 1, 1]))
    assert s.kinds == ["embedding", "entropy", "dynamics"]
    assert s.embedding.dtype == torch.float32 and torch.allclose(s.embedding, t["embedding"].float())
    assert s.correct.dtype == torch.uint8 and int(s.correct.sum()) == 30


def test_a_missing_kind_names_the_command_that_adds_it(tmp_path):
    finished(tmp_path, {"targets": torch.tensor([0, 1]), "embedding": torch.randn(2, 3)})
    with pytest.raises(PrismError, match=r"holds embedding scores, this needs dynamics.*--kinds embedding,dynamics"):
        load_scores(tmp_path, ["dynamics"])


def test_scores_of_another_split_are_refused(tmp_path):
    finished(tmp_path, {"targets": torch.tensor([0, 1]), "entropy": torch.rand(2)})
    with pytest.raises(PrismError, match="other data"):
        load_scores(tmp_path, ["entropy"], targets=torch.tensor([1, 0]))


def test_a_changed_file_is_refused_by_its_seal(tmp_path):
    finished(tmp_path, {"targets": torch.tensor([0, 1]), "entropy": torch.rand(2)})
    save_scores(tmp_path, {"targets": torch.tensor([0, 1]), "entropy": torch.rand(2)})  # rewritten behind the seal
    with pytest.raises(PrismError, match="changed since score wrote it"):
        load_scores(tmp_path, ["entropy"])


def test_wrong_shapes_and_partial_kinds_never_reach_disk(tmp_path):
    with pytest.raises(PrismError, match=r"embedding has shape \(3,\)"):
        save_scores(tmp_path, {"targets": torch.tensor([0, 1, 1]), "embedding": torch.randn(3)})
    with pytest.raises(ValueError, match="margin belong to no complete kind"):
        save_scores(tmp_path, {"targets": torch.tensor([0]), "margin": torch.randn(1, 1, 1)})
    assert not (tmp_path / SCORES_FILE).exists()


def test_no_folder_names_the_score_command(tmp_path):
    with pytest.raises(PrismError, match=r"--scores .*prismdd score --kinds entropy"):
        load_scores(tmp_path, ["entropy"])
