#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a virtual environment in .venv with the pinned
# PyTorch build, prismdd itself (editable) with its test, diffusion and timm extras, and, where we are root on Debian,
# the Fashion-MNIST package that provides the default dataset offline. `--tests` also makes .venv-ddranking, the
# environment of the test that runs DD-Ranking's own evaluator on an export (ddranking 0.2.0 pins numpy < 2, so it
# cannot share .venv; it sees .venv's torch through a .pth file and shadows only what it pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
# the diffusion and clip extras (diffusers + transformers, for --method d4m / t2i and --clip-prior): about 250 MB and 20 s more; timm for
# --rand-augment (DELT's student protocol) and timm:<name> models
if ! .venv/bin/python -c "import prismdd, pytest, xdist, diffusers, transformers, timm, faiss, infomap" 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/pip install -q -e ".[test,diffusion,clip,timm]"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null
  else
    echo "note: Fashion-MNIST not installed; run 'sudo apt-get install dataset-fashion-mnist' or pass --data-root/--download" >&2
  fi
fi
if [ "${1:-}" = "--tests" ] && ! .venv-ddranking/bin/python -c "import ddranking" 2>/dev/null; then
  "$PY" -m venv .venv-ddranking
  SITE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
  DSITE=$(.venv-ddranking/bin/python -c "import site; print(site.getsitepackages()[0])")
  echo "$SITE" > "$DSITE/zz-prismdd-venv.pth"  # after its own packages: its numpy < 2 wins, torch comes from .venv
  .venv-ddranking/bin/pip install -q ddranking==0.2.0
fi
