#!/usr/bin/env bash
# One-time, idempotent set-up: Debian packages FFCV builds against, a virtual environment at .venv,
# PyTorch and this project (editable) with its dev tools. Re-running it is cheap: each step is skipped
# when its result is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

# dataset-fashion-mnist: the IDX files configs/fmnist.yaml reads, in /usr/share/datasets/fashion-mnist
debian_packages=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist)
missing=()
for pkg in "${debian_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

# The stamp records the inputs of the Python install; when they change the install runs again.
stamp=.venv/.selfie-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages into .venv"
    # An exact pin: a bare 'torch' pulls a multi-GB CUDA build where only the CPU one is wanted.
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$want" > "$stamp"
fi

# A default Accelerate config (this machine, one process) unless one exists: `accelerate launch` then
# starts without its warning about defaults. The run's own config still decides its precision. Without a
# GPU, `use_cpu: false`: the run is on the CPU either way, but `use_cpu: true` makes every launch warn that
# it chose --num_cpu_threads_per_process (the trainer sets its own thread count, speed.cpu_threads). A
# config of ours from before this (use_cpu true on a machine without a GPU) is mended the same way.
.venv/bin/accelerate config default >/dev/null 2>&1 || true
.venv/bin/python - <<'PY' || true
import json, torch
from accelerate.commands.config.config_args import default_json_config_file as path
try:
    config = json.load(open(path))
except (OSError, ValueError):
    raise SystemExit
if config.get("use_cpu") and not torch.cuda.is_available() and config.get("distributed_type") == "NO":
    config["use_cpu"] = False
    json.dump(config, open(path, "w"), indent=2)
PY
