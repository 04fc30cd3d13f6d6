"""The README, read as a newcomer reads it: its Python snippet runs as written, and the files it names exist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prismdd.core.io import read_json

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_api_snippet_runs_as_written(tmp_path):
    snippet = README.split("Python API:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "20 recover"


def test_every_file_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links, "the README links its documents"
    missing = [p for p in links if not p.startswith("http") and not (ROOT / p).exists()]
    assert not missing, missing
    for name in re.findall(r"`((?:docs|benchmarks|scripts|configs)/[\w./-]+)`", README):
        assert (ROOT / name).exists(), name


def _commands(text: str) -> list[str]:
    """The commands of a shell block, continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", text)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_going_on_from_the_main_job_as_written(tmp_path):
    """Issue 36: after a main job (tiny settings), the README's commands that go on from it run as written in a
    shell, and they are the commands the job printed at its end with its own folders and settings filled in."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PRISMDD_PY=sys.executable)  # PYTHONPATH passes through
    tiny = ["--dataset", "digits", "--quick", "--ipc", "1", "--methods", "prism", "--baselines", "random-real",
            "--teacher-steps", "5", "--observer-steps", "5", "--iterations", "2", "--student-epochs", "2",
            "--device", "cpu", "--out", "runs/main"]
    job = subprocess.run([sys.executable, "-m", "prismdd", "run", *tiny], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=env)
    assert job.returncode == 0, job.stderr[-3000:]
    ending = job.stdout.split("[run] stage folders", 1)[1]
    stages = sorted(p.name for p in (tmp_path / "runs/main/stages").iterdir())
    assert stages and all(f"runs/main/stages/{name}" in ending for name in stages)  # every stage folder, named
    block = README.split("**Going on from the main job.**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme = _commands(block)
    assert [c.split()[1] for c in readme] == ["relabel", "validate"]
    # the printed commands, with this job's folders written as the README's globs and its 2 epochs as the default 300
    printed = [c for c in _commands(ending) if c.startswith("prismdd ")]
    for name in stages:
        printed = [c.replace(f"runs/main/stages/{name}", f"runs/main/stages/{name.rsplit('-', 1)[0]}-*")
                   for c in printed]
    printed = [c.replace("--epochs 2 ", "--epochs 300 ") for c in printed]
    assert all(c in printed for c in readme), (readme, printed)
    assert any(c.startswith("prismdd audit --dataset digits --quick --out runs/main/audit") for c in printed)
    assert "(export: DD-Ranking 0.2.0 scores CIFAR-10/100 and ImageNet subsets only, not digits)" in ending

    shell = 'prismdd() { "$PRISMDD_PY" -m prismdd "$@"; }\nset -e\n' + block
    proc = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(tmp_path / "runs/main/eval-prism/accuracy.json")["protocol"]["epochs"] == 300
