"""Convert an ImageNet-layout folder, a CIFAR-10 python folder or an IDX folder (MNIST, Fashion-MNIST,
KMNIST: `pipeline.idx`) to an FFCV `.beton` file.

    python -m pipeline.convert --src ~/data/imagenet/train --dst ~/data/imagenet/train.beton \
        --max-resolution 256 --write-mode smart --smart-threshold 150000 --jpeg-quality 90 --workers 16
    python -m pipeline.convert --src ~/data/imagenet/val --dst ~/data/imagenet/val.beton --max-resolution 256
    python -m pipeline.convert --src ~/data/cifar-10-batches-py --split train --dst ~/data/cifar10/train.beton
    python -m pipeline.convert --src ~/data/cifar-10-batches-py --split test --dst ~/data/cifar10/test.beton
    python -m pipeline.convert --src /usr/share/datasets/fashion-mnist --split train --dst ~/data/fmnist/train.beton

Each sample holds three fields: `image` (RGB), `label` (class number, classes sorted by folder name) and
`index` (the image's position in the source, to trace a sample back to its file). Beside FILE.beton,
FILE.beton.json records the class names, the source, the options and the skipped images; the loader
needs both. Write modes are FFCV's: `raw` (exact pixels), `jpg` (every image re-encoded at
--jpeg-quality), `proportion` (a random --compress-probability of them as JPEG), `smart` (JPEG only for
images whose raw pixels exceed --smart-threshold bytes; without a threshold, all raw).

Nothing incomplete ever carries the destination name: the file is written under a temporary name in
the destination folder and renamed when complete (an interrupted or failed conversion leaves no
FILE.beton). An unreadable source image is named, counted and left out (the file is then written a
second time without it), or stops the conversion with --fail-on-corrupt.
"""

from __future__ import annotations

import argparse
import sys

import numba

# `watched` forks FFCV's writer processes from a thread. Numba's default TBB pool, which the ffcv import
# starts, cannot be carried across a fork from a non-main thread (numba warns "Attempted to fork from a
# non-main thread, the TBB library may be in an invalid state"); its workqueue pool is fork-safe, and this
# process runs no parallel numba code of its own. Only the command sets it, before ffcv is imported: a
# training process keeps TBB, which its loader threads need (workqueue is not thread-safe).
numba.config.THREADING_LAYER = "workqueue"

from pipeline.beton_writer import WRITE_MODES, ConvertOptions, convert  # noqa: E402
from pipeline.data import DataError  # noqa: E402
from pipeline.errors import os_error_line  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.convert",
        description="Convert an ImageNet-layout, CIFAR-10 python or IDX (MNIST-style) folder to an FFCV .beton file.",
    )
    defaults = ConvertOptions()
    parser.add_argument(
        "--src", required=True, help="split folder (class sub-folders), CIFAR-10 python folder or IDX folder"
    )
    parser.add_argument("--dst", required=True, help="the .beton file to write")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="CIFAR-10/IDX split (or val/)")
    parser.add_argument("--max-resolution", type=int, default=defaults.max_resolution, help="longest side, px")
    parser.add_argument("--write-mode", default=defaults.write_mode, choices=WRITE_MODES)
    parser.add_argument("--smart-threshold", type=int, default=defaults.smart_threshold, help="bytes (smart mode)")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--compress-probability", type=float, default=defaults.compress_probability)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="writer processes (0 = all cores)")
    parser.add_argument("--fail-on-corrupt", action="store_true", help="stop at an unreadable image")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = ConvertOptions(
        max_resolution=args.max_resolution,
        write_mode=args.write_mode,
        smart_threshold=args.smart_threshold,
        jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability,
        workers=args.workers,
    )
    try:
        info = convert(args.src, args.dst, args.split, options, args.fail_on_corrupt)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full or read-only disk, a name too long, a refused link: named in words
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return 2
    rate = info["images"] / max(info["seconds"], 1e-9)
    print(
        f"wrote {args.dst}: {info['images']} images, {info['bytes'] / 2**20:.1f} MiB, {rate:.0f} images/s, "
        f"{len(info['skipped'])} unreadable skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
