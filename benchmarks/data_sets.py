"""The images the benchmarks read: a built-in ImageNet-like JPEG set cut from the photos the Python
packages ship, the demo's photo crops, or a folder; each with its .beton, converted once into a cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo import _photos, demo_dataset

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
        missing = ffcv_missing()
        if missing:  # FFCV is optional where only the torch and DALI loaders are timed
            print(f"note: no {beton_path.name} ({missing}): the ffcv modes cannot run here")
            return folder, beton_path
        from pipeline.beton_writer import ConvertOptions, convert

        mode = "raw" if data == "demo" else "jpg"
        convert(folder, beton_path, options=ConvertOptions(write_mode=mode, jpeg_quality=90))
    return folder, beton_path


def ffcv_missing() -> str | None:
    """Why no .beton can be written here, or None. The writer imports without FFCV (its `ffcv` is then
    None) and refuses to convert with a DataError, not an ImportError: ask it rather than the import."""
    try:
        from pipeline import beton_writer
    except ImportError as error:  # an FFCV that is installed but does not import
        return str(error)
    return None if beton_writer.ffcv is not None else "FFCV is not installed here"
