"""The selection methods (methods/select.py and one module per selector): each rule against a direct brute-force
computation on fixed inputs, the PNG round trip that makes a selected folder hold the training images bit for bit,
and end-to-end recover runs on digits with a tiny score folder."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from prismdd.artifacts import MANIFEST, SCORES_FILE, load_distilled, save_image, save_scores, seal_files
from prismdd.core.data import class_indices, load_splits, normalize, random_real_indices
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json, write_json
from prismdd.core.presets import METHODS, preset_file
from prismdd.core.runtime import make_generator
from prismdd.methods import PLUGINS
from prismdd.methods.ccs import allocate, strata_of
from prismdd.methods.forgetting import forgetting_scores
from prismdd.methods.herding import herd
from prismdd.methods.kcenter import farthest_first
from prismdd.methods.select import SelectionPlugin, ranked
from prismdd.stages.recover import recover, recover_config

SELECTORS = ("random", "herding", "kcenter", "forgetting", "el2n", "ccs")


# ----------------------------------------------------------------------------- helpers
def score_folder(folder, tensors):
    """A finished score folder (as the score stage leaves it): the file and a manifest sealing it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_scores(folder, tensors)
    write_json(folder / MANIFEST, {"stage": "score", "config_hash": "feedc0de",
                                   "outputs": {"files": seal_files(folder, [SCORES_FILE])}})
    return folder


@pytest.fixture(scope="module")
def digits():
    cfg = recover_config("herding", dataset="digits", device="cpu")
    train, _, info = load_splits(cfg)
    return train, info


def fake_scores(targets, runs=2, epochs=5, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(targets)
    return {"targets": targets, "embedding": torch.randn(n, dim, generator=g),
            "correct": (torch.rand(runs, epochs, n, generator=g) < 0.6).to(torch.uint8),
            "margin": torch.randn(runs, epochs, n, generator=g), "el2n": torch.rand(runs, n, generator=g)}


def plugin(name, digits, scores_dir=None, **overrides):
    train, info = digits
    cfg = recover_config(name, dataset="digits", device="cpu",
                         **({"select_scores": str(scores_dir)} if scores_dir else {}), **overrides)
    return PLUGINS.get(name)(cfg, info, train, {}, [], torch.device("cpu"))


# ----------------------------------------------------------------------------- the base
@pytest.mark.parametrize("channels", [1, 3])
def test_a_real_image_survives_the_png_round_trip_exactly(digits, tmp_path, channels):
    _, info = digits
    if channels == 3:  # ImageNet's statistics: normalisation in float32, then back
        info = dataclasses.replace(info, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.arange(256, dtype=torch.int64).view(16, 16).to(torch.uint8)
    x = torch.stack([x.roll(c, 0) for c in range(channels)])[None]  # every value in every channel
    save_image(tmp_path / "a.png", normalize(x, info)[0], info)
    with Image.open(tmp_path / "a.png") as im:
        back = torch.from_numpy(__import__("numpy").asarray(im, dtype="uint8").copy())
    back = back[None] if back.ndim == 2 else back.permute(2, 0, 1)
    assert torch.equal(back, x[0])


def test_ranked_breaks_ties_by_index_or_by_the_given_order():
    members = torch.tensor([3, 7, 9, 12])
    values = torch.tensor([1.0, 2.0, 1.0, 2.0])
    assert ranked(values, members, descending=True).tolist() == [1, 3, 0, 2]
    assert ranked(values, members, descending=False).tolist() == [0, 2, 1, 3]
    assert ranked(values, members, descending=True, tie_order=torch.tensor([3, 2, 1, 0])).tolist() == [3, 1, 2, 0]


def test_every_selector_is_a_registered_plugin_with_a_selected_preset():
    for name in SELECTORS:
        assert issubclass(PLUGINS.get(name), SelectionPlugin) and preset_file("recover", name)["plugin"] == name
    for name in METHODS.names():  # the listing's images column says selected exactly for the selection plug-ins
        data = preset_file("recover", name)
        chooses = issubclass(PLUGINS.get(data.get("plugin", "none")), SelectionPlugin)
        assert (data.get("images") == "selected") is chooses, name


# ----------------------------------------------------------------------------- herding
def brute_herding(points, k):
    mu = [sum(p[d] for p in points) / len(points) for d in range(len(points[0]))]
    chosen = []
    for t in range(1, k + 1):
        best, best_d = None, math.inf
        for i, p in enumerate(points):
            if i in chosen:
                continue
            mean = [(sum(points[j][d] for j in chosen) + p[d]) / t for d in range(len(p))]
            d = math.dist(mean, mu)
            if d < best_d:  # strict: the lowest index wins a tie
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_adds_the_image_that_brings_the_mean_closest():
    pts = [(0.0, 0.0), (4.0, 0.0), (0.0, 4.0), (4.0, 4.0), (2.0, 2.5), (10.0, 10.0), (1.0, 3.0)]
    picks, dists = herd(torch.tensor(pts), 5)
    assert picks == brute_herding(pts, 5)
    # the class mean is (3, 3.357): the first pick is the point nearest it, (4, 4) at 1.19 ((2, 2.5) is at 1.32), not
    # DeepCore's farthest (10, 10)
    assert picks[0] == 3 and 5 not in picks[:2]
    assert dists[0] == pytest.approx(math.dist((4.0, 4.0), (3.0, 23.5 / 7)))


def test_herding_ties_go_to_the_lowest_index():
    pts = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)]  # the mean is the origin: all four tie first
    assert herd(torch.tensor(pts), 4)[0] == brute_herding(pts, 4) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- k-center
