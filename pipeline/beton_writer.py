"""Writing a data set (ImageNet-layout folder, CIFAR-10 python folder, IDX folder) to an FFCV `.beton`
file and its sidecar; `python -m pipeline.convert` is the command line.

Each sample holds three fields: `image` (RGB), `label` (class number, classes sorted by folder name) and
`index` (the image's position in the source, to trace a sample back to its file). Beside FILE.beton,
FILE.beton.json records the class names, the source, the options and the skipped images; the loader
needs both. Nothing incomplete ever carries the destination name: the file is written under a temporary
name in the destination folder and renamed when complete. An unreadable source image is named, counted
and left out (the file is then written a second time without it), or stops the conversion.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.atomic import atomic_path, write_atomic
from pipeline.data import DECODE_ERRORS, ArraySource, DataError, Source, open_source

# Importing ffcv sets torch's intra-op thread count to 1 (ffcv.pipeline.compiler runs
# `Compiler.set_num_threads(1)`, which calls torch.set_num_threads); every ffcv import in this project
# comes after this one, which puts the count back. Where FFCV is not installed this module still imports
# (the torch and DALI loaders, and the tests, do not need it); converting then says what is missing.
_threads = torch.get_num_threads()
try:
    import ffcv  # noqa: F401
except ModuleNotFoundError:
    ffcv = None
torch.set_num_threads(_threads)

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
FIELD_NAMES = ("image", "label", "index")


@dataclass(frozen=True)
class ConvertOptions:
    max_resolution: int | None = None  # longest side after conversion (shrunk, never enlarged); None = as is
    write_mode: str = "smart"  # raw | jpg | proportion | smart (FFCV's meanings, see the module docstring)
    smart_threshold: int | None = None  # smart mode: JPEG-encode images whose raw pixels exceed this many bytes
    jpeg_quality: int = 90  # 1..100, for the images stored as JPEG
    compress_probability: float = 0.5  # proportion mode: the fraction of images stored as JPEG
    workers: int = 0  # writer processes; 0 = one per CPU core
    chunk_size: int = 100  # images per work item handed to a writer process

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise DataError(f"--write-mode {self.write_mode}: expected one of {', '.join(WRITE_MODES)}")
        if self.max_resolution is not None and self.max_resolution < 1:
            raise DataError(f"--max-resolution {self.max_resolution}: expected a positive number of pixels")
        if self.smart_threshold is not None and self.smart_threshold < 1:
            raise DataError(f"--smart-threshold {self.smart_threshold}: expected a positive number of bytes")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"--jpeg-quality {self.jpeg_quality}: expected 1 .. 100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise DataError(f"--compress-probability {self.compress_probability}: expected 0 .. 1")
        if self.workers < 0 or self.chunk_size < 1:
            raise DataError("--workers must be >= 0 and the chunk size >= 1")


def sidecar_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


SIDECAR_FORMAT = "selfie-trainer beton v2"
TRUSTED_FIELDS = ("fields", "images", "classes", "uniform_size")  # what the loader takes from the sidecar


def fingerprint(reader, info: dict | None = None) -> str:
    """sha1 of a .beton's per-sample metadata and allocation table (where each sample's bytes are, their
    sizes and modes), from its `ffcv.reader.Reader`, and of every sidecar field the loader trusts (`info`):
    an edited sidecar, or one beside another file, no longer matches."""
    trusted = json.dumps({key: (info or {}).get(key) for key in TRUSTED_FIELDS}, sort_keys=True).encode()
    data = reader.metadata.tobytes() + reader.alloc_table.tobytes()
    return hashlib.sha1(data + (trusted if info is not None else b"")).hexdigest()


class _SourceImages:
    """What the FFCV writer's processes read: (HWC uint8 image, label, index) per source position.

    The writer hangs when a worker raises, so an unreadable image never raises here: it is flagged in
    shared memory and written as a 1x1 placeholder, and the caller writes the file again without it.
    With `stop_at_failure`, the first failure makes every later image a placeholder too, so the writer
    runs out in seconds and the caller can stop.
    """

    def __init__(self, source: Source, stop_at_failure: bool = False) -> None:
        self.source = source
        self.stop_at_failure = stop_at_failure
        self.failed = multiprocessing.RawArray(ctypes.c_bool, len(source))
        self.stopped = multiprocessing.RawValue(ctypes.c_bool, False)
        self.sizes = multiprocessing.RawArray(ctypes.c_int32, 2 * len(source))  # (height, width) as loaded

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        index = int(index)
        if self.stopped.value:
            return np.zeros((1, 1, 3), dtype=np.uint8), 0, index
        try:
            if isinstance(self.source, ArraySource):
                image = self.source.images[index]
            else:
                image = np.asarray(self.source.load(index))
        except Exception:  # noqa: BLE001 (any failure must reach the caller, not hang the writer)
            self.failed[index] = True
            self.stopped.value = self.stop_at_failure
            image = np.zeros((1, 1, 3), dtype=np.uint8)
        self.sizes[2 * index], self.sizes[2 * index + 1] = image.shape[0], image.shape[1]
        return image, int(self.source.labels[index]), index


def _write(tmp: Path, images: _SourceImages, indices: np.ndarray, options: ConvertOptions) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(
            write_mode=options.write_mode,
            max_resolution=options.max_resolution,
            smart_threshold=options.smart_threshold,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        ),
        "label": IntField(),
        "index": IntField(),
    }
    page = page_size(images.source, options.max_resolution)
    writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=options.workers or os.cpu_count() or 1)
    watched(lambda: writer.from_indexed_dataset(images, indices=list(indices), chunksize=options.chunk_size))


def page_size(source: Source, max_resolution: int | None) -> int:
    """FFCV's page (a power of two, at least its default) large enough for the largest sample: the
    writer cannot split a sample over pages, and a sample larger than a page fails in a worker."""
    if isinstance(source, ArraySource):
        largest = int(np.prod(source.images.shape[1:]))
    elif max_resolution is not None:
        largest = max_resolution * max_resolution * 3
    else:
        largest = max(_pixels(source, i) for i in range(len(source))) * 3
    needed = largest + 2**20  # room for the sample's header and the writer's bookkeeping
    return max(4 * 2**21, 1 << (needed - 1).bit_length())


def _pixels(source: Source, index: int) -> int:
    """Width x height from the file's header (nothing decoded); 0 for an unreadable file."""
    try:
        with Image.open(source.name(index)) as image:
            return image.width * image.height
    except DECODE_ERRORS:
        return 0


