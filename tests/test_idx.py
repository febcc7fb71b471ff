"""The IDX reader (pipeline/idx.py): small MNIST-style files written here, read by every loader and the
converter; a wrong magic or a truncated file is refused in one line naming it."""

from __future__ import annotations

import gzip
import subprocess
import sys
import tracemalloc
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataError, IdxSource, open_source
from pipeline.idx import read_idx
from pipeline.loader_request import TrainRequest
from pipeline.loaders import LOADERS
from tests.conftest import ROOT


def idx_bytes(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim]) + np.asarray(values.shape, dtype=">u4").tobytes()
    return header + values.astype(np.uint8).tobytes()


def make_idx(root: Path, train: int = 12, test: int = 4, compress: bool = True) -> Path:
    """An MNIST-style folder of 28x28 grey images: images gzipped (as distributed), labels raw."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(1, 256, (count, 28, 28), dtype=np.uint8)  # no zero pixel: the pad is told apart
        data = idx_bytes(images)
        name = f"{prefix}-images-idx3-ubyte"
        (root / (name + ".gz" if compress else name)).write_bytes(gzip.compress(data) if compress else data)
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(count) % 3))
    return root


def test_an_idx_folder_reads_in_the_cifar_layout(tmp_path: Path) -> None:
    root = make_idx(tmp_path / "mnist")
    train, test = open_source(root, "train"), open_source(root, "test")
    assert isinstance(train, IdxSource) and len(train) == 12 and len(test) == 4
    assert train.images.shape == (12, 32, 32, 3) and train.images.dtype == np.uint8
    grey = read_idx(root / "train-images-idx3-ubyte.gz")
    assert np.array_equal(train.images[:, 2:30, 2:30, 1], grey)  # centred, every channel the grey value
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    border = train.images.copy()
    border[:, 2:30, 2:30] = 0
    assert not border.any()  # the 2-px pad is zeros
    assert train.labels.tolist() == [0, 1, 2] * 4 and train.classes == ["0", "1", "2"]
    raw = open_source(make_idx(tmp_path / "raw", compress=False), "train")
    assert np.array_equal(raw.images, train.images)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"\x00\x00\x0d" + data[3:], "not an IDX file of uint8 values"),  # float type
        (lambda data: b"PK\x03\x04" + data[4:], "not an IDX file of uint8 values"),
        (lambda data: data[:-5], "truncated: 9419 bytes, expected 9424"),
        (lambda data: data[:10], "IDX header cut short"),
        (lambda data: data + b"\x00", "longer than its header says"),
        (lambda data: gzip.compress(data)[:-20], "truncated or corrupt gzip stream"),
    ],
)
def test_a_damaged_file_is_refused_in_one_line_naming_it(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(idx_bytes(np.zeros((3, 56, 56), np.uint8))))
    with pytest.raises(DataError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_labels_that_do_not_match_the_images_are_refused(tmp_path: Path) -> None:
    root = make_idx(tmp_path / "mnist")
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: shape \\(11,\\); expected one label for each of 12"):
        open_source(root, "train")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        open_source(root, "test")


def test_the_clis_refuse_a_damaged_file_with_exit_2_and_leave_nothing(tmp_path: Path) -> None:
    root = make_idx(tmp_path / "mnist")
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    dst = tmp_path / "out.beton"
    convert = [sys.executable, "-m", "pipeline.convert", "--src", str(root), "--dst", str(dst), "--workers", "1"]
    result = subprocess.run(convert, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and str(bad) in result.stderr, result.stderr
    assert not list(tmp_path.glob("*.beton*")) and not list(tmp_path.glob(".out*"))
    run = tmp_path / "run"
    pretrain = [sys.executable, str(ROOT / "train" / "pretrain.py"), "--data", str(root), "--out", str(run)]
    result = subprocess.run(pretrain, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and str(bad) in result.stderr and not run.exists(), result.stderr[-2000:]


def batches(backend: str, source, steps: int = 3) -> list:
    request = TrainRequest(source=source, image_size=32, augment="pad_crop_flip", batch_size=4, seed=7, workers=1)
    loader = LOADERS[backend].train(request)
    out = list(islice(loader, steps))
    loader.close()
    return out


def test_torch_and_dali_read_the_same_idx_images(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    source = open_source(make_idx(tmp_path / "mnist"), "train")
    for dali, plain in zip(batches("dali", source), batches("torch", source), strict=True):
        assert torch.equal(dali.indices, plain.indices) and torch.equal(dali.labels, plain.labels)
        assert dali.images.shape == plain.images.shape == (4, 3, 32, 32)


def test_the_converter_writes_idx_images_exactly_for_ffcv(tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    from pipeline.beton_writer import ConvertOptions, convert
    from pipeline.ffcv_loader import BetonSource

    root = make_idx(tmp_path / "mnist")
    for split, name in (("train", "train"), ("test", "val")):
        convert(root, tmp_path / f"{name}.beton", split, ConvertOptions(write_mode="raw", workers=1))
    idx, beton = open_source(root, "test"), BetonSource(tmp_path / "val.beton")
    assert len(beton) == 4 and beton.labels.tolist() == idx.labels.tolist()
    assert all(np.array_equal(np.asarray(beton.load(i)), idx.images[i]) for i in range(4))
    ffcv = LOADERS["ffcv"].open(tmp_path, "train")
    assert batches("ffcv", ffcv, 2)[0].images.shape == (4, 3, 32, 32)


def test_a_gz_longer_than_its_header_fails_without_inflating_the_rest(tmp_path: Path) -> None:
    """A 1.6 MB .gz whose header claims 78 KB (100 images) but inflates to ~1.6 GB: one line, at once, in
    little memory (inflated whole first, it took GBs)."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + np.asarray((100, 28, 28), dtype=">u4").tobytes()
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        zeros = bytes(1 << 24)
        for _ in range(100):  # 1.6 GB of values
            f.write(zeros)
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    with pytest.raises(DataError, match="longer than its header says: more than 78416 bytes"):
        read_idx(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # inflated whole: 1.6 GB


@pytest.mark.parametrize("compress", [True, False])
def test_a_header_claiming_more_than_the_file_can_hold_is_refused_before_allocating(compress, tmp_path: Path) -> None:
    """Dimensions of 2**16 whose int64 product wraps round to 0 and one far past what a small .gz holds."""
    path = tmp_path / "train-images-idx3-ubyte"
    for shape in ((65536, 65536, 65536, 65536), (60000, 60000, 60000)):
        data = bytes([0, 0, 0x08, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes() + bytes(100)
        path.write_bytes(gzip.compress(data) if compress else data)
        with pytest.raises(DataError, match="truncated") as caught:
            read_idx(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