def brute_kcenter(points, k, start):
    chosen = [start]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for i, p in enumerate(points):
            if i in chosen:
                continue
            d = min(math.dist(p, points[j]) for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_kcenter_is_farthest_first_from_the_point_nearest_the_mean(digits, tmp_path):
    pts = [(0.0, 0.0), (5.0, 0.0), (0.0, 5.0), (5.0, 5.0), (2.4, 2.6), (9.0, 1.0), (1.0, 1.0), (2.0, 8.0)]
    assert farthest_first(torch.tensor(pts), 6, 4)[0] == brute_kcenter(pts, 6, 4)
    # through the plug-in: class 0 of digits with these embeddings at its first eight members, the rest far away
    train, info = digits
    members = class_indices(train.targets, info.num_classes)[0]
    emb = torch.full((len(train), 2), 100.0)
    emb[members] = torch.tensor([[50.0, 50.0]] * len(members))
    emb[members[:8]] = torch.tensor(pts)
    emb[members[8:]] += torch.arange(len(members) - 8, dtype=torch.float32)[:, None] * 1e-3  # no exact ties
    folder = score_folder(tmp_path / "s", {"targets": train.targets, "embedding": emb})
    p = plugin("kcenter", digits, folder, ipc=4)
    all_pts = [tuple(r) for r in emb[members].tolist()]
    mean = [sum(c) / len(all_pts) for c in zip(*all_pts)]
    start = min(range(len(all_pts)), key=lambda i: (math.dist(all_pts[i], mean), i))
    assert p.picks(0)[0] == members[brute_kcenter(all_pts, 4, start)].tolist()
    # the random start: the class's seeded stream (seed, "kcenter", class)
    p = plugin("kcenter", digits, folder, ipc=4, kcenter_start="random", seed=3)
    first = int(torch.randint(len(members), (1,), generator=make_generator(3, "kcenter", 0)))
    assert p.picks(0)[0] == members[brute_kcenter(all_pts, 4, first)].tolist()


# ----------------------------------------------------------------------------- forgetting
def test_forgetting_counts_transitions_and_never_learned_is_infinite():
    # (runs, epochs, examples); counted by hand per example and run
    correct = torch.tensor([[[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 1, 0]],   # run 0
                            [[1, 0, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1], [1, 0, 1, 1]]],  # run 1
                           dtype=torch.uint8)
    # ex0 run 0: 1,0,1,0 -> 2; run 1: 1,1,1,1 -> 0          mean 1
    # ex1 run 0: 0,0,0,0 never learned -> inf; run 1: 0      mean inf
    # ex2 run 0: 0,1,0,1 -> 1; run 1: 1,0,0,1 -> 1          mean 1
    # ex3 run 0: 1,1,0,0 -> 1; run 1: 0,1,1,1 -> 0          mean 0.5
    assert forgetting_scores(correct).tolist() == [1.0, math.inf, 1.0, 0.5]


def test_forgetting_picks_most_forgotten_first_ties_in_a_seeded_order(digits, tmp_path):
    train, info = digits
    members = class_indices(train.targets, info.num_classes)[2]
    n = len(train)
    correct = torch.ones(1, 3, n, dtype=torch.uint8)  # learned, never forgotten: score 0
    correct[0, :, members[5]] = 0  # never learned: first
    correct[0, 1, members[[1, 3, 8]]] = 0  # 1,0,1: one event each, a three-way tie
    folder = score_folder(tmp_path / "s", dict(fake_scores(train.targets), correct=correct))
    picks, extras = plugin("forgetting", digits, folder, ipc=4, seed=7).picks(2)
    perm = torch.randperm(len(members), generator=make_generator(7, "forgetting", 2)).tolist()
    ties = sorted([1, 3, 8], key=perm.index)  # the tie order is the class's seeded permutation
    assert picks == members[[5, *ties]].tolist()
    assert extras[0] == {"forgetting": None, "never_learned": True} and extras[1]["forgetting"] == 1.0


# ----------------------------------------------------------------------------- EL2N
def test_el2n_picks_the_highest_mean_over_runs(digits, tmp_path):
    train, info = digits
    members = class_indices(train.targets, info.num_classes)[1]
    el2n = torch.zeros(2, len(train))
    el2n[:, members[4]] = torch.tensor([0.9, 0.7])  # mean 0.8
    el2n[:, members[0]] = torch.tensor([1.0, 0.2])  # mean 0.6 (a max-over-runs rule would put it first)
    el2n[:, members[9]] = torch.tensor([0.5, 0.7])  # mean 0.6: ties with members[0], the lower index first
    folder = score_folder(tmp_path / "s", dict(fake_scores(train.targets), el2n=el2n))
    picks, extras = plugin("el2n", digits, folder, ipc=4).picks(1)
    assert picks == members[[4, 0, 9, 1]].tolist()  # then the zeros, lowest index first
    assert [e["el2n"] for e in extras[:3]] == pytest.approx([0.8, 0.6, 0.6])


# ----------------------------------------------------------------------------- CCS
def test_ccs_allocation_by_hand():
    # sizes [5, 1, 3, 0, 10], 8 images: visited 3 (0), 1 (1), 2 (3), 0 (5), 4 (10) with 8 // 5 = 1 -> 0,
    # 8 // 4 = 2 -> 1, 7 // 3 = 2 -> 2, 5 // 2 = 2 -> 2, 3 // 1 = 3 -> 3
    assert allocate([5, 1, 3, 0, 10], 8) == [2, 1, 2, 0, 3]
    assert allocate([2, 2], 3) == [1, 2]  # equal sizes: the lower stratum first gets 3 // 2
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # the budgets always fill the set when the strata hold enough images
        sizes = torch.randint(0, 6, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        total = int(torch.randint(0, sum(sizes) + 1, (1,), generator=g))
        b = allocate(sizes, total)
        assert sum(b) == total and all(0 <= x <= s for x, s in zip(b, sizes))


def test_ccs_strata_are_equal_width_with_the_max_in_the_last():
    assert strata_of(torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0]), 4).tolist() == [0, 0, 1, 2, 3, 3]
    # a negative maximum stays in the last stratum (CCS's max * 1.0001 would drop it)
    assert strata_of(torch.tensor([-5.0, -3.5, -1.0]), 2).tolist() == [0, 0, 1]
    assert strata_of(torch.tensor([2.0, 2.0]), 50).tolist() == [0, 0]


