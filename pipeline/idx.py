"""The IDX format of MNIST, Fashion-MNIST and KMNIST (LeCun's, http://yann.lecun.com/exdb/mnist/).

A file is: two zero bytes, a type byte (0x08 = uint8, the only type these data sets use), the number of
dimensions d, d big-endian uint32 sizes, then the values row-major. Images are an (N, rows, cols) file,
labels an (N,) one. Each file may be gzip-compressed (as distributed, and as Debian's
`dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist/) or raw.

A folder is one data set: `train-images-idx3-ubyte[.gz]` with `train-labels-idx1-ubyte[.gz]`, and
`t10k-*` for the test split. Its grey images enter the project in the CIFAR-10 layout every backend and
model reads: zero-padded on all sides to the next multiple of 8 pixels (28 -> 32, so 8-px patches
tile it as on CIFAR-10) and repeated over three channels (`pipeline.data.IdxSource` is the data source).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UINT8_TYPE = 0x08
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
MAX_DEFLATE_RATIO = 1032  # deflate's best ratio: no .gz inflates to more than this many times its size
PAD_TO_MULTIPLE = 8  # the patch size of the 32x32 recipes: the padded side cuts into whole patches


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array an IDX file holds, of the shape its header gives; DataError naming `path` for
    anything else (wrong magic, another value type, fewer or more bytes than the header says). A .gz is
    inflated as a stream, never past the bytes its header announces: the header's claim is checked (in
    exact integers) against what the file can hold before anything of that size is allocated."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            size = os.fstat(raw.fileno()).st_size
            if not compressed:
                return _values(path, raw, size, size)
            with gzip.GzipFile(fileobj=raw) as stream:
                return _values(path, stream, None, size * MAX_DEFLATE_RATIO)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({error}); expected a whole IDX .gz file") from error
    except OSError as error:
        raise DataError(f"{path}: unreadable ({error.strerror or error})") from error


def _read_up_to(stream: BinaryIO, count: int) -> bytearray:
    out = bytearray(count)
    view, done = memoryview(out), 0
    while done < count and (got := stream.readinto(view[done:])):
        done += got
    return out[:done] if done < count else out


def _values(path: Path, stream: BinaryIO, size: int | None, ceiling: int) -> np.ndarray:
    """The array `stream` holds; `size`: its exact bytes when known (a raw file), `ceiling`: the most it can
    inflate to (a .gz)."""
    head = _read_up_to(stream, 4)
    if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] != UINT8_TYPE or head[3] == 0:
        found = head.hex() or "empty"
        raise DataError(f"{path}: not an IDX file of uint8 values (header {found}, expected 000008 then d)")
    ndim = head[3]
    header = 4 + 4 * ndim
    sizes = _read_up_to(stream, 4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataError(f"{path}: IDX header cut short ({4 + len(sizes)} bytes, expected {header})")
    shape = struct.unpack(f">{ndim}I", sizes)
    expected = header + math.prod(shape)  # Python integers: no product wraps round
    if size is not None and size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path}: {problem}: {size} bytes, expected {expected} for shape {shape}")
    if expected > ceiling:
        raise DataError(f"{path}: truncated: its header claims shape {shape} ({expected} bytes), more than its "
                        f"{ceiling // MAX_DEFLATE_RATIO} compressed bytes can hold")  # fmt: skip
    values = _read_up_to(stream, expected - header)
    if len(values) < expected - header:
        raise DataError(f"{path}: truncated: {header + len(values)} bytes, expected {expected} for shape {shape}")
    if stream.read(1):
        raise DataError(f"{path}: longer than its header says: more than {expected} bytes for shape {shape}")
    return np.frombuffer(values, dtype=np.uint8).reshape(shape)


def split_file(root: Path, split: str, kind: str) -> Path | None:
    """The IDX file of `split` ("train" | "test") and `kind` ("images" | "labels") in `root`, raw or .gz."""
    dims = 3 if kind == "images" else 1
    stem = f"{SPLIT_PREFIXES[split]}-{kind}-idx{dims}-ubyte"
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def is_idx_folder(root: Path) -> bool:
    return any(split_file(root, split, "images") is not None for split in SPLIT_PREFIXES)


def cifar_layout(images: np.ndarray) -> np.ndarray:
    """Grey (N, H, W) -> uint8 (N, S, S, 3), zero-padded around to S, the next multiple of 8 of max(H, W)."""
    count, height, width = images.shape
    side = -(-max(height, width) // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    top, left = (side - height) // 2, (side - width) // 2
    out = np.zeros((count, side, side, 3), dtype=np.uint8)
    out[:, top : top + height, left : left + width, :] = images[..., None]
    return out
