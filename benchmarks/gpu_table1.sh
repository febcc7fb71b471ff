#!/usr/bin/env bash
# The paper's Table 1 on Fashion-MNIST in one call of a lent GPU machine (benchmarks/fmnist_table1.py):
#
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/   # here, once: the data travels
#   bash benchmarks/gpu_table1.sh "$OUT"                                # there, with carry [".data"], 600 s
#   bash benchmarks/gpu_table1.sh OUTDIR --dry-run                      # anywhere: every command checked
#   bash benchmarks/gpu_table1.sh OUTDIR --smoke                        # a CPU rehearsal at toy sizes
#
# Other flags go to the runner (--query paper, --epochs N, --work DIR). PY picks the interpreter.
set -u
OUT=${1:?usage: bash benchmarks/gpu_table1.sh OUTDIR [--dry-run|--smoke] [runner flags]}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PY:-python3}
# The runner ends its phases within 540 s; this limit only backs that up (the smoke run is not limited).
limit=570
for flag in "$@"; do [ "$flag" = --smoke ] && limit=3600; done
exec timeout -k 5 "$limit" "$PY" -m benchmarks.fmnist_table1 "$OUT" --python "$PY" "$@"