def test_ccs_drops_the_hardest_and_fills_strata_smallest_first(digits, tmp_path):
    train, info = digits
    members = class_indices(train.targets, info.num_classes)[3]
    n = len(members)
    drop = int(0.3 * n)
    aum = torch.full((n,), 4.0)  # stratum 3 of 4 (range 0..4, width 1)
    aum[:drop] = -10.0  # the hardest 30 %: dropped
    aum[drop] = 0.0  # stratum 0: one image
    aum[drop + 1: drop + 3] = 1.5  # stratum 1: two images; stratum 2 stays empty
    margin = torch.zeros(2, 3, len(train))
    margin[:, :, members] = aum  # the same margin every epoch and run: AUM = aum
    folder = score_folder(tmp_path / "s", dict(fake_scores(train.targets), margin=margin))
    picks, extras = plugin("ccs", digits, folder, ipc=5, ccs_strata=4).picks(3)
    # sizes [1, 2, 0, n - drop - 3]: 5 // 4 -> 0 (empty), 5 // 3 -> 1, 4 // 2 -> 2, 2 // 1 -> 2
    assert [e["stratum"] for e in extras] == [0, 1, 1, 3, 3]
    pos = [members.tolist().index(i) for i in picks]
    assert pos[0] == drop and sorted(pos[1:3]) == [drop + 1, drop + 2] and all(p >= drop + 3 for p in pos[3:])
    assert len(set(picks)) == 5
    with pytest.raises(PrismError, match="--ccs-drop-hard 0.99: class .* lower --ccs-drop-hard"):
        plugin("ccs", digits, folder, ipc=5, ccs_drop_hard=0.99).picks(3)


