"""BPS's selection (methods/bps.py), each rule of its code re-stated directly on fixed, hand-made inputs:
the kNN graph by brute-force cosines, Infomap on graphs whose communities are obvious, the budget rounding by
hand, the centre picks by a direct sort, the entropy rule on a two-mode mixture whose right picks are known, the
mixture bound against a brute-force scan of the two weighted densities."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prismdd.artifacts import MANIFEST, SCORES_FILE, load_distilled, save_scores, seal_files
from prismdd.core.data import class_indices, load_splits
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json, write_json
from prismdd.methods import PLUGINS, bps
from prismdd.stages.recover import recover_config


def unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def angles(degrees) -> np.ndarray:
    r = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


# ----------------------------------------------------------------------------- the kNN graph
def brute_links(x, k, min_cos):
    """Direct: all cosines; each row's k most similar (itself included); a link to every other one >= min_cos."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    links = set()
    for i in range(len(x)):
        top = np.argsort(-sims[i], kind="stable")[:k]
        links |= {(i, int(j)) for j in top if j != i and sims[i, j] >= min_cos}
    return links


@pytest.mark.parametrize("k", [30, 4, 2])
def test_knn_links_are_the_brute_force_graph(k):
    # 0-60 degrees: cos 60 = 0.5 is the threshold; 200-230 a second group; 120 links to nobody at k >= 3
    # (cos(120 - 60) = 0.5 lies exactly on it in exact arithmetic: avoided by 121)
    x = angles([0, 10, 24, 40, 59, 121, 200, 215, 230])  # no ties between a row's neighbours
    links, single = bps.knn_links(x, k=k, min_cosine=0.5)
    assert {(i, j) for i, j, _ in links} == brute_links(x, min(k, len(x)), 0.5)
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    for i, j, w in links:
        assert w == pytest.approx(sims[i, j], abs=1e-6)
    assert single == [i for i in range(len(x)) if not any(a == i for a, _, _ in links)]
    assert 5 in single  # 121 degrees: its nearest others are 59 (cos 62 deg = 0.47) and 200 (cos 79 deg)


def test_knn_scan_skips_the_image_itself_and_stops_at_the_first_below():
    x = angles([0, 30, 89])
    links, single = bps.knn_links(x, k=3, min_cosine=0.5)
    # from 0: 30 (0.87) kept, 89 (0.02) ends the scan; from 89: 30 (cos 59 = 0.515) kept
    assert sorted((i, j) for i, j, _ in links) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert single == []
    # a higher threshold: 89 keeps nothing, and nobody links to it
    links, single = bps.knn_links(x, k=3, min_cosine=0.6)
    assert sorted((i, j) for i, j, _ in links) == [(0, 1), (1, 0)]
    assert single == [2]


def test_one_image_class_is_a_single():
    links, single = bps.knn_links(unit([[1.0, 2.0]]), k=30)
    assert links == [] and single == [0]


# ----------------------------------------------------------------------------- Infomap
def clique(nodes, w=0.9):
    return [(i, j, w) for i in nodes for j in nodes if i != j]


def test_infomap_finds_two_cliques_numbers_modules_by_flow_then_singles():
    links = clique(range(5)) + clique(range(5, 8)) + [(4, 5, 0.55)]
    labels = bps.infomap_modules(10, links, single=[8, 9])
    # the 5-clique carries more flow: module 1 -> label 0; singles after the modules in node order
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 3]


def test_infomap_is_deterministic_and_seeded():
    rng = np.random.RandomState(3)
    x = unit(rng.randn(60, 8))
    links, single = bps.knn_links(x, k=10, min_cosine=0.2)
    first = bps.infomap_modules(60, links, single, trials=3, seed=123)
    assert np.array_equal(first, bps.infomap_modules(60, links, single, trials=3, seed=123))
    assert (first >= 0).all()


def test_no_links_gives_singletons():
    assert bps.infomap_modules(3, [], [0, 1, 2]).tolist() == [0, 1, 2]


