"""The score stage (stages/score.py) against direct computations on digits: the teacher's penultimate features and
entropy, a replayed training run's per-pass correctness and margins and its EL2N, kinds added to a finished folder,
one-line refusals, an embedder registered from outside, kill -9 resume and two torchrun ranks (slow)."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_torchrun
from prismdd.artifacts import LOCK_FILE, MANIFEST, SCORES_FILE, file_digest, find_teachers, load_model, load_scores
from prismdd.core.augment import apply_views, sample_views
from prismdd.core.config import build_config, opt
from prismdd.core.data import load_dataset, normalize
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json
from prismdd.core.models import create_model
from prismdd.core.runtime import derive_seed, make_generator
from prismdd.core.training import lr_factor, make_optimizer
from prismdd.methods.embed import EMBEDDERS, Embedder, EmbedderOptions, embedder, embedder_option_groups
from prismdd.stages.score import ScoreConfig, score

# two runs of three epochs of a width-0.25 ConvNet, 6 steps an epoch: seconds on one core
TINY = dict(dataset="digits", device="cpu", record_runs=2, record_epochs=3, record_width=0.25, batch_size=256)
PICK = torch.tensor([0, 7, 500, 1000, 1436])  # a few training images, first and last included


def run_score(out, teachers, **settings) -> "torch.nn.Module":
    score(build_config(ScoreConfig, dict(TINY, teachers=str(teachers), out=str(out), **settings)))
    return load_scores(out)


@pytest.fixture(scope="module")
def digits():
    train, _, info = load_dataset("digits")
    return train, info


@pytest.fixture(scope="module")
def scored(zoo, tmp_path_factory):
    """embedding, entropy and dynamics of the session zoo's convnet, made once for the module."""
    return run_score(tmp_path_factory.mktemp("scores"), zoo, kinds="embedding,entropy,dynamics")