# ----------------------------------------------------------------------------- determinism and refusals
def test_picks_depend_on_seed_and_class_only(digits, tmp_path):
    train, _ = digits
    folder = score_folder(tmp_path / "s", fake_scores(train.targets))
    for name in ("forgetting", "ccs", "kcenter"):
        a = plugin(name, digits, folder, ipc=3, kcenter_start="random")
        b = plugin(name, digits, folder, ipc=3, kcenter_start="random")
        assert [a.picks(c) for c in range(10)] == [b.picks(c) for c in reversed(range(10))][::-1]


def test_missing_scores_name_the_score_command(digits, tmp_path):
    with pytest.raises(PrismError, match=r"--select-scores: --method herding .*`prismdd score --kinds embedding "
                                         r"--out DIR`"):
        recover(recover_config("herding", dataset="digits", device="cpu", out=str(tmp_path / "o")))
    with pytest.raises(PrismError, match=r"--select-scores .*holds embedding scores, this needs dynamics"):
        train, _ = digits
        folder = score_folder(tmp_path / "s", {"targets": train.targets, "embedding": torch.randn(len(train), 2)})
        plugin("el2n", digits, folder)
    with pytest.raises(PrismError, match="--method random reads no scores"):
        plugin("random", digits, folder)
    with pytest.raises(PrismError, match="--select-scores x: --method sre2l does not read select options"):
        recover_config("sre2l", dataset="digits", select_scores="x")
    with pytest.raises(PrismError, match="--init real: herding takes real training images itself"):
        plugin("herding", digits, folder, init="real")


# ----------------------------------------------------------------------------- --help
def _sections(text):
    out, title = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            out[title] = []
        elif title and line.startswith("  --"):
            out[title].append(line.split()[0].rstrip(","))
    return out


@pytest.mark.parametrize("method, own", [("herding", None), ("kcenter", "kcenter"), ("ccs", "ccs"),
                                         ("random", None), ("sre2l", None)])
def test_help_shows_the_selection_group_for_selection_methods_only(cli, capsys, method, own):
    assert cli(["recover", "--method", method, "--help"]) == 0
    sections = _sections(capsys.readouterr().out)
    assert [t for t in sections if t.startswith("plug-in ")] == ([f"plug-in {own}"] if own else [])
    selects = method != "sre2l"
    assert ("selection select" in sections) is selects and ("parametrisation multires" in sections) is not selects
    if selects:
        assert sections["selection select"] == ["--select-scores"]


