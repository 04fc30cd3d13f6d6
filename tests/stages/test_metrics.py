"""metrics: the cosine statistics on hand-made features, the seeded real reference, the 2-D embedding, the
observer-in-synthesis guard, and the stage end to end on a tiny digits run (zoo -> recover -> metrics -> report)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from prismdd.core.config import build_config, config_to_dict
from prismdd.core.data import DatasetInfo, TensorImages, load_dataset
from prismdd.stages.metrics import MetricsConfig, check_observer, diversity_from_features, embed_2d, embedding, feature_diversity, metrics, random_real_reference
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json

# mean 0, std 1: normalize(x) = x / 255, so the fake observer's features are the pixels / 255
FAKE_INFO = DatasetInfo("fake", ["a", "b", "c"], 1, 2, (0.0,), (1.0,))


class FlatNet(nn.Module):
    """Penultimate features = the flattened (normalised) image; the features are set by the pixels."""

    def __init__(self, dim: int = 4, num_classes: int = 3):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(x.flatten(1))


def _img(*pixels) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.uint8).view(1, 2, 2)


# ----------------------------------------------------------------------------- the math
def test_identical_images_have_cosine_one_and_orthogonal_features_zero():
    e = [_img(255, 0, 0, 0), _img(0, 255, 0, 0), _img(0, 0, 255, 0), _img(0, 0, 0, 255)]
    images = torch.stack([e[0], e[0], e[1], e[2]])  # class 0: identical; class 1: orthogonal pair
    targets = torch.tensor([0, 0, 1, 1])
    model = FlatNet().train()
    res = feature_diversity(images, targets, FAKE_INFO, model, "cpu")
    assert model.training, "the observer's mode must be restored"
    per = {e["class"]: e for e in res["per_class"]}
    assert per[0]["intra_class_cos"] == pytest.approx(1.0)
    assert per[1]["intra_class_cos"] == pytest.approx(0.0, abs=1e-9)
    assert res["intra_class_cos"] == pytest.approx(0.5)
    # class means: e0 and (e1 + e2) / 2 are orthogonal; class 2 has no images and is left out
    assert res["inter_class_cos"] == pytest.approx(0.0, abs=1e-9)
    assert res["n_per_class"] == [2, 2, 0]
    assert per[2]["intra_class_cos"] is None and any("class 2" in n for n in res["notes"])
    assert res["num_images"] == 4 and res["feature_dim"] == 4


def test_cosines_match_a_brute_force_computation():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 16, generator=gen)
    targets = torch.arange(30) % 3
    targets[-1] = 2
    res = diversity_from_features(feats, targets, 4)
    f = feats.numpy()
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    intra = []
    for c in range(3):
        u = unit[targets.numpy() == c]
        pairs = [u[i] @ u[j] for i in range(len(u)) for j in range(len(u)) if i != j]
        intra.append(np.mean(pairs))
        assert res["per_class"][c]["intra_class_cos"] == pytest.approx(intra[-1])
    assert res["intra_class_cos"] == pytest.approx(np.mean(intra))
    means = np.stack([f[targets.numpy() == c].mean(0) for c in range(3)])
    mu = means / np.linalg.norm(means, axis=1, keepdims=True)
    pairs = [mu[i] @ mu[j] for i in range(3) for j in range(3) if i != j]
    assert res["inter_class_cos"] == pytest.approx(np.mean(pairs))
    assert res["n_per_class"] == [10, 10, 10, 0]


def test_a_class_with_one_image_is_skipped_with_a_note():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = diversity_from_features(feats, torch.tensor([0, 0, 1]), 2)
    assert res["intra_class_cos"] == pytest.approx(1.0)  # only class 0 counts
    assert res["per_class"][1]["intra_class_cos"] is None
    assert any("class 1" in n and "1 image" in n for n in res["notes"])
    assert res["inter_class_cos"] == pytest.approx(0.0)


def test_feature_diversity_uses_eval_mode_so_batch_mates_do_not_matter():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 1, 2, 2), generator=gen, dtype=torch.uint8)
    targets = torch.tensor([0, 0, 0, 1, 1, 1])

    class BNFeat(nn.Module):  # features after a BatchNorm: batch statistics would change them in train mode
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.bn(x.flatten(1)) + 3.0)

    model = BNFeat().train()
    full = feature_diversity(images, targets, FAKE_INFO, model, "cpu")
    part = feature_diversity(images[:3], targets[:3], FAKE_INFO, model, "cpu")
    assert part["per_class"][0]["intra_class_cos"] == pytest.approx(full["per_class"][0]["intra_class_cos"])


# ----------------------------------------------------------------------------- reference and embedding
def test_random_real_reference_is_seeded_and_has_ipc_per_class():
    train, _, info = load_dataset("digits")
    a = random_real_reference(train, info.num_classes, 3, seed=5)
    b = random_real_reference(train, info.num_classes, 3, seed=5)
    c = random_real_reference(train, info.num_classes, 3, seed=6)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert torch.bincount(a.targets, minlength=10).tolist() == [3] * 10
    assert torch.equal(a.images, train.images[a.indices]) and torch.equal(a.targets, train.targets[a.indices])
    assert len(set(a.indices.tolist())) == 30
    # a larger IPC extends the subset, and the draw is the random-real student baseline's own
    assert set(a.indices.tolist()) <= set(random_real_reference(train, 10, 5, seed=5).indices.tolist())
    from prismdd.core.data import random_real_indices as random_real_subset

    assert torch.equal(a.indices, random_real_subset(train, 10, 3, 5))


def test_random_real_reference_refuses_an_ipc_larger_than_a_class():
    split = TensorImages(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1]))
    with pytest.raises(PrismError, match="class 1 has only 2"):  # validate's message
        random_real_reference(split, 2, 3, seed=0)


def test_embed_2d_picks_a_method_for_the_size():
    gen = np.random.default_rng(0)
    pts, method = embed_2d(gen.normal(size=(3, 7)), seed=0)
    assert method == "pca" and pts.shape == (3, 2)
    pts, method = embed_2d(gen.normal(size=(24, 70)), seed=0)
    assert method in ("umap", "tsne") and pts.shape == (24, 2) and np.isfinite(pts).all()
    same, method = embed_2d(np.ones((24, 70)), seed=0)  # a collapsed observer: every feature identical
    assert np.isfinite(same).all() and same.shape == (24, 2) and method.startswith("none")
    assert embed_2d(np.zeros((0, 5)), seed=0)[0].shape == (0, 2)


def test_embedding_schema_and_subsampling():
    f = torch.randn(12, 5)
    t = torch.arange(12) % 3
    emb = embedding({"real": (f, t), "prism": (f[:6], t[:6])}, seed=0, max_per_set=8)
    assert emb["labels"] == ["real"] * 8 + ["prism"] * 6
    assert len(emb["points"]) == len(emb["classes"]) == 14
    assert all(len(p) == 2 for p in emb["points"])


def test_observer_that_took_part_in_synthesis_is_refused():
    manifest = {"inputs": {"teachers": {"convnet": {"role": "primary"}, "resnet18": {"role": "bn"}}}}
    with pytest.raises(PrismError, match="misleading diversity probe"):
        check_observer("resnet18", manifest, "runs/prism")
    check_observer("mobilenet_v2", manifest, "runs/prism")  # an outsider is fine
    check_observer("resnet18", {"inputs": {}}, "runs/random")  # a set without teachers (random real) too


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real tiny run: a 2-teacher zoo and an outside observer on digits, then PRISM recovery at IPC 2."""
    from prismdd.stages.recover import recover, recover_config
    from prismdd.stages.squeeze import SqueezeConfig, squeeze

    tmp = tmp_path_factory.mktemp("tiny")
    squeeze(build_config(SqueezeConfig, dict(dataset="digits", arch="convnet,resnet18", width=0.25, epochs=1,
                                             out=str(tmp / "t"), device="cpu")))
    squeeze(build_config(SqueezeConfig, dict(dataset="digits", arch="mobilenet_v2", width=0.25, epochs=1,
                                             out=str(tmp / "o"), device="cpu")))
    recover(recover_config("prism", dataset="digits", teachers=str(tmp / "t"), out=str(tmp / "r"), ipc=2,
                           iterations=3, batch_size=20, device="cpu"))
    return tmp


