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

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import time_windows
from pipeline.demo import _photos, default_cache_dir, demo_dataset
from pipeline.loaders import LOADERS
from train.config import PretrainConfig, load_config
from train.methods import METHODS, PretextMethod, default_method, method_flags, stage_class
from train.stages import pretraining

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


def benchmark_data(
    data: str, cache_dir: str, images: int, beton: str | None = None, build_beton: bool = True
) -> tuple[Path, Path]:
    """(image folder, its .beton): `data` is "jpeg" (the built-in JPEG set), "demo" or a folder; the
    .beton is converted once into the cache unless given (JPEG at quality 90; raw for the demo's PNGs), and
    only when `build_beton` (a mode reads it)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if data == "jpeg":
        folder = jpeg_set(cache, images) / "train"
    elif data == "demo":
        folder = demo_dataset(cache) / "train"
    else:
        folder = Path(data)
    beton_path = Path(beton) if beton else cache / f"{folder.parent.name}-{folder.name}.beton"
    if build_beton and not beton_path.exists():
        try:  # FFCV is optional where only the torch and DALI loaders are timed
            from pipeline.convert import ConvertOptions, convert
        except ImportError as error:
            print(f"note: no {beton_path.name} ({error}): the ffcv modes cannot run here")
            return folder, beton_path
        mode = "raw" if data == "demo" else "jpg"
        convert(folder, beton_path, options=ConvertOptions(write_mode=mode, jpeg_quality=90))
    return folder, beton_path


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
    extra = {"patch_spec": spec} if spec is not None else {}
    loader = LOADERS[backend].train(
        source, args.size, args.augment, args.batch, 0, 1, 0, workers=args.workers, device=device, **extra
    )
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
