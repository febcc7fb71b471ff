#!/usr/bin/env bash
# The GPU check, one call per lease (a lent GPU machine: 15 minutes, its start-up included, 600 s a command,
# the last 12,000 characters of output and a few files back). Each call does at most GPU_CHECK_BUDGET_S
# seconds of work (default 420; the plan drops what does not fit from its tail):
#
#   bash benchmarks/gpu_check.sh OUTDIR                     # first lease: the environment, the data, the
#                                                           # Selfie 224 headline (eager vs graph, compile
#                                                           # + graph, end to end), then what fits
#   bash benchmarks/gpu_check.sh OUTDIR --from STEP         # a later lease: the steps from STEP on (the
#                                                           # summary prints this command with its STEP)
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run           # no GPU needed: the same steps checked (the
#                                                           # data built, every benchmark's inputs built)
#
# Every step prints one line with its figures as it ends (a failed one its log's last lines); OUTDIR
# receives three files, rewritten after every step: summary.md (at most 4,000 characters, also printed at
# the end), results.json (everything merged), logs.tar.gz (each step's log and JSON). The steps, their
# limits and memory estimates are in benchmarks/gpu_plan.py; GPU_CHECK_DRY_RUN=1 is --dry-run; PY picks
# the interpreter, WORKERS the loader workers (default: all cores but two). On a lent machine (its output
# folder $OUT): `bash benchmarks/gpu_check.sh "$OUT"` with a 600 s timeout.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--from STEP] [--dry-run]}
shift
cd "$(dirname "$0")/.."
# This checkout first: the project need not be pip-installed. What was on the path stays after it.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# CUPTI stays initialised between profiling sessions: re-initialising it with CUDA graphs alive crashes
# (benchmarks/harness.py, prepare_profiler_for_graphs).
export TEARDOWN_CUPTI=0 DISABLE_CUPTI_LAZY_REINIT=1
PY=${PY:-python3}
# The runner plans its steps to end within the budget (its own start and last summary inside the plan's
# reserve); this limit only backs that up. A value that is not a number is the runner's to refuse. A dry
# run times nothing (each of its steps has a hang guard instead), so no budget applies to it.
budget=${GPU_CHECK_BUDGET_S:-420}
case $budget in '' | *[!0-9]*) budget=0 ;; esac
case " $* ${GPU_CHECK_DRY_RUN:-} " in *" --dry-run "*|*" 1 "*) budget=0 ;; esac
exec timeout -k 5 "$budget" "$PY" -m benchmarks.gpu_check "$OUT" --python "$PY" "$@"