def test_class_patterns_end_to_end_on_three_directions():
    rng = np.random.RandomState(0)
    a = rng.randn(8, 16) * 0.1 + np.eye(16)[0]
    b = rng.randn(5, 16) * 0.1 + np.eye(16)[1]
    x = np.vstack([a, b, np.eye(16)[2:3] * 7.0])  # unnormalised: class_patterns normalises
    assert bps.class_patterns(x).tolist() == [0] * 8 + [1] * 5 + [2]


def test_merge_small_patterns_joins_the_most_similar_large_one():
    x = angles([0, 5, 10, 90, 95, 100, 20, 80])
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 3])
    assert bps.merge_small_patterns(labels, x, 0).tolist() == labels.tolist()  # off
    assert bps.merge_small_patterns(labels, x, 2).tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    assert bps.merge_small_patterns(labels, x, 4).tolist() == labels.tolist()  # no large pattern


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("counts, ipc, expected", [
    ([6, 3, 1], 1, [1, 0, 0]),            # 0.6 0.3 0.1: the small ones get nothing
    ([6, 3, 1], 2, [1, 1, 0]),            # 1.2 0.6 0.2
    ([25, 15, 10], 10, [5, 3, 2]),        # exact
    ([5, 5], 1, [0, 1]),                  # 0.5 0.5 round to 0 0 (half to even); +1 to the later of the tie
    ([3, 3, 3, 1], 5, [2, 2, 1, 0]),      # 1.5 x3 -> 2 2 2 (sum 6): -1 on the largest, the later of the tie
    ([45, 35, 20], 3, [1, 1, 1]),         # 1.35 1.05 0.6
    ([7, 1, 1, 1], 2, [2, 0, 0, 0]),      # 1.4 0.2 0.2 0.2 -> 1 0 0 0, +1 to the largest
    ([10, 4, 1], 10, [6, 3, 1]),          # 6.67 2.67 0.67 -> 7 3 1 (sum 11): -1 on the largest
])
def test_pattern_budgets_by_hand(counts, ipc, expected):
    got = bps.pattern_budgets(counts, ipc)
    assert got.tolist() == expected
    assert got.sum() == ipc


# ----------------------------------------------------------------------------- the mixture bound
def two_modes():
    """40 remaining entropies: 30 low ones, then the top 10 in two tight modes around 1.0 (6) and 2.0 (4)."""
    low = np.linspace(0.1, 0.5, 30)
    return np.r_[low, [0.97, 0.98, 0.99, 1.01, 1.02, 1.03], [1.97, 1.99, 2.01, 2.03]]


def weighted_densities(x, mu, var, w):
    return w * np.exp(-(x - mu) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)


def test_density_crossing_is_where_the_weighted_gaussians_meet():
    from sklearn.mixture import GaussianMixture

    rng = np.random.RandomState(1)
    cand = np.r_[rng.normal(1.0, 0.05, 30), rng.normal(2.0, 0.3, 20)]
    gmm = GaussianMixture(n_components=2, random_state=7).fit(cand[:, None])
    o = np.argsort(gmm.means_.ravel())
    mu, var, w = gmm.means_.ravel()[o], gmm.covariances_.ravel()[o], gmm.weights_[o]
    grid = np.linspace(mu[0], mu[1], 200001)
    diff = weighted_densities(grid, mu[0], var[0], w[0]) - weighted_densities(grid, mu[1], var[1], w[1])
    brute = grid[np.flatnonzero(np.diff(np.sign(diff)))[0]]  # left density wins first, then the right one
    low, high = bps.mixture_window(cand, 7, "density")
    assert low == pytest.approx(mu[0]) and float(np.real(high)) == pytest.approx(brute, abs=1e-4)
    # the code's quadratic: its constant takes log(w_l sd_l / (w_r sd_r)), a different point when the spreads differ
    a = 1 / (2 * var[1]) - 1 / (2 * var[0])
    b = mu[0] / var[0] - mu[1] / var[1]
    c = mu[1] ** 2 / (2 * var[1]) - mu[0] ** 2 / (2 * var[0]) + np.log(w[0] * np.sqrt(var[0]) / (w[1] * np.sqrt(var[1])))
    _, code = bps.mixture_window(cand, 7, "code")
    code = float(np.real(code))
    assert a * code ** 2 + b * code + c == pytest.approx(0, abs=1e-6)
    assert mu[0] < code < mu[1] and abs(code - brute) > 0.01