def _die_with_parent() -> None:
    """In a forked child (FFCV's writer processes): Linux kills it when the converter dies, even by
    SIGKILL, so no writer is left running (and holding memory) after its parent."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if sys.platform.startswith("linux"):
    os.register_at_fork(after_in_child=_die_with_parent)


def watched(write: Callable[[], None]) -> None:
    """Run FFCV's writer in a thread and watch its worker processes: FFCV's main loop waits for every
    sample forever, so a worker that dies (a failed allocation, a kill) would hang the conversion. A dead
    worker, or Ctrl-C, ends it here with one line instead (the temporary file is removed by the caller)."""
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(write, errors), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        failed = [p for p in multiprocessing.active_children() if p.exitcode not in (None, 0)]
        if failed:
            for process in multiprocessing.active_children():
                process.kill()
            raise DataError(f"a writer process of FFCV failed (exit code {failed[0].exitcode}); nothing was written")
    if errors:
        raise errors[0]


def _capture(write: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        write()
    except BaseException as error:  # noqa: BLE001 (handed to the main thread, which raises it)
        errors.append(error)


def _decode_error(source: Source, index: int) -> str:
    try:
        source.load(index)
    except DECODE_ERRORS as error:
        return f"{source.name(index)}: {error}"
    return f"{source.name(index)}: unreadable in a writer process"


def _stored_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """FFCV's resizer: shrink so the longer side is max_resolution (truncating), never enlarge."""
    if max_resolution is None or max(height, width) <= max_resolution:
        return height, width
    ratio = max_resolution / max(height, width)
    return int(ratio * height), int(ratio * width)