# ----------------------------------------------------------------------------- embedding and entropy
def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the classifier, computed without a hook: the net with its last layer replaced by Identity."""
    m = copy.deepcopy(model)
    if hasattr(m, "fc"):  # torchvision ResNet
        m.fc = nn.Identity()
    else:  # ConvNet
        m.classifier = nn.Identity()
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_embedding_and_entropy_equal_a_direct_forward(zoo, digits, tmp_path, arch):
    train, info = digits
    s = run_score(tmp_path / arch, zoo, kinds="embedding,entropy", embed_arch=arch)
    model, _ = load_model(find_teachers(zoo)[arch])
    x = normalize(train.images[PICK], info)
    want = penultimate(model, x)
    assert s.embedding.shape == (len(train), want.shape[1]) and s.embedding.dtype == torch.float32
    torch.testing.assert_close(s.embedding[PICK], want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    entropy = -(p * p.log()).sum(1)  # nats
    torch.testing.assert_close(s.entropy[PICK].double(), entropy, rtol=1e-5, atol=1e-6)
    assert torch.equal(s.targets, train.targets)
    m = read_json(tmp_path / arch / MANIFEST)
    assert m["stage"] == "score" and m["inputs"]["embedder"] == "teacher"
    assert m["inputs"]["digests"] == {f"teacher {arch}": file_digest(find_teachers(zoo)[arch] / "model.safetensors")}
    assert m["outputs"]["files"] == {SCORES_FILE: file_digest(tmp_path / arch / SCORES_FILE)}
    assert not (tmp_path / arch / "work").exists()


# ----------------------------------------------------------------------------- training dynamics
def replay_run(r: int, train, info, epochs: int, el2n_after: int):
    """Run r of TINY retold from the stage's documented rules: initial weights from (seed, 'score-run', r); epoch e's
    order and views from the generator (seed, 'score-run', r, e); SGD with the cosine LR of every step; the rows
    read off each training pass one example at a time."""
    n, batch, seed = len(train), 256, 0
    steps = math.ceil(n / batch)
    torch.manual_seed(derive_seed(seed, "score-run", r))
    model = create_model("convnet", 10, 1, 8, 0.25)
    opt = make_optimizer("sgd", model.parameters(), 0.1, 5e-4)
    correct = torch.zeros(epochs, n, dtype=torch.uint8)
    margin = torch.zeros(epochs, n)
    el2n = None
    for e in range(epochs):
        model.train()
        gen = make_generator(seed, "score-run", r, e)
        for k, idx in enumerate(torch.randperm(n, generator=gen).tensor_split(steps)):
            for g in opt.param_groups:
                g["lr"] = 0.1 * lr_factor("cosine", (e * steps + k) / (epochs * steps))
            x = normalize(train.images[idx], info)
            x = apply_views(x, sample_views(len(x), gen, (0.8, 1.0), flip=True))
            y = train.targets[idx]
            opt.zero_grad()
            logits = model(x)
            for row, (i, z, label) in enumerate(zip(idx.tolist(), logits.detach(), y.tolist())):
                others = [float(z[j]) for j in range(10) if j != label]
                correct[e, i] = int(int(z.argmax()) == label)
                margin[e, i] = float(z[label]) - max(others)
            F.cross_entropy(logits, y).backward()
            opt.step()
        if e + 1 == el2n_after:
            model.eval()
            with torch.no_grad():
                p = torch.softmax(model(normalize(train.images, info)).double(), 1)
            el2n = (p - F.one_hot(train.targets, 10).double()).pow(2).sum(1).sqrt()
    return correct, margin, el2n


def test_dynamics_rows_equal_a_replayed_run(scored, digits):
    train, info = digits
    s = scored
    assert s.correct.shape == (2, 3, len(train)) and s.margin.shape == (2, 3, len(train))
    assert s.el2n.shape == (2, len(train))
    m = read_json(s.folder / MANIFEST)["inputs"]["kinds"]["dynamics"]
    assert m["el2n_epoch"] == 1 and m["epochs"] == 3 and m["runs"] == 2  # 10 % of 3 epochs, at least 1
    correct, margin, el2n = replay_run(1, train, info, 3, 1)
    assert torch.equal(s.correct[1], correct)
    torch.testing.assert_close(s.margin[1], margin, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.el2n[1].double(), el2n, rtol=1e-4, atol=1e-5)
    # a pass is right exactly when its label's logit beats every other
    assert torch.equal(s.correct.bool(), s.margin > 0)
    assert not torch.equal(s.correct[0], s.correct[1])  # two runs, two initialisations and orders
    assert 0 <= float(s.el2n.min()) and float(s.el2n.max()) <= math.sqrt(2)
    assert len(read_json(s.folder / MANIFEST)["outputs"]["runs_test_top1"]) == 2


def test_scores_are_deterministic(scored, zoo, tmp_path):
    again = run_score(tmp_path / "again", zoo, kinds="embedding,entropy,dynamics")
    assert file_digest(again.folder / SCORES_FILE) == file_digest(scored.folder / SCORES_FILE)


# ----------------------------------------------------------------------------- kinds added and kept
def test_adding_a_kind_keeps_the_others_byte_identical(zoo, tmp_path, capsys):
    out = tmp_path / "s"
    first = run_score(out, zoo, kinds="entropy")
    assert first.kinds == ["entropy"]
    second = run_score(out, zoo, kinds="embedding")  # entropy is kept although not asked for again
    assert second.kinds == ["embedding", "entropy"] and torch.equal(second.entropy, first.entropy)
    m = read_json(out / MANIFEST)
    assert set(m["inputs"]["kinds"]) == {"embedding", "entropy"} and m["outputs"]["kinds"] == ["embedding", "entropy"]
    before = file_digest(out / SCORES_FILE)
    run_score(out, zoo, kinds="entropy,embedding")
    assert "nothing to do" in capsys.readouterr().out and file_digest(out / SCORES_FILE) == before
    # the entropy of another teacher is not that entropy: refused, the folder stays as it was
    with pytest.raises(PrismError, match=r"its entropy scores were made with other settings \(arch: convnet then, "
                                         r"resnet18 now\); use --force"):
        run_score(out, zoo, kinds="entropy", embed_arch="resnet18")
    assert file_digest(out / SCORES_FILE) == before
    forced = run_score(out, zoo, kinds="entropy", embed_arch="resnet18", force=True)
    assert forced.kinds == ["entropy"] and not torch.equal(forced.entropy, first.entropy)


def test_a_file_written_before_a_kill_is_finished_by_the_rerun(zoo, tmp_path):
    """Killed between scores.safetensors and its manifest: the re-run keeps the file and writes the manifest."""
    out = tmp_path / "s"
    first = run_score(out, zoo, kinds="entropy")
    (out / MANIFEST).unlink()
    again = run_score(out, zoo, kinds="entropy")
    assert torch.equal(again.entropy, first.entropy) and (out / MANIFEST).exists()


# ----------------------------------------------------------------------------- one-line refusals
def _error(cli, capsys, argv) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prismdd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_bad_inputs_are_refused_in_one_line(zoo, tmp_path, cli, capsys):
    base = ["score", "--dataset", "digits", "--device", "cpu", "--teachers", zoo, "--out", tmp_path / "o"]
    assert "--kinds 'embedding,gradnorm' (gradnorm unknown)" in _error(cli, capsys, base + ["--kinds",
                                                                                          "embedding,gradnorm"])
    msg = _error(cli, capsys, base + ["--embed-arch", "resnet50"])
    assert "--embed-arch resnet50: no resnet50 teacher" in msg and f"prismdd squeeze --arch resnet50 --out {zoo}" in msg
    msg = _error(cli, capsys, base + ["--teachers", tmp_path / "none"])
    assert "folder not found" in msg and "prismdd squeeze --arch convnet" in msg
    assert "--el2n-epoch 5: after the last of --record-epochs 3" in _error(
        cli, capsys, base + ["--kinds", "dynamics", "--record-epochs", "3", "--el2n-epoch", "5"])
    assert "unknown embedder 'nope'" in _error(cli, capsys, base + ["--embed", "nope"])
    assert "expected the output of score, found 'squeeze'" in _error(
        cli, capsys, base[:-1] + [zoo, "--kinds", "entropy"])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- an embedder from outside
class PixelMean(Embedder):
    """A test embedder: each channel's mean pixel, and its square (D = 2 C); reads no teacher."""

    summary = "test"

    @classmethod
    def settings(cls, cfg):
        return {"what": "pixel mean"}

    def __call__(self, images):
        m = images.float().mean((2, 3))
        return torch.cat([m, m * m], 1)