# ----------------------------------------------------------------------------- the entropy rule
@pytest.mark.parametrize("budget, expected", [
    (2, [1.01, 1.02]),                             # the primary pool [1.0, crossing ~1.49], lowest first
    (3, [1.01, 1.02, 1.03]),
    (5, [1.01, 1.02, 1.03, 0.99, 0.98]),           # then below the lower mean, highest first
    (12, [1.01, 1.02, 1.03, 0.99, 0.98, 0.97] + list(np.linspace(0.1, 0.5, 30)[::-1][:6])),
    (38, [1.01, 1.02, 1.03, 0.99, 0.98, 0.97] + list(np.linspace(0.1, 0.5, 30)[::-1]) + [2.03, 2.01]),  # then highest
])
def test_entropy_picks_on_a_two_mode_mixture(budget, expected):
    e = two_modes().astype(np.float32)
    rng = np.random.RandomState(5)
    perm = rng.permutation(len(e))  # the rule must not depend on where the images sit
    picks = bps.entropy_picks(e[perm], budget, seed=1228)
    assert len(set(picks.tolist())) == budget
    # which images, not their order (a short primary pool is taken in index order, as the code does)
    np.testing.assert_allclose(np.sort(e[perm][picks]), np.sort(np.asarray(expected, dtype=np.float32)))


def test_entropy_picks_without_a_mixture_take_the_highest():
    e = np.array([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6])  # 9 < 10: no mixture
    assert bps.entropy_picks(e, 3, seed=0).tolist() == [1, 6, 4]
    assert bps.entropy_picks(e, 9, seed=0).tolist() == list(range(9))  # budget >= n: all


def test_entropy_picks_fit_only_the_top_share():
    # 200 images: the top 20 (10 %) are fitted; the two modes sit at 3.0 (12) and 4.0 (8); 180 low ones below 1
    e = np.r_[np.linspace(0.0, 0.9, 180), 3.0 + np.arange(12) * 0.01, 4.0 + np.arange(8) * 0.01]
    picks = bps.entropy_picks(e, 4, seed=0)
    # primary pool: [mean of the 3.0 mode = 3.055, crossing]: 3.06 ... 3.11 lowest first
    np.testing.assert_allclose(e[picks], [3.06, 3.07, 3.08, 3.09])


# ----------------------------------------------------------------------------- centre + entropy in one pattern
def test_pattern_picks_centre_then_entropy():
    x = angles([0, 4, -4, 8, -9, 20, -25, 30, 33, -35, 40, 45])  # centroid near +4 degrees
    ent = np.arange(12, dtype=np.float64)[::-1].copy()  # image i has entropy 11 - i
    centroid = x.mean(0) / np.linalg.norm(x.mean(0))
    nearest = np.argsort(-(x @ centroid), kind="stable")
    by_centre, by_entropy = bps.pattern_picks(x, ent, 5, seed=0)
    assert by_centre.tolist() == nearest[:3].tolist()  # ceil(5 / 2)
    rest = [i for i in range(12) if i not in nearest[:3]]
    assert len(rest) == 9  # < 10: no mixture, the highest entropies of the rest
    assert by_entropy.tolist() == sorted(rest, key=lambda i: -ent[i])[:2]
    c, e = bps.pattern_picks(x, ent, 1, seed=0)
    assert c.tolist() == nearest[:1].tolist() and e.tolist() == []
    c, e = bps.pattern_picks(x, ent, 4, seed=0, centre_ratio=0.0)
    assert c.tolist() == [] and len(e) == 4