def _check_destination(dst: Path) -> None:
    if dst.suffix != ".beton":
        raise DataError(f"--dst {dst}: expected a file name ending in .beton")
    if dst.is_dir():
        raise DataError(f"--dst {dst}: a folder; expected the .beton file to write")
    if not dst.parent.is_dir():
        raise DataError(f"--dst {dst}: folder {dst.parent} does not exist")
    _remove_stale_temporaries(dst)


def _remove_stale_temporaries(dst: Path) -> None:
    """Temporary files of conversions to `dst` whose process is gone (killed): nothing will finish them."""
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
            print(f"note: removed {stale}, left by a conversion that did not finish", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_readable(
    tmp: Path, images: _SourceImages, options: ConvertOptions, fail_on_corrupt: bool, src: str | os.PathLike
) -> tuple[np.ndarray, list[str]]:
    """Write every image of the source; when some are unreadable, name them and write the rest again.
    Returns (indices written, "path: error" of each skipped file)."""
    source = images.source
    indices = np.arange(len(source))
    _write(tmp, images, indices, options)
    failed = np.flatnonzero(np.frombuffer(images.failed, dtype=np.bool_))
    skipped = [_decode_error(source, int(i)) for i in failed]
    if len(failed) and fail_on_corrupt:
        raise DataError(f"unreadable image {skipped[0]} in {src} (--fail-on-corrupt)")
    if len(failed) == len(source):
        raise DataError(f"{src}: none of its {len(source)} images is readable; first: {skipped[0]}")
    if len(failed):
        for entry in skipped:
            print(f"warning: skipped unreadable image {entry}", file=sys.stderr)
        indices = np.setdiff1d(indices, failed)
        _write(tmp, images, indices, options)
    return indices, skipped


def _sidecar(tmp: Path, images: _SourceImages, indices: np.ndarray, skipped: list[str], src, split, options) -> dict:
    sizes = np.frombuffer(images.sizes, dtype=np.int32).reshape(-1, 2)[indices]
    stored = {_stored_size(int(h), int(w), options.max_resolution) for h, w in np.unique(sizes, axis=0)}
    return {
        "format": SIDECAR_FORMAT,
        "fields": list(FIELD_NAMES),
        "images": int(len(indices)),
        "classes": list(images.source.classes),
        "source": str(Path(src).resolve()),
        "split": split,
        # One (height, width) when every stored image has it: the loader then decodes without resizing.
        "uniform_size": list(stored.pop()) if len(stored) == 1 else None,
        "skipped": skipped,
        "options": asdict(options),
        "bytes": tmp.stat().st_size,
    }


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    split: str = "train",
    options: ConvertOptions = ConvertOptions(),
    fail_on_corrupt: bool = False,
) -> dict:
    """Write `src` (its `split`) to the `.beton` file `dst` and its sidecar; returns the sidecar's content."""
    options.check()
    if ffcv is None:
        raise DataError("converting to .beton needs FFCV, which is not installed here (pip install ffcv)")
    dst = Path(dst)
    _check_destination(dst)
    from ffcv.reader import Reader

    images = _SourceImages(open_source(src, split), stop_at_failure=fail_on_corrupt)
    started = time.perf_counter()
    with atomic_path(dst) as tmp:
        indices, skipped = _write_readable(tmp, images, options, fail_on_corrupt, src)
        info = _sidecar(tmp, images, indices, skipped, src, split, options)
        info["fingerprint"] = fingerprint(Reader(str(tmp)), info)
        info["seconds"] = round(time.perf_counter() - started, 2)
        # The sidecar first: a .beton under its final name always has its sidecar complete beside it.
        write_atomic(sidecar_path(dst), json.dumps(info, indent=1).encode())
    return info
