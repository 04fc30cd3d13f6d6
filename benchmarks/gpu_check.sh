#!/usr/bin/env bash
# One prepared GPU check, under 9 minutes on one GPU; every table goes to ONE file (default gpu_check.md).
#
#   bash benchmarks/gpu_check.sh [OUT_FILE]          # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh  # its CPU-runnable parts at tiny sizes (section 5 on digits):
#                                                    # checks that the script itself runs; its numbers mean nothing
#
# Sections, each under its own time limit (seconds in brackets; 520 s in all):
#   1. the machine (nvidia-smi, torch) [10]
#   2. the test suite's CUDA-marked tests: pytest -m cuda [45]
#   3. recover speed at 224 px with the seed's ImageNet pool at width 1 (ResNet-18 primary, MobileNet-V2,
#      EfficientNet-B0, ShuffleNet-V2 x0.5), batch 100: the plain reference-structured loop vs prismdd's engine
#      in fp32 eager (contiguous), channels_last, bf16 autocast, torch.compile (cold compile not timed) [150]
#   4. relabel and validate throughput: benchmarks/scale.py on 1000 classes at 224 px, one rank [120]
#   5. the Fashion-MNIST main job (--quick) with full-width teachers (teacher_width=1.0) [135]
#   6. appendix D/E: multires / view noise / CLIP prior step times, a generator's s per image [60]
# A section that runs out of time is cut off and says so; the rest still run.
set -u
OUT_FILE=$(realpath -m "${1:-gpu_check.md}")
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
WORK=${WORK:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PRISMDD_CACHE="$WORK/cache"

section() { printf '\n## %s\n\n' "$1" >> "$OUT_FILE"; }
limited() {  # limited SECONDS CMD...: runs CMD, appends its output as a code block, notes a timeout
  local secs=$1; shift
  local t0=$SECONDS
  echo '```' >> "$OUT_FILE"
  timeout --kill-after=10 "$secs" "$@" >> "$OUT_FILE" 2>&1
  local rc=$?
  echo '```' >> "$OUT_FILE"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "**cut off after ${secs} s**" >> "$OUT_FILE";
  elif [ $rc -ne 0 ]; then echo "**exit code $rc**" >> "$OUT_FILE"; fi
  echo "($((SECONDS - t0)) s: \`$*\`)" >> "$OUT_FILE"
}

echo "# prismdd GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), device=$DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null)" > "$OUT_FILE"

section "1. machine"
limited 10 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo 'no nvidia-smi'; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'"

section "2. CUDA-marked tests (pytest -m cuda)"
limited 45 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests

section "3. recover speed, 224 px, the ImageNet pool at width 1"
if [ "$QUICK" = 1 ]; then RS_ARGS="--res 32 --batch 4 --iters 2 --archs resnet18,shufflenet_v2_x0_5"; else RS_ARGS="--res 224 --batch 100 --iters 20"; fi
limited 150 "$PY" - --device "$DEVICE" $RS_ARGS <<'PYEOF'
import argparse, sys, time
from contextlib import ExitStack
import torch
sys.path.insert(0, "benchmarks")
from recover_speed import make_teachers, plain_loop  # the reference-structured loop
from prismdd.core.data import DatasetInfo, IMAGENET_MEAN, IMAGENET_STD
from prismdd.stages.recover import Engine, Teacher, recover_config

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda"); p.add_argument("--res", type=int, default=224)
p.add_argument("--batch", type=int, default=100); p.add_argument("--iters", type=int, default=20)
p.add_argument("--archs", default="resnet18,mobilenet_v2,efficientnet_b0,shufflenet_v2_x0_5")
a = p.parse_args()
dev = torch.device(a.device)
archs = a.archs.split(",")
teachers = {k: m.to(dev) for k, m in make_teachers(archs, 1.0, a.res, 3, 1000).items()}
info = DatasetInfo("bench", [str(i) for i in range(1000)], 3, a.res, IMAGENET_MEAN, IMAGENET_STD)
x0 = torch.randn(a.batch, 3, a.res, a.res, generator=torch.Generator().manual_seed(0)).to(dev)
y = (torch.arange(a.batch) % 1000).to(dev)

def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()

def engine(iters, channels_last=True, amp=False, compile_=False):
    cfg = recover_config("prism", iterations=iters, channels_last=channels_last, compile=compile_, amp=amp,
                         budget="constant", alpha_bn=0.01, log_every=10 ** 9)
    ts = {k: Teacher(k, m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format), {}, "")
          for k, m in teachers.items()}
    with ExitStack() as stack:
        eng = Engine(cfg, info, ts[archs[0]], ts, dev, stack)
        eng.run_batch(0, [(int(c), 0) for c in y], archs, x0, None)