def test_select_class_by_hand():
    # pattern 0: 11 images (0-30 degrees), pattern 1: 6 (90-110), pattern 2: one at 200; 18 images, ipc 4
    x = angles([0, 3, 6, 9, 12, 14, 17, 21, 24, 27, 30, 90, 93, 98, 101, 106, 110, 200])
    labels = np.array([0] * 11 + [1] * 6 + [2])
    ent = np.linspace(0.1, 1.8, 18)  # rises with the index
    chosen, how = bps.select_class(labels, x, ent, ipc=4, seed=0)
    # budgets: 4 x 11/18 = 2.44 -> 2, 4 x 6/18 = 1.33 -> 1, 0.22 -> 0: sum 3, +1 on the largest: 3, 1, 0
    # pattern 0: ceil(3 / 2) = 2 nearest its centroid (~14.8 degrees: 14 and 17), then 1 by entropy among the
    # other 9 (< 10: no mixture, the highest: image 10); pattern 1: 1 nearest its centroid (~99.7: 101, image 14)
    assert chosen.tolist() == [5, 6, 10, 14]
    assert how == ["centre", "centre", "entropy", "centre"]


def test_select_class_small_class_and_whole_patterns():
    x = angles([0, 10, 90])
    chosen, how = bps.select_class(np.array([0, 0, 1]), x, [0.1, 0.2, 0.3], ipc=5, seed=0)
    assert chosen.tolist() == [0, 1, 2] and how == ["class"] * 3
    x = angles([0, 10, 20, 90, 180])
    chosen, how = bps.select_class(np.array([0, 0, 0, 1, 2]), x, [0.1] * 5, ipc=4, seed=0)
    # 2.4 -> 2, 0.8 -> 1, 0.8 -> 1: patterns 1 and 2 are taken whole
    assert how[chosen.tolist().index(3)] == "pattern" and how[chosen.tolist().index(4)] == "pattern"
    assert len(chosen) == 4


# ----------------------------------------------------------------------------- the plug-in on digits
def score_folder(folder, tensors):
    """A finished score folder as the score stage leaves it: the file and a manifest sealing it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_scores(folder, tensors)
    write_json(folder / MANIFEST, {"stage": "score", "config_hash": "feedc0de",
                                   "outputs": {"files": seal_files(folder, [SCORES_FILE])}})
    return folder


@pytest.fixture(scope="module")
def digits_scores(tmp_path_factory):
    """digits' training split and scores whose embedding is the 8x8 pixels (real visual patterns), entropy random."""
    cfg = recover_config("bps", dataset="digits", device="cpu")
    train, _, info = load_splits(cfg)
    emb = train.get_images(torch.arange(len(train.targets))).flatten(1).float()
    ent = torch.rand(len(train.targets), generator=torch.Generator().manual_seed(0)) * 2.3
    folder = score_folder(tmp_path_factory.mktemp("bps") / "scores",
                          {"targets": train.targets, "embedding": emb, "entropy": ent})
    return train, info, folder, emb, ent


def bps_plugin(digits_scores, **overrides):
    train, info, folder = digits_scores[:3]
    cfg = recover_config("bps", dataset="digits", device="cpu", select_scores=str(folder), **overrides)
    return PLUGINS.get("bps")(cfg, info, train, {}, [], torch.device("cpu"))


def test_plugin_choose_is_the_rule_on_the_class(digits_scores):
    train, info, _, emb, ent = digits_scores
    p = bps_plugin(digits_scores, ipc=6, seed=3)
    assert p.score_kinds == ("embedding", "entropy") and PLUGINS.get("bps") is bps.BPS
    for c in (0, 7):
        members = class_indices(train.targets, info.num_classes)[c]
        picks, extras = p.choose(c, members, 6)
        feats = bps.l2_normalise(emb[members].numpy())
        labels = bps.class_patterns(feats)  # defaults: k 30, cosine 0.5, 3 trials, seed 123
        local, how = bps.select_class(labels, feats, ent[members].double().numpy(), 6, seed=3)
        assert picks == members[torch.as_tensor(local)].tolist() and picks == sorted(picks)
        assert [e["bps_by"] for e in extras] == how
        assert [e["bps_pattern"] for e in extras] == labels[local].tolist()
        assert [e["bps_pattern_size"] for e in extras] == [int((labels == labels[i]).sum()) for i in local]
        assert [e["entropy"] for e in extras] == pytest.approx(ent[members][torch.as_tensor(local)].tolist(), abs=1e-6)
    # patterns are computed once per class and reused (e.g. for another ipc)
    cached = p.patterns[0]
    members = class_indices(train.targets, info.num_classes)[0]
    picks3, _ = p.choose(0, members, 3)
    assert p.patterns[0] is cached and len(picks3) == 3


