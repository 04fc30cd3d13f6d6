"""The README, read as a newcomer reads it: its Python snippet runs as written, and the files it names exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


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
