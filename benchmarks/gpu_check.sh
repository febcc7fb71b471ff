#!/usr/bin/env bash
# The GPU checks of a session on one GPU machine, in at most BUDGET_S seconds (default 470, under the
# 8 minutes a check may take): the GPU-marked tests, then the throughput sweep of the issue-14 targets,
# then (time permitting) every method at 32 and 224 px (the per-method table). Every step's output and JSON go to OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Extra Python packages the machine lacks (FFCV's cp312 wheel and what it needs) may travel in
# .device/wheels (and shared libraries in .device/lib); they are installed from there, offline. env.txt
# says which loaders ran: torch always; dali and ffcv only where they import.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PY:-python3}
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))
WORKERS=${WORKERS:-14}

# run NAME LIMIT_S COMMAND...: the command under a time limit cut to what is left; its output in NAME.log.
run() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if [ "$left" -lt 25 ]; then
    echo "skipped $name: ${left}s left" | tee -a "$OUT/skipped.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, ${left}s left)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "exit $? after $((SECONDS))s" >>"$OUT/$name.log"
  grep -v "it/s" "$OUT/$name.log" | tail -4
}

if ls .device/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .device/wheels/*.whl >"$OUT/wheels.log" 2>&1
  export LD_LIBRARY_PATH=$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("accelerate", "triton", "numba", "timm", "ffcv", "nvidia.dali"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "imported"))
    except Exception as error:  # a loader that cannot import here is reported, not fatal
        print(name, "NOT AVAILABLE:", type(error).__name__, str(error)[:120])
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
LOADERS=torch,no-model:torch
grep -q "^ffcv NOT" "$OUT/env.txt" || LOADERS=$LOADERS,ffcv,no-model:ffcv
grep -q "^nvidia.dali NOT" "$OUT/env.txt" || LOADERS=$LOADERS,dali,no-model:dali

TP="$PY -m benchmarks.throughput --precision bf16 --channels-last --warmup 3 --window 5 --windows 3 --profile-steps 3"
S224="--image-size 224 --patch-size 32 --width 1"

# `-o addopts=` drops the two xdist workers of pyproject.toml: pytest-xdist is not on the GPU machine.
run gpu_tests 150 $PY -m pytest -q -p no:cacheprovider -o addopts= -m "gpu or timm" tests/
# Selfie at 224 px, full-width ResNet-36 + A: eager against the graphed step over the batch sweep.
run selfie224_eager 75 $TP $S224 --modes synthetic --batch 64,256,512,1024 --json "$OUT/selfie224_eager.json"
run selfie224_graph 75 $TP $S224 --modes synthetic --batch 64,256,512,1024 --cuda-graph --json "$OUT/selfie224_graph.json"
# End to end from JPEG files at one batch size, every loader that runs here, against its no-model rate.
run selfie224_loaders 90 $TP $S224 --modes "synthetic,$LOADERS" --batch 256 --cuda-graph --workers "$WORKERS" \
  --json "$OUT/selfie224_loaders.json"
# 32 px, ResNet-32 as P, batch 256: the torch loader against synthetic, eager and graphed.
run selfie32_r32 60 $TP --set model.backbone=resnet32 --modes synthetic,torch --batch 256 --workers "$WORKERS" \
  --json "$OUT/selfie32_r32_eager.json"
run selfie32_r32_graph 60 $TP --set model.backbone=resnet32 --modes synthetic,torch --batch 256 --cuda-graph \
  --workers "$WORKERS" --json "$OUT/selfie32_r32_graph.json"
# RotNet with ResNet-50 and fine-tuning ResNet-50 at 224: the gain over eager, side by side.
for step in "" "--cuda-graph"; do
  tag=${step:+_graph}
  run "rotnet224${tag:-_eager}" 50 $TP --method rotnet --set model.backbone=resnet50 --image-size 224 --modes synthetic \
    --batch 256 $step --json "$OUT/rotnet224${tag:-_eager}.json"
  run "finetune224${tag:-_eager}" 50 $TP --stage finetune --arch resnet50 --image-size 224 --modes synthetic \
    --batch 256 $step --json "$OUT/finetune224${tag:-_eager}.json"
done
# torch.compile, alone and inside the graph, at one batch size (compiling takes a minute or two).
run selfie224_compile_graph 150 $TP $S224 --modes synthetic --batch 256 --compile --cuda-graph \
  --json "$OUT/selfie224_compile_graph.json"
run selfie224_compile 120 $TP $S224 --modes synthetic --batch 256 --compile --json "$OUT/selfie224_compile.json"
# Every registered method at 32 px (ResNet-32) and 224 px (ResNet-36 for a method with an attention
# pooling, Selfie's P; ResNet-50 otherwise), eager: the per-method table of benchmarks/RESULTS.md.
for m in $($PY -c "from train.methods import METHODS; print(*METHODS)"); do
  run "method32_$m" 40 $TP --method "$m" --set model.backbone=resnet32 --modes synthetic,torch,no-model:torch \
    --batch 256 --workers "$WORKERS" --json "$OUT/method32_$m.json"
  bb=$($PY -c "from train.methods import METHODS; print('resnet36' if METHODS['$m'].pool_prefix else 'resnet50')")
  run "method224_$m" 40 $TP --method "$m" --set "model.backbone=$bb" $S224 --modes synthetic --batch 64 \
    --json "$OUT/method224_$m.json"
done
echo "done in ${SECONDS}s; logs and JSON in $OUT"