def test_plugin_fills_a_short_class_nearest_its_centroid(digits_scores, monkeypatch):
    train, info, _, emb, _ = digits_scores
    p = bps_plugin(digits_scores, ipc=4)
    members = class_indices(train.targets, info.num_classes)[2]
    monkeypatch.setattr(bps, "select_class", lambda *a, **k: (np.array([5, 9]), ["centre", "entropy"]))
    picks, extras = p.choose(2, members, 4)
    feats = bps.l2_normalise(emb[members].numpy())
    centroid = feats.mean(0) / np.linalg.norm(feats.mean(0))
    near = [int(i) for i in np.argsort(-(feats @ centroid), kind="stable") if i not in (5, 9)][:2]
    assert picks == sorted(members[[5, 9] + near].tolist())
    assert sorted(e["bps_by"] for e in extras) == ["centre", "entropy", "fill", "fill"]


def test_plugin_needs_embedding_and_entropy_scores(digits_scores, tmp_path):
    train, info = digits_scores[:2]
    cfg = recover_config("bps", dataset="digits", device="cpu")
    with pytest.raises(PrismError, match="--select-scores"):
        PLUGINS.get("bps")(cfg, info, train, {}, [], torch.device("cpu"))
    only = score_folder(tmp_path / "emb", {"targets": train.targets, "embedding": torch.randn(len(train.targets), 4)})
    cfg = recover_config("bps", dataset="digits", device="cpu", select_scores=str(only))
    with pytest.raises(PrismError, match="entropy"):
        PLUGINS.get("bps")(cfg, info, train, {}, [], torch.device("cpu"))
    with pytest.raises(PrismError, match="--bps-min-cosine"):
        recover_config("bps", dataset="digits", bps_min_cosine=1.5)


def test_recover_bps_writes_the_chosen_training_images(cli, digits_scores, tmp_path):
    train, info, folder, emb, ent = digits_scores
    out = tmp_path / "bps"
    assert cli(["recover", "--method", "bps", "--dataset", "digits", "--device", "cpu", "--ipc", "2",
                "--batch-size", "8", "--seed", "1", "--select-scores", folder, "--out", out]) == 0
    expected = []
    for members in class_indices(train.targets, info.num_classes):
        feats = bps.l2_normalise(emb[members].numpy())
        local, _ = bps.select_class(bps.class_patterns(feats), feats, ent[members].double().numpy(), 2, seed=1)
        expected += members[torch.as_tensor(local)].tolist()
    ds = load_distilled(out)
    assert ds.start_indices == [[i] for i in expected]
    assert torch.equal(ds.images, train.get_images(torch.tensor(expected)))
    m = read_json(out / MANIFEST)
    assert m["inputs"]["plugin"]["name"] == "bps" and m["inputs"]["plugin"]["k"] == 30
    sel = [s for r in m["outputs"]["batches"] for s in r["selection"]]
    assert [s["index"] for s in sel] == expected and {"bps_pattern", "bps_by", "entropy"} <= set(sel[0])


# ----------------------------------------------------------------------------- BPS's embedding network (stage 1)
def test_pattern_loss_is_the_direct_double_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(9, 3, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2])
    got = bps.pattern_loss(q, queue, labels)
    total = 0.0
    for b in range(4):
        cents = [queue[labels == p].mean(0) for p in range(3)]
        best = max(range(3), key=lambda p: float(q[b] @ (cents[p] / cents[p].norm())))
        near = [float((2 - 2 * q[b] @ queue[j] + 1e-6).sqrt()) for j in range(9) if labels[j] == best]
        far = [float((2 - 2 * q[b] @ queue[j] + 1e-6).sqrt()) for j in range(9) if labels[j] != best]
        total += sum(near) / (len(near) + 1e-6) + 2.0 - sum(far) / (len(far) + 1e-6)
    assert float(got) == pytest.approx(total / 4, rel=1e-5)


