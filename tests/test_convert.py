import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv", reason="the converter writes FFCV's .beton files; FFCV is not installed here")

from pipeline.beton_writer import ConvertOptions, convert, sidecar_path  # noqa: E402
from pipeline.data import DataError, open_source  # noqa: E402
from pipeline.ffcv_loader import BetonSource  # noqa: E402
from tests.conftest import HANG_GUARD_S, ROOT, run_concurrently  # noqa: E402
from tests.test_data import make_cifar, make_folder  # noqa: E402


def stored_images(beton: Path) -> list[np.ndarray]:
    source = BetonSource(beton)
    return [np.asarray(source.load(i)) for i in range(len(source))]


def smooth_folder(root: Path, classes: int = 3, per_class: int = 5, size: int = 48) -> Path:
    """Photos-like images (smooth gradients plus mild noise) that JPEG keeps close to the original."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 1, size)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            colour = rng.uniform(40, 215, 3)
            image = colour + 40 * (ramp[:, None, None] - ramp[None, :, None]) + rng.normal(0, 2, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_raw_mode_round_trips_a_folder_exactly(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", classes=3, per_class=4)
    info = convert(root, tmp_path / "train.beton", options=ConvertOptions(write_mode="raw", workers=2))
    folder = open_source(root)
    beton = BetonSource(tmp_path / "train.beton")
    assert info["images"] == len(beton) == len(folder) == 12
    assert beton.classes == folder.classes and beton.labels.tolist() == folder.labels.tolist()
    assert beton.source_indices.tolist() == list(range(12))
    for i, stored in enumerate(stored_images(tmp_path / "train.beton")):
        assert np.array_equal(stored, np.asarray(folder.load(i)))
    assert info["uniform_size"] == [40, 46] and info["skipped"] == []


def test_jpeg_mode_round_trips_within_jpeg_tolerance_and_resizes(tmp_path: Path) -> None:
    root = smooth_folder(tmp_path / "train")
    options = ConvertOptions(write_mode="jpg", jpeg_quality=95, max_resolution=32, workers=1)
    info = convert(root, tmp_path / "train.beton", options=options)
    folder = open_source(root)
    for i, stored in enumerate(stored_images(tmp_path / "train.beton")):
        assert stored.shape == (32, 32, 3)  # 48 px shrunk to the longest side 32
        expected = np.asarray(folder.load(i).resize((32, 32), Image.BILINEAR), dtype=np.float64)
        assert np.abs(stored - expected).mean() < 3.0
    assert info["uniform_size"] == [32, 32]
    assert (tmp_path / "train.beton").stat().st_size == info["bytes"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_round_trips_exactly_in_raw_mode(tmp_path: Path, split: str) -> None:
    root = make_cifar(tmp_path / "cifar", per_batch=6)
    convert(root, tmp_path / f"{split}.beton", split, ConvertOptions(write_mode="raw", workers=1))
    cifar = open_source(root, split)
    beton = BetonSource(tmp_path / f"{split}.beton")
    assert len(beton) == len(cifar) == (30 if split == "train" else 6)
    assert beton.labels.tolist() == cifar.labels.tolist()
    assert beton.uniform_size == (32, 32)
    for i, stored in enumerate(stored_images(tmp_path / f"{split}.beton")):
        assert np.array_equal(stored, cifar.images[i])


def test_corrupt_images_are_named_counted_and_skipped_or_fatal(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train")
    bad = root / "class1" / "2.png"
    bad.write_bytes(b"\x89PNG truncated")
    info = convert(root, tmp_path / "train.beton", options=ConvertOptions(write_mode="raw", workers=2))
    assert info["images"] == 11 and len(info["skipped"]) == 1 and str(bad) in info["skipped"][0]
    beton = BetonSource(tmp_path / "train.beton")
    assert 6 not in beton.source_indices.tolist() and len(beton) == 11  # class1/2.png is source index 6
    folder = open_source(root)
    for row, stored in enumerate(stored_images(tmp_path / "train.beton")):
        assert np.array_equal(stored, np.asarray(folder.load(int(beton.source_indices[row]))))
    with pytest.raises(DataError, match="2.png"):
        convert(root, tmp_path / "strict.beton", options=ConvertOptions(workers=1), fail_on_corrupt=True)
    assert not (tmp_path / "strict.beton").exists() and not sidecar_path(tmp_path / "strict.beton").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "train.beton", "train.beton.json"]


def test_interrupted_conversion_leaves_no_beton(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", classes=4, per_class=150, size=96)
    dst = tmp_path / "out" / "train.beton"
    dst.parent.mkdir()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.convert",
            "--src",
            str(root),
            "--dst",
            str(dst),
            "--write-mode",
            "jpg",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + HANG_GUARD_S
    while not any(dst.parent.iterdir()):  # the temporary file exists: writing has begun
        assert process.poll() is None and time.time() < deadline, "conversion ended before it could be interrupted"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not dst.exists() and not sidecar_path(dst).exists()
    assert all(p.name.startswith(".train.beton.tmp-") for p in dst.parent.iterdir())
    with pytest.raises(DataError, match="no such .beton"):
        BetonSource(dst)


def test_cli_reports_and_rejects_bad_options(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train")
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.convert",
            "--src",
            str(root),
            "--dst",
            str(tmp_path / "t.beton"),
            "--write-mode",
            "proportion",
            "--compress-probability",
            "0.5",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "12 images" in ok.stdout and "images/s" in ok.stdout and "MiB" in ok.stdout
    assert "TBB" not in ok.stderr  # the writer processes are forked without numba's fork warning
    assert json.loads(sidecar_path(tmp_path / "t.beton").read_text())["options"]["write_mode"] == "proportion"
    cases = [
        (["--dst", str(tmp_path / "t.ffcv")], "expected a file name ending in .beton"),
        (["--dst", str(tmp_path / "missing" / "t.beton")], "does not exist"),
        (["--jpeg-quality", "0"], "--jpeg-quality 0: expected 1 .. 100"),
        (["--compress-probability", "2"], "--compress-probability 2.0: expected 0 .. 1"),
        (["--max-resolution", "0"], "--max-resolution 0"),
        (["--src", str(tmp_path / "nowhere")], "no such file or folder"),
    ]
    runs = [
        partial(
            subprocess.run,
            [sys.executable, "-m", "pipeline.convert", "--src", str(root), "--dst", str(tmp_path / "x.beton"), *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        for extra, _ in cases
    ]
    for (extra, message), result in zip(cases, run_concurrently(runs), strict=True):
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "x.beton").exists()


def test_loader_refuses_a_beton_without_its_own_sidecar_or_a_foreign_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train")
    convert(root, tmp_path / "t.beton", options=ConvertOptions(write_mode="raw", workers=1))
    convert(root, tmp_path / "j.beton", options=ConvertOptions(write_mode="jpg", workers=1))
    # A replacement interrupted between its two renames: the old file beside the new sidecar.
    sidecar_path(tmp_path / "j.beton").replace(sidecar_path(tmp_path / "t.beton"))
    with pytest.raises(DataError, match="t.beton: its sidecar t.beton.json does not match the file"):
        BetonSource(tmp_path / "t.beton")
    sidecar_path(tmp_path / "t.beton").unlink()
    with pytest.raises(DataError, match="sidecar t.beton.json is missing"):
        BetonSource(tmp_path / "t.beton")
    (tmp_path / "junk.beton").write_bytes(b"\0" * 100)
    sidecar = {"images": 1, "classes": ["a"], "source": "x", "fingerprint": "?"}
    sidecar_path(tmp_path / "junk.beton").write_text(json.dumps(sidecar))
    with pytest.raises(DataError, match="not a readable .beton"):
        BetonSource(tmp_path / "junk.beton")


def forge(beton: Path, change) -> None:
    """Apply `change(header, metadata, alloc_table)` to the arrays inside `beton` and re-sign its sidecar
    (as a forger would: the fingerprint is no secret)."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    from pipeline.beton_writer import fingerprint

    reader = Reader(str(beton))
    header = np.fromfile(beton, dtype=HeaderType, count=1)[0]
    meta_at = HeaderType.itemsize + reader.field_descriptors.nbytes
    metadata, table = reader.metadata.copy(), reader.alloc_table.copy()
    change(metadata, table)
    with open(beton, "r+b") as f:
        f.seek(meta_at)
        f.write(metadata.tobytes())
        f.seek(int(header["alloc_table_ptr"]))
        f.write(table.astype(ALLOC_TABLE_TYPE).tobytes())
    info = json.loads(sidecar_path(beton).read_text())
    info["fingerprint"] = fingerprint(Reader(str(beton)), info)
    sidecar_path(beton).write_text(json.dumps(info))


