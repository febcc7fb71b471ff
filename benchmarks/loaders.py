"""Loader-only images/s: files (or a .beton) to the model's inputs (Selfie: the patch tensor ready for P),
every backend side by side.

    python -m benchmarks.loaders                                  # 224/32 on a built-in JPEG set
    python -m benchmarks.loaders --size 32 --patch-size 8 --augment pad_crop_flip --data demo
    python -m benchmarks.loaders --data ~/data/imagenet/train --beton ~/data/imagenet/train.beton

Each backend runs the training stream exactly as `train/pretrain.py` builds it for `--method` (rank 0 of
1, the method's input op as the trainer chooses it: Selfie's patch op is numba on a CPU, Triton on a GPU,
and FFCV on a CPU cuts the patches inside its pipeline), after --warmup untimed batches, timed by
benchmarks/harness.py. The timed batches are split into windows; the table gives the median window
and the slowest and fastest, and the ratio of medians to the torch `DataLoader` backend. No model
runs: this is the data side's limit (`python -m benchmarks.throughput`, issue 5, measures images/s reaching the loss).

The built-in JPEG set (`--data jpeg`) is cut offline from the photos scikit-image and scikit-learn ship:
--images files of 256-500 px sides at JPEG quality 90 in 10 classes, built once in the cache; its
.beton stores the same pixels re-encoded as JPEG at quality 90 (FFCV decodes what it stored).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks.data_sets import benchmark_data
from benchmarks.harness import time_windows
from pipeline.demo import default_cache_dir
from pipeline.loader_request import TrainRequest
from pipeline.loaders import LOADERS
from train.config import PretrainConfig, load_config
from train.methods import METHODS, PretextMethod, default_method, method_flags, stage_class
from train.stages import pretraining


def build_method(args: argparse.Namespace, device: torch.device) -> PretextMethod:
    """The method whose inputs the loaders feed, configured as the trainer would be for these flags."""
    overrides = {"method": args.method, "data.image_size": args.size, "data.augment": args.augment}
    overrides |= {"data.workers": args.workers, "train.batch_size": args.batch}
    overrides |= {key: getattr(args, key) for key, _, _ in method_flags().values() if getattr(args, key) is not None}
    config = load_config(stage_class(PretrainConfig), "demo" if args.size <= 64 else "imagenet224", overrides)
    return pretraining.validate(config)(config, device)


def time_backend(backend: str, source, method: PretextMethod, args, device: torch.device) -> dict:
    """The backend's training stream as `train/pretrain.py` builds it, up to the method's model inputs."""
    spec = method.loader_patch_spec(backend)
    request = TrainRequest(
        source=source,
        image_size=args.size,
        augment=args.augment,
        batch_size=args.batch,
        seed=0,
        workers=args.workers,
        device=device,
        patch_spec=spec,
    )
    loader = LOADERS[backend].train(request)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(clock) -> None:
        batch = next(loader)
        if batch.patches is None:  # a loader that cut the patches itself left nothing to do
            method.inputs(batch, generator)

    try:
        return time_windows(step, device, args.batch, args.warmup, args.windows, args.window)
    finally:
        loader.close()


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="jpeg", help="jpeg (built-in JPEG set) | demo | an image folder")
    parser.add_argument("--beton", help="the .beton of --data for ffcv (default: converted once into the cache)")
    parser.add_argument("--images", type=int, default=2048, help="size of the built-in JPEG set")
    parser.add_argument("--method", default=default_method(), choices=list(METHODS), help="whose inputs to make")
    for flag, (key, kind, help_text) in method_flags().items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"{help_text} (default: the config's)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--augment", default="random_resized_crop")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="per backend: processes/threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=5, help="batches per timed window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--backends", default=",".join(sorted(LOADERS, key=lambda b: b != "torch")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=str(default_cache_dir()))
    parser.add_argument("--json", help="also write the results here")
    return parser


def print_table(results: dict) -> None:
    base = results.get("torch", {}).get("median")
    print(f"{'backend':<8} {'images/s':>10} {'(min .. max)':>18} {'vs torch':>9}")
    for backend, r in results.items():
        ratio = f"{r['median'] / base:.2f}x" if base else "-"
        spread = f"({r['min']:.0f} .. {r['max']:.0f})"
        print(f"{backend:<8} {r['median']:>10.0f} {spread:>18} {ratio:>9}")


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    device = torch.device(args.device)
    method = build_method(args, device)
    folder, beton = benchmark_data(args.data, args.cache, args.images, args.beton)
    backends = args.backends.split(",")
    sources = {name: LOADERS[name].open(beton if LOADERS[name].reads_beton else folder, "train") for name in backends}
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {device}; "
        f"{len(sources[backends[0]])} images from {folder} (ffcv: {beton}); {args.size}px {args.augment}, "
        f"{args.method}: {method.describe()}; batch {args.batch}, "
        f"{args.workers} workers; {args.windows} windows of {args.window} batches after {args.warmup}"
    )
    results = {}
    for backend in backends:
        timing = time_backend(backend, sources[backend], method, args, device)
        gc.collect()  # the previous backend's workers and threads are gone before the next one is timed
        time.sleep(1)
        results[backend] = {k: timing[k] for k in ("median", "min", "max")}
    print_table(results)
    if args.json:
        record = {"date": str(date.today()), "device": str(device), "cpus": os.cpu_count(), "args": vars(args)}
        Path(args.json).write_text(json.dumps(record | {"results": results}, indent=1))


if __name__ == "__main__":
    main()