def test_pattern_weight_ramps_after_the_warm_up():
    assert [bps.pattern_weight(e, 30) for e in (0, 3, 4)] == [0.0, 0.0, 0.0]
    assert bps.pattern_weight(5, 30) == pytest.approx(1 / 25) and bps.pattern_weight(29, 30) == 1.0


def test_queue_patterns_number_on_across_classes():
    keys = np.vstack([angles([0, 5, 10, 90, 95, 100]), angles([0, 1])])
    classes = np.array([0] * 6 + [1] * 2)
    # class 0 (6 keys > k = 3): two patterns; class 1 (2 keys <= k): one pattern, numbered after class 0's
    assert bps.queue_patterns(keys, classes, k=3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_train_embedder_runs_and_trains_the_encoder():
    g = torch.Generator().manual_seed(1)
    images, targets = torch.randn(48, 1, 4, 4, generator=g), torch.arange(48) % 3
    net = bps.EmbedNet(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU()), 8, 3, dim=4)
    before = [p.detach().clone() for p in net.parameters()]
    rows = []
    out = bps.train_embedder(net, images, targets, lambda x, gen: x + 0.1 * torch.randn(x.shape, generator=gen),
                             epochs=3, batch=8, queue_size=16, warmup=1, k=3, log=rows.append)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and "pattern" not in rows[0] and "pattern" in rows[2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, out.parameters())) and not out.training
    with pytest.raises(PrismError, match="multiple of the batch"):
        bps.train_embedder(net, images, targets, lambda x, gen: x, epochs=1, batch=8, queue_size=12)


# ----------------------------------------------------------------------------- the score stage's ``bps`` embedder
BPS_EMBED = dict(dataset="digits", device="cpu", kinds="embedding", embed="bps", bps_embed_arch="convnet",
                 bps_embed_width=0.25, bps_embed_epochs=2, bps_embed_batch=128, bps_embed_queue=300)


def test_bps_embedder_is_its_trained_backbone_and_the_score_stage_records_it(tmp_path):
    from prismdd.core.config import build_config
    from prismdd.core.data import load_dataset, normalize
    from prismdd.methods.embed import EMBEDDERS
    from prismdd.stages.score import ScoreConfig, score

    cfg = build_config(ScoreConfig, dict(BPS_EMBED, out=str(tmp_path / "s")))
    score(cfg)
    s = load_scores_file(tmp_path / "s")
    train, _, info = load_dataset("digits")
    # the same embedder built directly (same seed, same settings) gives the stored vectors: the stage stores what
    # the trained backbone computes on the un-augmented image, and training depends on nothing but the settings
    direct = EMBEDDERS.get("bps")(cfg, info, train, torch.device("cpu"))
    want = direct(train.images[:50])
    assert s.embedding.shape == (len(train), want.shape[1]) and torch.isfinite(s.embedding).all()
    torch.testing.assert_close(s.embedding[:50], want)
    with torch.no_grad():  # it is the backbone alone (no projector): the classifier reads these features
        logits = direct.backbone(normalize(train.images[:50], info))
    torch.testing.assert_close(logits, want)
    made = read_json(tmp_path / "s" / MANIFEST)
    text = json.dumps(made)
    assert '"embed": "bps"' in text and '"bps_embed_epochs": 2' in text and '"bps_embed_queue": 300' in text
    # a different setting is a different embedding: the finished folder refuses it rather than mixing them
    with pytest.raises(PrismError):
        score(build_config(ScoreConfig, dict(BPS_EMBED, out=str(tmp_path / "s"), bps_embed_epochs=3)))
    with pytest.raises(PrismError, match="--bps-embed-crop"):
        build_config(ScoreConfig, dict(BPS_EMBED, out=str(tmp_path / "t"), bps_embed_crop=0.0)).check()


def load_scores_file(folder):
    from prismdd.artifacts import load_scores

    return load_scores(folder)