def test_metrics_stage_end_to_end(tiny_run, capsys):
    tmp = tiny_run
    cfg = build_config(MetricsConfig, dict(distilled=str(tmp / "r"), observer=str(tmp / "o"), out=str(tmp / "m"),
                                           device="cpu", random_ipc_seed=3))
    res = metrics(cfg)
    assert set(res["sets"]) == {"prism", "random-real"}
    for name, s in res["sets"].items():
        assert s["n_per_class"] == [2] * 10 and s["num_images"] == 20 and s["ipc"] == 2
        assert -1 - 1e-6 <= s["intra_class_cos"] <= 1 + 1e-6
        assert len(s["per_class"]) == 10
    assert res["sets"]["prism"]["folder"] == str(tmp / "r")
    assert res["observer"]["arch"] == "mobilenet_v2"
    ref = res["sets"]["random-real"]
    train, _, _ = load_dataset("digits")
    assert ref["train_indices"] == random_real_reference(train, 10, 2, seed=3).indices.tolist()
    emb = res["embedding"]
    assert emb["labels"] == ["real"] * 20 + ["prism"] * 20 and len(emb["points"]) == 40
    on_disk = read_json(tmp / "m" / "metrics.json")
    assert on_disk["sets"]["prism"]["intra_class_cos"] == pytest.approx(res["sets"]["prism"]["intra_class_cos"])
    manifest = read_json(tmp / "m" / "manifest.json")
    assert manifest["stage"] == "metrics" and manifest["inputs"]["observer"]["arch"] == "mobilenet_v2"
    assert (tmp / "m" / "config.yaml").exists()
    assert manifest["config"]["dataset"] == "digits"  # the sets' dataset, not the CLI default
    if res["observer"]["test_top1"] < 20.0:  # 1 epoch of a width-0.25 MobileNet-V2 on 8 px digits: near chance
        assert any("chance" in w for w in res["warnings"])
    out = capsys.readouterr().out
    assert "prism" in out and "random-real" in out and "intra-class cos" in out

    # the metrics feed the report unchanged (real distilled folder -> image grid)
    from prismdd.report import write_report

    s = res["sets"]["prism"]
    html = write_report(tmp / "rep", {
        "dataset": "digits", "ipc": 2, "student": "convnet", "protocol": "test", "date": "now", "command": "pytest",
        "rows": [{"method": "prism", "top1": None, "intra_class_cos": s["intra_class_cos"],
                  "inter_class_cos": s["inter_class_cos"], "images": s["num_images"], "distilled": s["folder"]}],
        "embedding": res["embedding"], "config": config_to_dict(cfg)}).read_text()
    assert f"{s['intra_class_cos']:.4f}" in html
    for fig in ("grid_prism.png", "embedding.png"):
        assert (tmp / "rep" / "figures" / fig).exists()


