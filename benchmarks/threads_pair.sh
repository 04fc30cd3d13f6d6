#!/bin/bash
# Two quick jobs started together per setting; wall per job and the 1-minute load (BENCHMARKS.md 14.1).
# Usage: bash benchmarks/threads_pair.sh OUT_DIR [DATASET] [SETTINGS]    (from the repository root, after
# scripts/setup.sh). DATASET: digits (default) or fashion-mnist (the README main job's); SETTINGS: a space-separated
# subset of "default threads1 spinning-default" (default: all three).
out=${1:-/tmp/threads_pair}
dataset=${2:-digits}
settings=${3:-default threads1 spinning-default}
pair() {  # $1 name, the rest: extra flags
  name=$1; shift
  rm -rf "${out:?}/$name"; mkdir -p "$out/$name"
  l0=$(cut -d' ' -f1 /proc/loadavg)
  for j in a b; do
    ( s=$(date +%s.%N); .venv/bin/python -m prismdd run --dataset "$dataset" --quick --out "$out/$name/$j" "$@" \
        > "$out/$name/$j.log" 2>&1; echo "$dataset $name $j $(echo "$(date +%s.%N) - $s" | bc) s" >> "$out/results.txt" ) &
  done
  wait
  echo "$dataset $name load at start $l0, at end $(cut -d' ' -f1 /proc/loadavg)" >> "$out/results.txt"
}
for s in $settings; do
  case $s in
    default) pair default ;;
    threads1) pair threads1 --threads 1 ;;
    spinning-default) OMP_WAIT_POLICY=ACTIVE pair spinning-default ;;
  esac
done
cat "$out/results.txt"
