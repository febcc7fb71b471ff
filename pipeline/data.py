"""Data sources and the torch `DataLoader` backend.

The batch contract, shared by every loader backend: an iterator of `Batch` whose `images` are uint8
(B, 3, S, S), contiguous NCHW, already augmented (crop, flip) and at the training resolution S, with
int64 `labels` and dataset `indices` (B,), on the training device. Normalisation, gridding and masking
happen after, in `pipeline.patches` (or a fused op that equals it).

Sharding: each optimizer step consumes one *global* batch of B * world images, drawn without
replacement from a per-epoch permutation; rank r takes the r-th contiguous B of them. An epoch is
floor(len / (B * world)) steps (the remainder is dropped so every rank sees equally many batches), and
step s of the run always reads the same images whatever the worker count, so a resumed run continues
on exactly the images it would have read.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.augment import pad_crop_flip, random_resized_crop_box
from pipeline.cifar_pickle import RefusedPickle, read_cifar_batch
from pipeline.errors import DataError
from pipeline.idx import SPLIT_PREFIXES, cifar_layout, is_idx_folder, read_idx, split_file
from pipeline.loader_request import EvalRequest, TrainRequest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_CLASSES = 10
SPLITS = ("train", "test")
AUGMENTS = ("pad_crop_flip", "random_resized_crop", "none")
EVAL_CROP_FRACTION = 0.875  # evaluation: resize the shorter side to S / 0.875, then center-crop S x S
DECODE_ERRORS = (OSError, ValueError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)
# Give up on a batch after this many unreadable files in a row: the data set is broken, not noisy.
MAX_CONSECUTIVE_BAD_FILES = 32


class Batch(NamedTuple):
    images: torch.Tensor | None  # uint8 (B, 3, S, S); None when the loader already made `patches`
    labels: torch.Tensor  # int64 (B,)
    indices: torch.Tensor  # int64 (B,) positions in the source, for identity checks and pictures
    skipped: tuple[str, ...] = ()  # unreadable files replaced in this batch: "path: error"
    # Set only by a loader that runs the patch op itself (FFCV's CPU path): what `pipeline.patches`
    # would make of `images`, the group-major (B * N, C, p, p) float32 patch tensor, and its perm (B, N).
    patches: torch.Tensor | None = None
    perm: torch.Tensor | None = None


class FolderSource:
    """ImageNet layout: one sub-folder per class holding image files; classes sorted by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.classes = sorted(
            entry.name for entry in os.scandir(root) if entry.is_dir() and not _loops_back(entry, root)
        )
        files: list[str] = []
        labels: list[int] = []
        others: list[str] = []
        for label, name in enumerate(self.classes):
            found = _image_files(str(root / name), others)
            files += found
            labels += [label] * len(found)
        _note_left_out(others)
        if not files:
            raise DataError(
                f"{root}: no image files found; expected class sub-folders holding "
                f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS[:3])} files (ImageNet layout) "
                "or CIFAR-10 python batches"
            )
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index]

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            return to_rgb(image)


def _image_files(top: str, others: list[str]) -> list[str]:
    """Image-named regular files under `top`, in os.walk's order (folders top-down, names sorted, links to
    folders not followed). Image-named entries that are not regular files (a FIFO, a socket, a device, a
    dangling link) go to `others`: opening a FIFO would block the run forever."""
    try:
        entries = list(os.scandir(top))
    except OSError:  # unreadable folder: os.walk skips it too
        return []
    folders = [entry for entry in entries if entry.is_dir()]
    found = []
    for entry in sorted((e for e in entries if not e.is_dir()), key=lambda e: e.name):
        if entry.name.lower().endswith(IMAGE_EXTENSIONS):
            (found if entry.is_file() else others).append(entry.path)
    for folder in folders:
        if not folder.is_symlink():
            found += _image_files(folder.path, others)
    return found


def _note_left_out(others: list[str]) -> None:
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        kinds = "a FIFO, socket, device or dangling link"
        what = "not a regular file" if len(others) == 1 else "not regular files"
        print(f"note: {', '.join(others[:3])}{more}: {what} ({kinds}); left out")