def timed(fn, *args, **kw):
    fn(1, *args, **kw) if fn is engine else fn(teachers, archs[0], archs, x0, y, 1)  # warm-up
    sync(); t = time.perf_counter()
    fn(a.iters, *args, **kw) if fn is engine else fn(teachers, archs[0], archs, x0, y, a.iters)
    sync(); return time.perf_counter() - t

rows = [("plain loop (reference structure), fp32", lambda: timed(plain_loop)),
        ("prismdd engine, fp32 eager, contiguous", lambda: timed(engine, channels_last=False)),
        ("prismdd engine, fp32, channels_last", lambda: timed(engine)),
        ("prismdd engine, bf16 autocast, channels_last", lambda: timed(engine, amp=True)),
        ("prismdd engine, torch.compile, channels_last", lambda: timed(engine, compile_=True))]
print(f"BN set {','.join(archs)} (primary {archs[0]}), width 1, {a.res} px, batch {a.batch}, {a.iters} iterations, "
      f"device {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
print(f"| loop | seconds | image-iterations/s | vs plain |\n|---|---|---|---|")
base = None
for name, fn in rows:
    try:
        t = fn()
    except Exception as e:  # one failing variant (e.g. compile) must not hide the others
        print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |"); continue
    base = base or t
    print(f"| {name} | {t:.2f} | {a.batch * a.iters / t:.1f} | {base / t:.2f}x |", flush=True)
PYEOF

section "4. relabel and validate throughput (benchmarks/scale.py, 1000 classes, 224 px, one rank)"
if [ "$QUICK" = 1 ]; then SC_ARGS="--classes 10 --iterations 1 --relabel-epochs 1 --validate-steps 1"; else SC_ARGS="--classes 1000 --train-per-class 2 --iterations 20 --recover-batch-size 100 --relabel-epochs 2 --validate-steps 10"; fi
limited 120 "$PY" benchmarks/scale.py --out "$WORK/scale" --device "$DEVICE" --nproc 1 $SC_ARGS
[ -f "$WORK/scale/scale.json" ] && "$PY" - "$WORK/scale/scale.json" >> "$OUT_FILE" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1])); s = r["stages"]; c = r["config"]
n = s["recover"]["images"]
print(f"\nrelabel: {n * c['relabel_epochs'] / s['relabel']['seconds']:.1f} image-epochs/s (process wall, incl. start-up); "
      f"validate: {c['validate_steps'] * c['relabel_epochs']} steps + test evaluation in {s['validate']['seconds']} s")
PYEOF

section "5. Fashion-MNIST main job, --quick, full-width teachers"
if [ "$QUICK" = 1 ]; then
  limited 135 bash -o pipefail -c "$PY -m prismdd run --dataset digits --quick --set teacher_width=1.0 --set teacher_steps=20 \
    --set observer_steps=20 --set iterations=5 --set student_epochs=3 --set full_steps=10 --device $DEVICE --out $WORK/digits | tail -n 8"
elif "$PY" -m prismdd datasets 2>/dev/null | grep -q "^fashion-mnist *| */"; then
  limited 135 bash -o pipefail -c "$PY -m prismdd run --dataset fashion-mnist --quick --set teacher_width=1.0 --device $DEVICE \
    --out $WORK/fmnist | tail -n 8"
  [ -f "$WORK/fmnist/results.json" ] && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('\ntimings (s):', r['timings'])" "$WORK/fmnist/results.json" >> "$OUT_FILE"
else
  echo "skipped: Fashion-MNIST is not installed on this machine (apt-get install dataset-fashion-mnist, or copy the IDX files and pass --data-root)" >> "$OUT_FILE"
fi

section "6. appendix D/E options: multi-resolution, view noise, CLIP prior, a text-to-image generator"
# CLIP_MODEL / T2I_MODEL: local folders or ids already in the Hugging Face cache (nothing is downloaded; a model that
# is not there is a row saying so). Multi-resolution and view noise need no weights and are always timed.
CLIP_MODEL=${CLIP_MODEL:-openai/clip-vit-base-patch32}
T2I_MODEL=${T2I_MODEL:-stabilityai/sdxl-turbo}
if [ "$QUICK" = 1 ]; then AT_ARGS="--res 32 --batch 4 --iters 2 --t2i-images 2"; else AT_ARGS="--res 224 --batch 100 --iters 10 --t2i-images 8"; fi
limited 60 "$PY" benchmarks/appendix_timing.py --device "$DEVICE" $AT_ARGS --clip "$CLIP_MODEL" --t2i "$T2I_MODEL"

echo "wrote $OUT_FILE (work folder $WORK)"
