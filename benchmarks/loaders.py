"""Loader-only images/s: files (or a .beton) to the patch tensor ready for P, every backend side by side.

    python -m benchmarks.loaders                                  # 224/32 on a built-in JPEG set
    python -m benchmarks.loaders --size 32 --patch 8 --augment pad_crop_flip --data demo
    python -m benchmarks.loaders --data ~/data/imagenet/train --beton ~/data/imagenet/train.beton

Each backend runs the training stream exactly as `train/pretrain.py` builds it (rank 0 of 1, the patch
op chosen for the device: numba on a CPU, Triton on a GPU; FFCV on a CPU cuts the patches inside its
pipeline), after --warmup untimed batches. The timed batches are split into windows; the table gives
the median window and the slowest and fastest, and the ratio of medians to the torch `DataLoader`
backend. The device is synchronised before each clock read. No model runs: this is the data side's
limit (`python -m benchmarks.throughput`, issue 5, measures images/s reaching the loss).

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
import statistics
import time
from datetime import date
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data import open_source
from pipeline.demo import _photos, default_cache_dir, demo_dataset
from pipeline.fused_patches import select_patch_op
from pipeline.loaders import LOADERS
from pipeline.patches import IMAGENET_MEAN, IMAGENET_STD, PatchSpec, num_context_patches, sample_context_permutation

JPEG_SET_VERSION = 1


def jpeg_set(cache: Path, images: int) -> Path:
    """An ImageNet-layout folder of `images` JPEG files (train/), built once."""
    root = cache / f"bench-jpeg-v{JPEG_SET_VERSION}-{images}"
    if (root / "train").is_dir():
        return root
    staging = cache / f".{root.name}.building-{os.getpid()}"
    rng = np.random.default_rng(0)
    photos = list(_photos().items())
    for i in range(images):
        name, photo = photos[i % len(photos)]
        image = Image.fromarray(photo)
        side = int(rng.uniform(0.5, 1.0) * min(image.size))
        left, top = int(rng.integers(0, image.width - side + 1)), int(rng.integers(0, image.height - side + 1))
        width = int(rng.integers(256, 501))
        height = int(np.clip(width * rng.uniform(0.75, 1.33), 256, 500))
        crop = image.resize((width, height), Image.BILINEAR, box=(left, top, left + side, top + side))
        (staging / "train" / name).mkdir(parents=True, exist_ok=True)
        crop.save(staging / "train" / name / f"{i:06d}.jpg", quality=90)
    staging.rename(root)
    return root


def benchmark_data(data: str, cache_dir: str, images: int, beton: str | None = None) -> tuple[Path, Path]:
    """(image folder, its .beton): `data` is "jpeg" (the built-in JPEG set), "demo" or a folder; the
    .beton is converted once into the cache unless given (JPEG at quality 90; raw for the demo's PNGs)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if data == "jpeg":
        folder = jpeg_set(cache, images) / "train"
    elif data == "demo":
        folder = demo_dataset(cache) / "train"
    else:
        folder = Path(data)
    beton_path = Path(beton) if beton else cache / f"{folder.parent.name}-{folder.name}.beton"
    if not beton_path.exists():
        try:  # FFCV is optional where only the torch and DALI loaders are timed
            from pipeline.convert import ConvertOptions, convert
        except ImportError as error:
            print(f"note: no {beton_path.name} ({error}): the ffcv modes cannot run here")
            return folder, beton_path
        mode = "raw" if data == "demo" else "jpg"
        convert(folder, beton_path, options=ConvertOptions(write_mode=mode, jpeg_quality=90))
    return folder, beton_path


def time_backend(backend: str, source, args, device: torch.device) -> list[float]:
    """Images/s of each timed window."""
    num_patches = (args.size // args.patch) ** 2
    num_context = num_context_patches(num_patches, args.context_fraction)
    patch_name, patch_op = select_patch_op(device, "auto")
    extra = {}
    if backend == "ffcv" and patch_name == "numba":
        extra["patch_spec"] = PatchSpec(args.patch, num_context, IMAGENET_MEAN, IMAGENET_STD)
    loader = LOADERS[backend].train(
        source, args.size, args.augment, args.batch, 0, 1, 0, workers=args.workers, device=device, **extra
    )
    generator = torch.Generator(device=device).manual_seed(0)

    def ready_for_p(batch) -> torch.Tensor:
        if batch.patches is not None:
            return batch.patches
        perm = sample_context_permutation(batch.images.shape[0], num_patches, generator)
        return patch_op(batch.images, perm, args.patch, num_context)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for batch in islice(loader, args.warmup):
        ready_for_p(batch)
    rates = []
    for _ in range(args.windows):
        sync()
        start = time.perf_counter()
        for batch in islice(loader, args.window):
            ready_for_p(batch)
        sync()
        rates.append(args.window * args.batch / (time.perf_counter() - start))
    loader.close()
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="jpeg", help="jpeg (built-in JPEG set) | demo | an image folder")
    parser.add_argument("--beton", help="the .beton of --data for ffcv (default: converted once into the cache)")
    parser.add_argument("--images", type=int, default=2048, help="size of the built-in JPEG set")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--augment", default="random_resized_crop")
    parser.add_argument("--context-fraction", type=float, default=0.75)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="per backend: processes/threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=5, help="batches per timed window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--backends", default=",".join(sorted(LOADERS, key=lambda b: b != "torch")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=str(default_cache_dir()))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    folder, beton = benchmark_data(args.data, args.cache, args.images, args.beton)
    sources = {"torch": open_source(folder), "dali": open_source(folder), "ffcv": LOADERS["ffcv"].open(beton, "train")}
    backends = args.backends.split(",")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {device}; "
        f"{len(sources['torch'])} images from {folder} (ffcv: {beton}); {args.size}/{args.patch} {args.augment}, "
        f"batch {args.batch}, "
        f"{args.workers} workers; {args.windows} windows of {args.window} batches after {args.warmup}"
    )
    results = {}
    for backend in backends:
        rates = time_backend(backend, sources[backend], args, device)
        gc.collect()  # the previous backend's workers and threads are gone before the next one is timed
        time.sleep(1)
        results[backend] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    base = results.get("torch", {}).get("median")
    print(f"{'backend':<8} {'images/s':>10} {'(min .. max)':>18} {'vs torch':>9}")
    for backend, r in results.items():
        ratio = f"{r['median'] / base:.2f}x" if base else "-"
        spread = f"({r['min']:.0f} .. {r['max']:.0f})"
        print(f"{backend:<8} {r['median']:>10.0f} {spread:>18} {ratio:>9}")
    if args.json:
        record = {
            "date": str(date.today()),
            "device": str(device),
            "cpus": os.cpu_count(),
            "args": vars(args),
            "results": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