# ----------------------------------------------------------------------------- end to end
def _check_folder(out, train, expected: list[list[int]]):
    """The folder reads back, each image is its training image bit for bit, and the records hold the indices."""
    ds = load_distilled(out)
    flat = [i for per_class in expected for i in per_class]
    assert ds.start_indices == [[i] for i in flat]
    assert torch.equal(ds.images, train.get_images(torch.tensor(flat)))
    assert ds.targets.tolist() == train.targets[flat].tolist()
    return ds


def test_recover_herding_writes_the_chosen_training_images(cli, capsys, digits, tmp_path):
    train, info = digits
    scores = fake_scores(train.targets)
    folder = score_folder(tmp_path / "scores", scores)
    out = tmp_path / "herding"
    assert cli(["recover", "--method", "herding", "--dataset", "digits", "--device", "cpu", "--ipc", "3",
                "--batch-size", "4", "--select-scores", folder, "--out", out]) == 0
    expected = []
    for members in class_indices(train.targets, info.num_classes):
        pts = [tuple(r) for r in scores["embedding"][members].double().tolist()]
        expected.append(members[brute_herding(pts, 3)].tolist())
    _check_folder(out, train, expected)
    m = read_json(out / MANIFEST)
    prov = m["inputs"]["plugin"]
    assert prov["name"] == "herding" and prov["scores"]["kinds"] == ["embedding"]
    assert prov["scores"]["config_hash"] == "feedc0de" and len(prov["scores"]["sha256"]) == 64
    sel = [s for r in m["outputs"]["batches"] for s in r["selection"]]
    assert {(s["class"], s["pick"], s["index"]) for s in sel} == {
        (c, k, i) for c, per in enumerate(expected) for k, i in enumerate(per)}
    # a re-run over changed scores refuses to resume the finished batches
    score_folder(folder, dict(scores, embedding=scores["embedding"] + 1))
    assert cli(["recover", "--method", "herding", "--dataset", "digits", "--device", "cpu", "--ipc", "3",
                "--batch-size", "4", "--select-scores", folder, "--out", out]) == 2
    assert "plugin/scores changed since" in capsys.readouterr().err


def test_recover_random_is_the_random_real_baseline(cli, digits, tmp_path):
    train, info = digits
    out = tmp_path / "random"
    assert cli(["recover", "--method", "random", "--dataset", "digits", "--device", "cpu", "--ipc", "2",
                "--seed", "5", "--out", out]) == 0
    baseline = random_real_indices(train, info.num_classes, 2, 5).view(info.num_classes, 2).tolist()
    _check_folder(out, train, baseline)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["herding", "bps"])
def test_two_torchrun_ranks_select_what_one_process_selects(cli, digits, tmp_path, method):
    """Recovery batches are shared out over ranks; a selector's per-class choice is made on each rank that needs the
    class, so both must give the same folder: the same images in the same places, the same records."""
    from conftest import run_torchrun

    train, _ = digits
    g = torch.Generator().manual_seed(3)
    scores = dict(fake_scores(train.targets, dim=8), entropy=torch.rand(len(train.targets), generator=g))
    folder = score_folder(tmp_path / "scores", scores)
    args = ["recover", "--method", method, "--dataset", "digits", "--device", "cpu", "--ipc", "5", "--batch-size", "7",
            "--select-scores", folder]
    assert cli(args + ["--out", tmp_path / "one"]) == 0
    run_torchrun(args + ["--out", tmp_path / "two"])
    one, two = load_distilled(tmp_path / "one"), load_distilled(tmp_path / "two")
    assert torch.equal(one.images, two.images) and one.start_indices == two.start_indices
    assert torch.equal(one.targets, two.targets)

    def picks(out):
        m = read_json(out / MANIFEST)
        return sorted((s["class"], s["pick"], s["index"]) for r in m["outputs"]["batches"] for s in r["selection"])

    assert picks(tmp_path / "one") == picks(tmp_path / "two") and len(picks(tmp_path / "one")) == 50
    assert read_json(tmp_path / "two" / MANIFEST)["world_size"] == 2