def test_metrics_refuses_a_synthesis_teacher_as_observer(tiny_run):
    cfg = build_config(MetricsConfig, dict(distilled=str(tiny_run / "r"), observer=str(tiny_run / "t" / "resnet18"),
                                           out=str(tiny_run / "m2"), device="cpu"))
    with pytest.raises(PrismError, match="resnet18.*took part in the synthesis"):
        metrics(cfg)
    assert not (tiny_run / "m2" / "metrics.json").exists()


def test_metrics_cli(tiny_run, capsys):
    from prismdd.cli import build_parser, main

    helptext = " ".join(build_parser()._subparsers._group_actions[0].choices["metrics"].format_help().split())
    assert "took NO part in synthesis" in helptext and "--random-ipc-seed" in helptext
    args = ["metrics", "--distilled", str(tiny_run / "r"), "--out", str(tiny_run / "m3"), "--device", "cpu"]
    assert main(args + ["--observer", str(tiny_run / "o" / "mobilenet_v2")]) == 0
    assert json.loads((tiny_run / "m3" / "metrics.json").read_text())["observer"]["arch"] == "mobilenet_v2"
    assert main(args + ["--observer", str(tiny_run / "t")]) == 2  # a zoo folder: several teachers, ambiguous
    assert main(args + ["--observer", str(tiny_run / "t" / "convnet")]) == 2
    err = capsys.readouterr().err
    assert "several teachers" in err and "misleading diversity probe" in err
    assert main(["metrics", "--observer", str(tiny_run / "o")]) == 2  # no --distilled