def point_past_the_end(metadata, table) -> None:
    old = table["ptr"][1]
    table["ptr"][1] += 2**40
    metadata["f0"]["data_ptr"][metadata["f0"]["data_ptr"] == old] += 2**40


def claim_a_huge_image(metadata, table) -> None:
    metadata["f0"]["height"][2] = metadata["f0"]["width"][2] = 60000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (point_past_the_end, "sample 1's bytes point outside the file"),
        (claim_a_huge_image, "sample 2 claims 60000x60000"),
    ],
)
def test_a_forged_beton_is_refused_before_training(change, message: str, tmp_path: Path) -> None:
    root = smooth_folder(tmp_path / "src", size=16)
    convert(root, tmp_path / "train.beton", options=ConvertOptions(write_mode="raw", workers=1))
    forge(tmp_path / "train.beton", change)
    with pytest.raises(DataError, match=message) as caught:
        BetonSource(tmp_path / "train.beton")
    assert "\n" not in str(caught.value)


def test_an_os_error_on_the_destination_is_one_line(tmp_path: Path, capsys) -> None:
    from pipeline.convert import main

    root = smooth_folder(tmp_path / "src", size=16)
    dst = tmp_path / ("x" * 300 + ".beton")  # a name over the file system's 255 bytes
    assert main(["--src", str(root), "--dst", str(dst), "--workers", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "a name too long for the file system" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
