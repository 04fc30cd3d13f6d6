#!/bin/bash
# Herding (IPC 1) against random real under hard labels with the student's norm, width and augmentation varied: the
# measured reason why section 16.2's hard-label margin is smaller than the DC paper's (BENCHMARKS.md 16.3).
#
#   bash benchmarks/dc_protocol.sh NAME [validate options...]
#   bash benchmarks/dc_protocol.sh dc-like --student convnet_in --student-width 1.0 --no-augment
#
# Reads the herding folders of `quality.py --only selection/ipc1` (results.jsonl: run that first), trains one
# student per set and seed (0, 1, 2; seed s of both rows is a pair) with quality.py's hard cell (`--protocol hard`,
# ConvNet width 0.5, 300 epochs) plus the given options (later options win),
# writes benchmarks/out/dc-protocol/NAME/{herding,random}-sS and prints one line per run. OUT, PYTHON, and for the
# smoke test DATASET, EPOCHS and SEEDS override the defaults below.
set -euo pipefail
name=$1; shift
root=${OUT:-benchmarks/out}
py=${PYTHON:-.venv/bin/python}
dataset=${DATASET:-fashion-mnist}
epochs=${EPOCHS:-300}
for s in ${SEEDS:-0 1 2}; do
  herding=$("$py" - "$root/$dataset" "$s" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
if not (root / "results.jsonl").exists():
    sys.exit(f"{root}/results.jsonl: not found; run quality.py --only selection/ipc1 first (or set OUT)")
rows = [json.loads(line) for line in open(root / "results.jsonl")]
hits = [r["distilled"] for r in rows if r["experiment"] == "selection/ipc1" and r["cell"] == "herding, hard"
        and r["seed"] == int(sys.argv[2])]
if not hits:
    sys.exit(f"{root}/results.jsonl: no herding cell for seed {sys.argv[2]}; run quality.py --only selection/ipc1 first")
print(root / "stages" / Path(hits[-1]).name)  # the folder's path as recorded is relative to quality.py's cwd
EOF
)
  for set in herding random; do
    if [ "$set" = herding ]; then src=(--distilled "$herding"); else src=(--random-real --ipc 1); fi
    out="$root/dc-protocol/$name/$set-s$s"
    OMP_NUM_THREADS=1 "$py" -m prismdd validate -q --threads 1 --dataset "$dataset" --protocol hard \
      --student-width 0.5 --epochs "$epochs" --eval-every "$epochs" "${src[@]}" --seed "$s" --seeds "$s" "$@" \
      --out "$out"
    "$py" -c "import json, sys; print(sys.argv[1], sys.argv[2], sys.argv[3], json.load(open(sys.argv[4]))['top1'])" \
      "$name" "$set" "$s" "$out/accuracy.json"
  done
done
