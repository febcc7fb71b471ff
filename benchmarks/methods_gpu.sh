#!/usr/bin/env bash
# Images/s of every pretext method's step on one GPU (recorded in benchmarks/RESULTS.md), after the GPU tests.
# Usage: bash benchmarks/methods_gpu.sh OUTDIR [BATCH32] [BATCH224] [WINDOWS] [STEPS] [WARMUP]
set -u
OUTDIR=${1:-/tmp/gpu_out}; B32=${2:-256}; B224=${3:-64}; WIN=${4:-3}; STEPS=${5:-10}; WARM=${6:-5}
JSON=/tmp/gpu_json; mkdir -p "$OUTDIR" $JSON
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUTDIR/env.txt"
$PY -c "import torch, accelerate, numba, triton; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'numba', numba.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUTDIR/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_fused_patches.py -k "not loaders" 2>&1 | tail -30 | tee "$OUTDIR/gpu_tests.log"
fi
COMMON="--precision bf16 --channels-last --warmup $WARM --window $STEPS --windows $WIN"
METHODS=$($PY -c "from train.methods import METHODS; print(*METHODS)")
for m in $METHODS; do
  echo "=== 32px $m" | tee -a "$OUTDIR/tp32.log"
  timeout 75 $PY -m benchmarks.throughput --method $m --set model.backbone=resnet32 --modes synthetic,torch,no-model:torch \
    --batch $B32 --workers ${WORKERS:-12} $COMMON --json "$JSON/tp32_$m.json" 2>&1 | grep -v "it/s" | tee -a "$OUTDIR/tp32.log"
done
for m in $METHODS; do
  # A method that pools patch vectors with an attention pooling A runs its paper's P, ResNet-36; the others ResNet-50.
  bb=$($PY -c "from train.methods import METHODS; print('resnet36' if METHODS['$m'].pool_prefix else 'resnet50')")
  echo "=== 224px $m $bb" | tee -a "$OUTDIR/tp224.log"
  timeout 75 $PY -m benchmarks.throughput --method $m --set model.backbone=$bb --image-size 224 --patch-size 32 --modes synthetic \
    --batch $B224 $COMMON --json "$JSON/tp224_$m.json" 2>&1 | grep -v "it/s" | tee -a "$OUTDIR/tp224.log"
done
tar czf "$OUTDIR/json.tgz" -C $JSON .