def _loops_back(entry: os.DirEntry, root: Path) -> bool:
    """A class folder that is a link to the data root or above it: following it would count every image
    again (or forever). It is left out, and said so."""
    if not entry.is_symlink():
        return False
    target, top = Path(entry.path).resolve(), root.resolve()
    if target == top or target in top.parents:
        print(f"note: {entry.path} links back to {target}, which holds it; left out")
        return True
    return False


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. A 16-bit (or 32-bit integer) grayscale image is scaled to 0..255, not clipped (PIL's own
    conversion would clip almost every pixel of a 16-bit image to white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode != "I" or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(pixels / scale * 255), 0, 255).astype(np.uint8))
    return image.convert("RGB")


class ArraySource:
    """Decoded images held in memory: `images` uint8 (N, S, S, 3) (NHWC), `labels` int64 (N,), `classes`.
    Every backend reads its pixels directly (nothing to decode, nothing unreadable)."""

    root: Path
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"{self.root}[{index}]"

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class CifarSource(ArraySource):
    """CIFAR-10 "python version": pickled batches of 10,000 rows of 3072 uint8 (R, G, B planes)."""

    def __init__(self, root: Path, split: str) -> None:
        self.root = root
        names = CIFAR_TRAIN_FILES if split == "train" else (CIFAR_TEST_FILE,)
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            raise DataError(f"{root}: CIFAR-10 folder lacks {', '.join(missing)} (needed for split {split!r})")
        images, labels = [], []
        for name in names:
            try:
                batch = read_cifar_batch(root / name)
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch[b"labels"])
                _check_cifar_batch(root / name, len(images[-1]), batch[b"labels"])
            except RefusedPickle as error:
                raise DataError(f"{root / name}: refused, {error} (loading it could run code from the file)") from error
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as error:
                raise DataError(f"{root / name}: not a readable CIFAR-10 python batch ({error})") from error
        self.images = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # NHWC
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [str(i) for i in range(CIFAR_CLASSES)]


