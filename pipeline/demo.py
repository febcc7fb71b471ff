"""The built-in demo data set: small labelled images cut offline from real photos that dependencies ship.

Ten classes, one per photo (scikit-image's and scikit-learn's sample images, all bundled in the
wheels, so nothing is downloaded). Each image is a random square crop of its photo (16-60% of the
shorter side) resized to 32x32: the class is "which photo", which fine-tuning can learn from few labels.
The build is deterministic (fixed seed), written as an ImageNet-layout folder with train/ and val/, and
cached; a cache from an older recipe has another folder name and is never reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_VERSION = 1
TRAIN_PER_CLASS = 160
VAL_PER_CLASS = 40
DEMO_IMAGE_SIZE = 32
DEMO_SEED = 20190607  # Selfie's arXiv date
CROP_FRACTION = (0.16, 0.6)
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selfie-trainer"


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    photos.update({name.removesuffix(".jpg"): load_sample_image(name) for name in SKLEARN_PHOTOS})
    return {name: np.stack([p] * 3, axis=-1) if p.ndim == 2 else p[..., :3] for name, p in photos.items()}


def _write_split(folder: Path, photos: dict[str, np.ndarray], per_class: int, rng: np.random.Generator) -> None:
    for name, photo in photos.items():
        (folder / name).mkdir(parents=True)
        image = Image.fromarray(photo)
        short = min(image.size)
        for i in range(per_class):
            side = int(short * rng.uniform(*CROP_FRACTION))
            left = int(rng.integers(0, image.width - side + 1))
            top = int(rng.integers(0, image.height - side + 1))
            crop = image.resize(
                (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), Image.BILINEAR, box=(left, top, left + side, top + side)
            )
            crop.save(folder / name / f"{i:04d}.png")


def demo_dataset(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the demo folder (train/, val/), built on first use. Safe if several processes race."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"demo-v{DEMO_VERSION}"
    if (target / "train").is_dir() and (target / "val").is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-building-", dir=cache))
    try:
        photos = _photos()
        rng = np.random.default_rng(DEMO_SEED)
        _write_split(staging / "train", photos, TRAIN_PER_CLASS, rng)
        _write_split(staging / "val", photos, VAL_PER_CLASS, rng)
        try:
            staging.rename(target)  # atomic: a half-built folder never carries the final name
        except OSError:
            if not (target / "train").is_dir():  # lost a race to another process: theirs is complete
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
