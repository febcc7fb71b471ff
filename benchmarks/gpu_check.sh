#!/usr/bin/env bash
# The GPU check, in two calls that each end within 540 s (a lent GPU machine runs one command of at most
# 600 s, returns at most 8 files and the last 12,000 characters of output):
#
#   bash benchmarks/gpu_check.sh OUTDIR quick             # first: environment, GPU tests, the Selfie 224 headline
#   bash benchmarks/gpu_check.sh OUTDIR full              # second: RotNet, fine-tuning, 32 px, the per-method table
#   bash benchmarks/gpu_check.sh OUTDIR quick --dry-run   # no GPU needed: every step's command checked, nothing timed
#
# OUTDIR receives three files, rewritten after every step: summary.md (every figure and its ratios, also
# printed at the end), results.json (everything merged), logs.tar.gz (each step's log and JSON). The steps
# and their limits are in benchmarks/gpu_plan.py; GPU_CHECK_DRY_RUN=1 is --dry-run; PY picks the
# interpreter, WORKERS the loader workers (default: all cores but two). On a lent machine (its output folder
# $OUT, 600 s a command): `bash benchmarks/gpu_check.sh "$OUT" quick` with a 600 s timeout, later `... full`.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR quick|full [--dry-run]}
CALL=${2:?usage: bash benchmarks/gpu_check.sh OUTDIR quick|full [--dry-run]}
shift 2
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# CUPTI stays initialised between profiling sessions: re-initialising it with CUDA graphs alive crashes
# (benchmarks/harness.py, prepare_profiler_for_graphs).
export TEARDOWN_CUPTI=0 DISABLE_CUPTI_LAZY_REINIT=1
PY=${PY:-python3}
# The runner plans its steps to end within the budget; this limit only backs that up. A dry run times
# nothing (each of its steps has a hang guard instead), so no budget applies to it.
budget=${GPU_CHECK_BUDGET_S:-540}
case " $* ${GPU_CHECK_DRY_RUN:-} " in *" --dry-run "*|*" 1 "*) budget=0 ;; esac
exec timeout -k 5 "$budget" "$PY" -m benchmarks.gpu_check "$OUT" "$CALL" --python "$PY" "$@"
