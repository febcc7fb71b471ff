"""The first two steps of `benchmarks/gpu_check.sh`: what the machine has, and what the timed steps need
built before them (so no timed step pays for it).

    python -m benchmarks.gpu_prepare env --json WORK/env.json     # versions, the GPU, which loaders import
    python -m benchmarks.gpu_prepare data --cache DIR --images 2048  # the JPEG set, the demo data, caches

`env` imports each optional package (FFCV, DALI, timm, ...) and records whether it imported: the GPU check
adds a loader's modes only where its package imports. It also lists the registered methods with the P of
each at 224 px (the per-method table's steps). `data` builds the 224 px JPEG set and the 32 px demo data in
the cache (and their .beton where FFCV imports) and, on a GPU, compiles the Triton patch op for the shapes,
dtypes and layouts the checks time (Triton keeps them in its on-disk cache for the later processes).
`--check-args` (either command): say what would be done, do nothing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_plan import methods_224

PACKAGES = ("torch", "accelerate", "triton", "numba", "timm", "torchvision", "ffcv", "nvidia.dali")
DISTRIBUTIONS = {"nvidia.dali": "nvidia-dali-cuda130"}  # where the import name is not the distribution's
LOADER_PACKAGES = {"ffcv": "ffcv", "dali": "nvidia.dali"}  # loader backend -> the package it imports
TRITON_SHAPES = ((224, 32, 37), (32, 8, 12))  # image size, patch size, context patches: the timed Selfie shapes


def package_version(name: str) -> str | None:
    """The package's version if it imports here, else None. An import that fails for any reason (absent,
    broken build, missing shared library) counts as not there."""
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 (any failure to import means the loader cannot run here)
        return None
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return getattr(module, "__version__", "imported")


def gpu_description() -> dict:
    import torch

    found = {"cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if found["cuda"]:
        found["device"] = torch.cuda.get_device_name(0)
        found["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        found["cudnn"] = torch.backends.cudnn.version()
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=15)
        found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return found


def environment() -> dict:
    versions = {name: package_version(name) for name in PACKAGES}
    loaders = ["torch"] + [loader for loader, package in LOADER_PACKAGES.items() if versions[package]]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "loaders": loaders,
        "methods": methods_224(),
        **gpu_description(),
    }


def build_data(cache: str, images: int) -> None:
    from benchmarks.data_sets import benchmark_data

    for data in ("jpeg", "demo"):
        folder, beton = benchmark_data(data, cache, images)
        print(f"{data}: {folder}" + (f" and {beton}" if beton.exists() else " (no .beton: FFCV is not here)"))


def warm_triton() -> None:
    """Compile the Triton patch op for every timed shape, dtype and layout (a kernel per combination)."""
    import torch

    from pipeline.fused_patches import patchify_triton
    from pipeline.patches import sample_context_permutation

    for size, patch, context in TRITON_SHAPES:
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, device="cuda")
        perm = sample_context_permutation(2, (size // patch) ** 2).cuda()
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                patchify_triton(images, perm, patch, context, dtype=dtype, channels_last=channels_last)
    torch.cuda.synchronize()
    print(f"triton patch op compiled for {len(TRITON_SHAPES)} shapes x 2 dtypes x 2 layouts")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions, the GPU, which loaders import; JSON to --json")
    env.add_argument("--json", required=True, help="write the environment here")
    data = commands.add_parser("data", help="build the data sets and caches the timed steps use")
    data.add_argument("--cache", required=True, help="the benchmarks' cache folder (throughput's --cache)")
    data.add_argument("--images", type=int, default=2048, help="size of the built-in JPEG set")
    for command in (env, data):
        command.add_argument("--check-args", action="store_true", help="say what would be done; do nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.check_args:
        what = f"probe {', '.join(PACKAGES)} into {args.json}" if args.command == "env" else f"build in {args.cache}"
        print(f"arguments ok: would {what}")
        return 0
    if args.command == "env":
        found = environment()
        Path(args.json).write_text(json.dumps(found, indent=1))
        print(json.dumps(found, indent=1))
        return 0
    build_data(args.cache, args.images)
    import torch

    if torch.cuda.is_available():
        warm_triton()
    return 0


if __name__ == "__main__":
    sys.exit(main())