def test_a_registered_embedder_needs_only_settings_and_call(tmp_path, digits, monkeypatch):
    monkeypatch.setitem(EMBEDDERS._items, "pixelmean", PixelMean)
    PixelMean.name = "pixelmean"
    s = run_score(tmp_path / "s", tmp_path / "no-teachers", kinds="embedding", embed="pixelmean")
    train, _ = digits
    m = train.images.float().mean((2, 3))
    assert torch.equal(s.embedding, torch.cat([m, m * m], 1))
    rec = read_json(tmp_path / "s" / MANIFEST)["inputs"]
    assert rec["embedder"] == "pixelmean" and rec["kinds"]["embedding"]["what"] == "pixel mean" and not rec["digests"]


# ----------------------------------------------------------------------------- kill -9, torchrun
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    settings, n = json.loads(sys.argv[1]), int(sys.argv[2])
    real_replace, calls = os.replace, [0]
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    os.replace = replace
    from prismdd.core.config import build_config, opt
    from prismdd.stages.score import ScoreConfig, score
    score(build_config(ScoreConfig, settings))
""")


@pytest.mark.slow
def test_kill9_mid_run_then_resume_is_identical(scored, zoo, tmp_path, cli, capsys):
    """Killed with run 1's second checkpoint written but not renamed (renames: the lock, run 0's three checkpoints,
    run 0's file, run 1's first checkpoint, then this one); the re-run keeps run 0, resumes run 1 after its first
    epoch and ends with the bytes of an uninterrupted run."""
    out = tmp_path / "killed"
    settings = dict(TINY, teachers=str(zoo), out=str(out), kinds="dynamics")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), "7"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "work" / "run_000.safetensors").exists() and (out / "work" / "run_001.pt").exists()
    assert not (out / SCORES_FILE).exists()
    assert cli(["score", "--dataset", "digits", "--device", "cpu", "--teachers", zoo, "--out", out, "--kinds",
                "dynamics", "--record-runs", 2, "--record-epochs", 3, "--record-width", 0.25, "--batch-size", 256]) == 0
    said = capsys.readouterr().out
    assert "run 1/2: finished" in said and "run 2/2: resuming after epoch 1" in said
    got = load_scores(out, ["dynamics"])
    for name in ("correct", "margin", "el2n"):
        assert torch.equal(getattr(got, name), getattr(scored, name)), name
    assert not (out / "work").exists() and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(scored, zoo, tmp_path):
    out = tmp_path / "ddp"
    run_torchrun(["score", "--dataset", "digits", "--device", "cpu", "--teachers", zoo, "--out", out, "--kinds",
                  "embedding,entropy,dynamics", "--record-runs", 2, "--record-epochs", 3, "--record-width", 0.25,
                  "--batch-size", 256])
    got = load_scores(out, ["embedding", "entropy", "dynamics"])
    for name in ("targets", "embedding", "entropy", "correct", "margin", "el2n"):
        assert torch.equal(getattr(got, name), getattr(scored, name)), name
    assert read_json(out / MANIFEST)["world_size"] == 2
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["run_000.jsonl", "run_001.jsonl"]


def test_an_embedders_options_must_carry_its_prefix(monkeypatch):
    monkeypatch.setattr(EMBEDDERS, "_items", dict(EMBEDDERS._items))  # registrations here stay in this test

    @dataclass
    class Good(EmbedderOptions):
        toy_dim: int = opt(4, "output width")

    @dataclass
    class Bad(EmbedderOptions):
        dim: int = opt(4, "output width")

    @dataclass
    class Plain:
        toy3_dim: int = opt(4, "output width")

    embedder("toy")(type("Toy", (Embedder,), {"options": Good}))
    assert Good in embedder_option_groups()
    # its fields take part in the config hash only when it is the chosen embedder
    assert Good.active(type("C", (), {"embed": "toy"})) and not Good.active(type("C", (), {"embed": "teacher"}))
    with pytest.raises(ValueError, match="dim lack the prefix 'toy2_'"):
        embedder("toy2")(type("Toy2", (Embedder,), {"options": Bad}))
    with pytest.raises(ValueError, match="must subclass EmbedderOptions"):
        embedder("toy3")(type("Toy3", (Embedder,), {"options": Plain}))