class IdxSource(ArraySource):
    """An IDX folder's split (see the module docstring), held decoded in memory."""

    def __init__(self, root: Path, split: str) -> None:
        self.root = root
        paths = {kind: split_file(root, split, kind) for kind in ("images", "labels")}
        missing = [kind for kind, path in paths.items() if path is None]
        if missing:
            prefix = SPLIT_PREFIXES[split]
            wanted = ", ".join(f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte[.gz]" for kind in missing)
            raise DataError(f"{root}: IDX folder lacks {wanted} (needed for split {split!r})")
        images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
        if images.ndim != 3:
            raise DataError(f"{paths['images']}: {images.ndim}-d values; expected (images, rows, columns)")
        if labels.shape != (len(images),):
            expected = f"one label for each of {len(images)} images"
            raise DataError(f"{paths['labels']}: shape {labels.shape}; expected {expected}")
        self.images = cifar_layout(images)
        self.labels = labels.astype(np.int64)
        self.classes = [str(i) for i in range(int(self.labels.max(initial=0)) + 1)]


def _check_cifar_batch(path: Path, count: int, labels: list) -> None:
    """Every image has its label, and every label names one of CIFAR-10's classes: a shorter label list
    would silently shift every later label onto the wrong image."""
    if len(labels) != count:
        raise DataError(f"{path}: {count} images but {len(labels)} labels; expected one label per image")
    values = np.asarray(labels)
    if len(values) and (values.min() < 0 or values.max() >= CIFAR_CLASSES):
        raise DataError(
            f"{path}: labels run {values.min()} .. {values.max()}; expected class indices 0 .. {CIFAR_CLASSES - 1}"
        )


Source = FolderSource | ArraySource


def open_source(path: str | os.PathLike, split: str = "train") -> Source:
    """A CIFAR-10 python folder, an IDX folder (MNIST, Fashion-MNIST, KMNIST; `pipeline.idx`), or an
    ImageNet-layout folder (its `train/` or `val/` when present)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(path)
    if not root.exists():
        raise DataError(f"--data {root}: no such file or folder")
    if not root.is_dir():
        raise DataError(f"--data {root}: expected a folder (ImageNet layout, CIFAR-10 python batches or IDX files)")
    if (root / CIFAR_TRAIN_FILES[0]).exists() or (root / CIFAR_TEST_FILE).exists():
        return CifarSource(root, split)
    if is_idx_folder(root):
        return IdxSource(root, split)
    if split == "train":
        return FolderSource(root / "train" if (root / "train").is_dir() else root)
    for name in ("val", "test"):
        if (root / name).is_dir():
            return FolderSource(root / name)
    raise DataError(f"--data {root}: no test split; expected a val/ or test/ folder beside train/")


def check_readable(source: Source, probes: int = 16, crop: int = 0) -> None:
    """Fail fast when a folder holds image-named files none of which decode; warn when the first readable
    one is smaller than the `crop` (side in pixels) the run enlarges it to."""
    if isinstance(source, ArraySource):
        return
    picks = np.linspace(0, len(source) - 1, num=min(probes, len(source))).round().astype(int)
    errors = []
    for index in picks:
        try:
            width, height = source.load(int(index)).size
        except DECODE_ERRORS as error:
            errors.append(f"{source.name(int(index))}: {error}")
            continue
        if min(width, height) < crop:
            print(
                f"warning: {source.name(int(index))} is {width}x{height} px, smaller than the {crop} px training "
                "crop: images are enlarged to it, and one with fewer pixels than the patch grid or the views "
                "need carries little to learn from (the pretext loss can stay at chance)"
            )
        return
    raise DataError(f"{source.root}: no readable image among {len(picks)} probed files; first: {errors[0]}")


@dataclass(frozen=True)
class BatchSpec:
    step: int
    indices: tuple[int, ...]
    seed: int  # drives this batch's augmentation, whichever worker builds it


# Streams of derived seeds; a seed is derive_seed(run seed, stream, ...) so no two uses collide.
EPOCH_ORDER_STREAM, AUGMENT_STREAM, MASK_STREAM, SUBSET_STREAM, INIT_STREAM, PICTURE_STREAM = 1, 2, 3, 4, 5, 6
CLEAN_STREAM, RANDOM_INIT_STREAM, HOLDOUT_STREAM = 7, 8, 9  # monitors' fixed draws, their random net, validation


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (non-negative ints); stable across runs and machines."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class ShardedBatchSampler:
    """Endless `BatchSpec`s for one rank, from `start_step` on; see the module docstring."""

    def __init__(
        self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, start_step: int = 0
    ) -> None:
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise DataError(
                f"the data set has {num_samples} images, fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {world_size} processes); lower --batch-size"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.steps_per_epoch = num_samples // global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_ORDER_STREAM, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def rank_batches(self, epoch: int) -> np.ndarray:
        """(steps per epoch, B) int64: this rank's batches of `epoch`, the r-th B of every global batch."""
        used = self.epoch_order(epoch).numpy()[: self.steps_per_epoch * self.batch_size * self.world_size]
        return used.reshape(self.steps_per_epoch, self.world_size, self.batch_size)[:, self.rank]

    def __iter__(self) -> Iterator[BatchSpec]:
        step = self.start_step
        epoch, batches = -1, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                batches = self.rank_batches(epoch)
            indices = tuple(batches[step % self.steps_per_epoch].tolist())
            yield BatchSpec(step, indices, derive_seed(self.seed, AUGMENT_STREAM, step, self.rank))
            step += 1


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Rank r's positions for evaluation: the r-th of `world_size` contiguous, near-equal slices (possibly
    empty), so counts summed over ranks count every sample once and nothing is padded."""
    return np.array_split(np.arange(num_samples), world_size)[rank]


def eval_chunks(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """`eval_shard` cut into batches of `batch_size` (the last one short)."""
    shard = eval_shard(num_samples, rank, world_size)
    return [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]


class BatchAssembler(torch.utils.data.Dataset):
    """Builds one whole `Batch` from a `BatchSpec` inside a loader worker. The ops, in order:

    1. decode each file to RGB (an unreadable one is replaced by the next readable index and reported;
       in evaluation, `center_crop`, it is left out and reported, so no image is counted twice);
    2. per image: random resized crop + flip to S (`random_resized_crop`); for evaluation
       (`center_crop`) an image not already S x S has its shorter side resized to S / 0.875 and its
       center S x S kept; otherwise resize to S x S if needed;
    3. stack into uint8 (B, 3, S, S);
    4. batched pad (zeros, reflected or edge pixels) + random crop + flip (`pad_crop_flip`).
    """

    def __init__(
        self,
        source: Source,
        image_size: int,
        augment: str,
        pad: int = 4,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        fail_on_corrupt: bool = False,
        pad_mode: str = "zero",
    ) -> None:
        if augment not in (*AUGMENTS, "center_crop"):
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.source = source
        self.image_size = image_size
        self.augment = augment
        self.pad, self.pad_mode = pad, pad_mode
        self.crop_scale = crop_scale
        self.fail_on_corrupt = fail_on_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int, skipped: list[str]) -> tuple[Image.Image, int]:
        """The image at `index`, or the next readable one; every unreadable file is reported in `skipped`."""
        for attempt in range(MAX_CONSECUTIVE_BAD_FILES):
            candidate = (index + attempt) % len(self.source)
            image = self._load_or_skip(candidate, skipped)
            if image is not None:
                return image, candidate
        raise DataError(f"{self.source.name(index)} and the next {MAX_CONSECUTIVE_BAD_FILES - 1} files are unreadable")

    def _load_or_skip(self, index: int, skipped: list[str]) -> Image.Image | None:
        try:
            return self.source.load(index)
        except DECODE_ERRORS as error:
            if self.fail_on_corrupt:
                raise DataError(f"{self.source.name(index)}: unreadable image ({error})") from error
            skipped.append(f"{self.source.name(index)}: {error}")
            return None

    def _resize(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        size = self.image_size
        if self.augment == "random_resized_crop":
            top, left, height, width = random_resized_crop_box(image.height, image.width, rng, self.crop_scale)
            image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
            return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image
        if self.augment == "center_crop" and image.size != (size, size):
            scale = size / EVAL_CROP_FRACTION / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            return image.crop((left, top, left + size, top + size))
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return image

    def __getitem__(self, spec: BatchSpec) -> Batch:
        rng = np.random.default_rng(spec.seed)
        skipped: list[str] = []
        arrays, indices = [], []
        for index in spec.indices:
            if self.augment == "center_crop":  # evaluation: leave an unreadable image out, never count another twice
                image, used = self._load_or_skip(index, skipped), index
                if image is None:
                    continue
            else:
                image, used = self._load(index, skipped)
            arrays.append(np.asarray(self._resize(image, rng)))
            indices.append(used)
        stacked = np.stack(arrays) if arrays else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
        if self.augment == "pad_crop_flip":
            images = pad_crop_flip(images, self.pad, torch.Generator().manual_seed(spec.seed), self.pad_mode)
        index_tensor = torch.tensor(indices, dtype=torch.int64)
        labels = torch.from_numpy(self.source.labels[index_tensor.numpy()])
        return Batch(images, labels, index_tensor, tuple(skipped))


def torch_loader(request: TrainRequest) -> Iterator[Batch]:
    """The torch `DataLoader` backend: worker processes assemble whole batches (see `BatchAssembler`)."""
    r, device = request, request.device
    sampler = ShardedBatchSampler(len(r.source), r.batch_size, r.rank, r.world_size, r.seed, r.start_step)
    loader = torch.utils.data.DataLoader(
        BatchAssembler(r.source, r.image_size, r.augment, r.pad, r.crop_scale, r.fail_on_corrupt, r.pad_mode),
        sampler=sampler,
        batch_size=None,
        num_workers=r.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=r.workers > 0,
        prefetch_factor=4 if r.workers > 0 else None,
        worker_init_fn=one_thread_per_worker,
        # Its own generator: starting the iterator must not draw from the global RNG, whose state
        # (dropout) a resumed run restores before the loader starts.
        generator=torch.Generator().manual_seed(r.seed),
    )
    yield from _on_device(loader, device)


def eval_loader(request: EvalRequest) -> Iterator[Batch]:
    """Every image of `source` exactly once over all ranks, in order, center-cropped, no augmentation.

    Rank r reads the r-th of `world_size` contiguous, near-equal slices (its last batch may be short and
    a slice may be empty), so summing counts over ranks counts each test image once: nothing is padded.
    An unreadable image is left out of its batch and named in `skipped` (or fatal with `fail_on_corrupt`).
    """
    r, device = request, request.device
    chunks = eval_chunks(len(r.source), r.batch_size, r.rank, r.world_size)
    loader = torch.utils.data.DataLoader(
        BatchAssembler(r.source, r.image_size, "center_crop", fail_on_corrupt=r.fail_on_corrupt),
        sampler=[BatchSpec(0, tuple(chunk.tolist()), 0) for chunk in chunks],
        batch_size=None,
        num_workers=r.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=one_thread_per_worker,
        generator=torch.Generator(),  # starting workers must not draw from the global RNG (training's dropout)
    )
    yield from _on_device(loader, device)


def one_thread_per_worker(_worker_id: int) -> None:
    """A loader worker shares the cores with the training process's intra-op threads: torch already runs
    one thread in a worker, and so must the thread pools a decoder may have brought in (numba, OpenCV),
    or a loaded machine runs several times more threads than cores and the step slows by an order of
    magnitude."""
    if "numba" in sys.modules:
        sys.modules["numba"].set_num_threads(1)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)


def _on_device(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[Batch]:
    yield from device_prefetch(_worker_errors_as_one_line(loader), device)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return batch._replace(
        images=batch.images.to(device, non_blocking=True),
        labels=batch.labels.to(device, non_blocking=True),
        indices=batch.indices.to(device, non_blocking=True),
    )


def device_prefetch(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches` (pinned host memory on a CUDA machine) on `device`. On CUDA the next batch's host-to-device
    copy runs on a side stream while the current one is consumed (`side_stream_prefetch`)."""
    if device.type != "cuda":
        yield from (_to_device(batch, device) for batch in batches)
        return
    copy = functools.partial(_to_device, device=device)
    yield from side_stream_prefetch(batches, copy, torch.cuda.Stream(device), torch.cuda)


