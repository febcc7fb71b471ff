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
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UINT8_TYPE = 0x08
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
PAD_TO_MULTIPLE = 8  # the patch size of the 32x32 recipes: the padded side cuts into whole patches


def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({error}); expected a whole IDX .gz file") from error


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array an IDX file holds, of the shape its header gives; DataError naming `path` for
    anything else (wrong magic, another value type, fewer or more bytes than the header says)."""
    path = Path(path)
    try:
        data = _raw_bytes(path)
    except OSError as error:
        raise DataError(f"{path}: unreadable ({error.strerror or error})") from error
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != UINT8_TYPE or data[3] == 0:
        found = data[:4].hex() or "empty"
        raise DataError(f"{path}: not an IDX file of uint8 values (header {found}, expected 000008 then d)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: IDX header cut short ({len(data)} bytes, expected {header})")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path}: {problem}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


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
