#!/bin/bash
# Two digits quick jobs started together per setting; wall per job and the 1-minute load (BENCHMARKS.md 14.1).
# Usage: bash benchmarks/threads_pair.sh OUT_DIR    (from the repository root, after scripts/setup.sh)
out=${1:-/tmp/threads_pair}
pair() {  # $1 name, the rest: extra flags
  name=$1; shift
  rm -rf "$out/$name"; mkdir -p "$out/$name"
  l0=$(cut -d' ' -f1 /proc/loadavg)
  for j in a b; do
    ( s=$(date +%s.%N); .venv/bin/python -m prismdd run --dataset digits --quick --out "$out/$name/$j" "$@" \
        > "$out/$name/$j.log" 2>&1; echo "$name $j $(echo "$(date +%s.%N) - $s" | bc) s" >> "$out/results.txt" ) &
  done
  wait
  echo "$name load at start $l0, at end $(cut -d' ' -f1 /proc/loadavg)" >> "$out/results.txt"
}
pair default
pair threads1 --threads 1
OMP_WAIT_POLICY=ACTIVE pair spinning-default
cat "$out/results.txt"