def side_stream_prefetch(batches: Iterator[Batch], copy, side, cuda) -> Iterator[Batch]:
    """Each batch's copy (`copy`, issued on the stream `side`) starts one batch ahead, and an event recorded
    after it marks its end: the consumer's stream waits for that event only before it uses the batch, so
    step k never waits for the copy of batch k + 1 (waiting on the whole side stream would). `cuda` is
    the `torch.cuda` namespace (Event, stream, current_stream); a test passes a stand-in."""

    def staged(batch: Batch) -> tuple[Batch, object]:
        with cuda.stream(side):
            copied = copy(batch)
            done = cuda.Event()
            done.record(side)
        return copied, done

    upcoming = None
    for batch in batches:
        copied = staged(batch)
        if upcoming is not None:
            yield _handed_over(*upcoming, cuda)
        upcoming = copied
    if upcoming is not None:
        yield _handed_over(*upcoming, cuda)


def _handed_over(batch: Batch, done, cuda) -> Batch:
    """`batch`, whose copy ends at the event `done`, made safe to use on the current stream: wait for that
    copy alone, and tell the allocator the tensors are in use there (so their memory is not reused under
    the consumer)."""
    current = cuda.current_stream()
    current.wait_event(done)
    for tensor in (batch.images, batch.labels, batch.indices):
        tensor.record_stream(current)
    return batch


def _worker_errors_as_one_line(loader: torch.utils.data.DataLoader) -> Iterator[Batch]:
    """A `DataError` raised in a worker arrives wrapped in the worker's traceback; keep its own message."""
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except DataError as error:
            last_line = str(error).strip().splitlines()[-1]
            raise DataError(last_line.split("DataError: ", 1)[-1]) from None
