"""The DALI backend: decode and augment in a DALI pipeline, on the GPU (`mixed` decoder: nvJPEG or
the hardware JPEG decoder) when the training device is one, on the CPU (`device_id=None`) otherwise.

Sample order is the torch backend's (`ShardedBatchSampler` over *global* ranks: one per-epoch
permutation, rank r takes the r-th contiguous batch of every global batch, the remainder dropped), fed
to DALI through an external source, so every backend reads the same images at every step, a resumed
run continues on exactly the images it would have read, and no batch is padded with duplicates
(evaluation batches may be short instead). DALI's file reader is not used because it keeps its own
order and cannot start mid-epoch; the source files are read as bytes, decoded by DALI.

The ops, in order:

1. external source: encoded file bytes (image folders) or raw HWC pixels (CIFAR), labels, indices;
   an unreadable file (bad signature or truncated) is replaced by the next readable one and reported
   in `Batch.skipped` (evaluation: left out), or is fatal with `fail_on_corrupt`;
2. decode: `random_resized_crop` -> fused decode + random crop (ROI decoding) and resize to S;
   otherwise a full decode (CIFAR pixels need none);
3. resize: `center_crop` (evaluation) -> shorter side to S / 0.875 (S x S images are left as they
   are) and the center S x S; `pad_crop_flip` / `none` -> S x S when not already;
4. `pad_crop_flip`: zero padding + random crop (one slice whose window may leave the image);
5. crop-mirror-normalize: random horizontal flip (`pad_crop_flip`, `random_resized_crop`) and the
   HWC -> CHW transpose, kept uint8: the batch contract of `pipeline.data`. Normalisation happens
   on the device inside the patch op (`pipeline.fused_patches`), fused with gridding.

DALI draws its augmentation from a seeded per-rank generator, so a run is reproducible from its start;
a resumed run reads the same images but draws other crops than the uninterrupted one would have.
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from pipeline.data import (
    AUGMENT_STREAM,
    DECODE_ERRORS,
    EVAL_CROP_FRACTION,
    MAX_CONSECUTIVE_BAD_FILES,
    ArraySource,
    Batch,
    BatchSpec,
    DataError,
    FolderSource,
    ShardedBatchSampler,
    Source,
    derive_seed,
    eval_chunks,
)
from pipeline.loader_request import EvalRequest, ImageTransform, TrainRequest
from pipeline.subsets import SubsetSource

PREFETCH_DEPTH = 2  # DALI's memory pool never shrinks: every queued batch stays allocated for the run


def signature_error(data: np.ndarray) -> str | None:
    """Why `data` cannot be a complete image file DALI decodes, or None. Catches the usual corruption
    (truncated downloads, empty or foreign files) before it reaches the decoder, where it would cost
    the whole batch."""
    head, tail = data[:12].tobytes(), data[-4096:].tobytes()
    if head.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail[-12:] else "truncated PNG (no IEND chunk)"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    if not len(data):
        return "empty file"
    return "not a JPEG, PNG, BMP, TIFF, WebP or PNM file"


class _Feed:
    """DALI's external source: per batch, (image data list, labels, indices) in `specs` order.

    Image data is the file's bytes (folders) or the HWC pixels (CIFAR); a batch's files are read by a
    thread pool (file reads release the GIL), since DALI calls this in the training process's thread.
    What it skips and the names it sends are queued in `skipped` and `names`, one entry per emitted
    batch, in the order DALI will return the batches."""

    def __init__(
        self,
        source: Source | SubsetSource,
        specs: Iterator[BatchSpec],
        evaluation: bool,
        fail_on_corrupt: bool,
        readers: int = 4,
    ) -> None:
        self.source = source.source if isinstance(source, SubsetSource) else source
        self.rows = source.indices if isinstance(source, SubsetSource) else None
        self.size = len(source)
        self.specs = specs
        self.evaluation = evaluation
        self.fail_on_corrupt = fail_on_corrupt
        self.skipped: deque[tuple[str, ...]] = deque()
        self.names: deque[tuple[str, ...]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="dali-feed")

    def name(self, index: int) -> str:
        return self.source.name(int(self.rows[index]) if self.rows is not None else index)

    def _read(self, index: int) -> tuple[np.ndarray | None, str | None]:
        row = int(self.rows[index]) if self.rows is not None else index
        if isinstance(self.source, ArraySource):
            return self.source.images[row], None
        name = self.source.name(row)
        try:
            data = np.fromfile(name, dtype=np.uint8)
        except OSError as error:
            return None, f"{name}: {error}"
        problem = signature_error(data)
        return (data, None) if problem is None else (None, f"{name}: {problem}")

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        skipped: list[str] = []
        while True:
            try:
                spec = next(self.specs)
            except StopIteration:  # the end of an evaluation pass
                for entry in skipped:
                    print(f"warning: unreadable test image, not counted: {entry}")
                raise
            data, indices = [], []
            first_reads = self.pool.map(self._read, spec.indices)
            for index, first_read in zip(spec.indices, first_reads, strict=True):
                for attempt in range(1 if self.evaluation else MAX_CONSECUTIVE_BAD_FILES):
                    candidate = (index + attempt) % self.size
                    array, problem = first_read if attempt == 0 else self._read(candidate)
                    if array is not None:
                        data.append(array)
                        indices.append(candidate)
                        break
                    if self.fail_on_corrupt:
                        raise DataError(f"{problem} (unreadable image)")
                    skipped.append(problem)
                else:
                    if not self.evaluation:
                        raise DataError(f"{self.name(index)} and the next files are unreadable")
            if data:  # an evaluation batch with nothing readable is folded into the next one's report
                break
        indices = np.asarray(indices, dtype=np.int64)
        rows = self.rows[indices] if self.rows is not None else indices
        labels = self.source.labels[rows]
        self.skipped.append(tuple(skipped))
        self.names.append(tuple(self.name(int(i)) for i in indices))
        return data, labels, indices


def _decoded(data, encoded: bool, transform: ImageTransform, gpu: bool):
    """(images, source shapes) of the external source's batch: files decoded (with the random crop fused
    into the decoder for `random_resized_crop`), or raw CIFAR pixels moved to the GPU."""
    from nvidia.dali import fn, types

    if not encoded:
        return (data.gpu() if gpu else data), fn.shapes(data)
    shape = fn.peek_image_shape(data)
    device = "mixed" if gpu else "cpu"
    if transform.augment == "random_resized_crop":
        area = list(transform.crop_scale)
        crop = {"random_area": area, "random_aspect_ratio": [3 / 4, 4 / 3], "num_attempts": 10}
        return fn.decoders.image_random_crop(data, device=device, output_type=types.RGB, **crop), shape
    return fn.decoders.image(data, device=device, output_type=types.RGB), shape


def _sized(images, shape, encoded: bool, transform: ImageTransform):
    """The decoded images at S x S: resized crops, evaluation's center crop, or a plain resize."""
    from nvidia.dali import fn, types

    image_size, augment = transform.image_size, transform.augment
    size = [image_size, image_size]
    if augment == "random_resized_crop":
        return (
            fn.resize(images, size=size)
            if encoded
            else fn.random_resized_crop(images, size=size, random_area=list(transform.crop_scale))
        )
    if augment == "center_crop":
        needs_resize = fn.cast((shape[0] != image_size) | (shape[1] != image_size), dtype=types.FLOAT)
        target = image_size + needs_resize * (image_size / EVAL_CROP_FRACTION - image_size)
        return fn.crop(fn.resize(images, resize_shorter=target), crop=size)
    if encoded or image_size != 32:  # CIFAR pixels are already 32 x 32
        return fn.resize(images, size=size)
    return images


def _augmented(images, transform: ImageTransform):
    """Zero-pad + random crop (pad_crop_flip), the random flip, and the uint8 CHW layout of the contract."""
    from nvidia.dali import fn, types

    mirror, augment, pad = 0, transform.augment, transform.pad
    if augment == "pad_crop_flip":
        # `values`, not an integer `range`: DALI rounds a continuous draw there, halving the end points.
        offsets = [float(v) for v in range(-pad, pad + 1)]
        anchor = fn.cast(fn.random.uniform(values=offsets, shape=[2]), dtype=types.INT32)
        size = np.array([transform.image_size, transform.image_size], dtype=np.int32)
        images = fn.slice(images, anchor, size, axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
    if augment in ("pad_crop_flip", "random_resized_crop"):
        mirror = fn.random.coin_flip()
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8, output_layout="CHW", mean=0.0, std=1.0)


def _build_pipeline(
    feed: _Feed, transform: ImageTransform, batch_size: int, device_id: int | None, threads: int, seed: int
):
    """The op list, in order: external source -> decode (or raw pixels) -> S x S -> pad/crop/flip -> CHW."""
    gpu, encoded = device_id is not None, _encoded(feed.source)  # data it cannot read is refused first
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=PREFETCH_DEPTH
    )
    def pipeline():
        data, labels, indices = fn.external_source(
            source=feed,
            num_outputs=3,
            batch=True,
            dtype=[types.UINT8, types.INT64, types.INT64],
            layout=[None if encoded else "HWC", None, None],
        )
        images, shape = _decoded(data, encoded, transform, gpu)
        images = _sized(images, shape, encoded, transform)
        return _augmented(images, transform), labels, indices

    built = pipeline()
    built.build()
    return built


def _encoded(source: Source | SubsetSource) -> bool:
    base = source.source if isinstance(source, SubsetSource) else source
    if isinstance(base, ArraySource):
        return False
    if isinstance(base, FolderSource):
        return True
    raise DataError(f"--loader dali reads image folders and CIFAR-10 folders, not {getattr(base, 'root', base)}")


def _run(pipe, feed: _Feed, device: torch.device) -> Iterator[Batch]:
    """The pipeline's batches as `Batch`es; closing the stream frees the pipeline (its threads and pool)."""
    try:
        yield from _outputs(pipe, feed, device)
    finally:
        del pipe
        gc.collect()
        feed.pool.shutdown(wait=False)


def _outputs(pipe, feed: _Feed, device: torch.device) -> Iterator[Batch]:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    while True:
        try:
            images, labels, indices = pipe.run()
        except StopIteration:
            return
        except RuntimeError as error:
            raise DataError(_decode_failure(feed.names[0], error)) from error
        if device.type == "cuda":
            shape = images.as_tensor().shape()
            out = torch.empty(shape, dtype=torch.uint8, device=device)
            feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(device))
        else:
            out = torch.from_numpy(np.array(images.as_tensor()))
        feed.names.popleft()
        yield Batch(
            out,
            torch.from_numpy(np.array(labels.as_tensor())).reshape(-1).to(device, non_blocking=True),
            torch.from_numpy(np.array(indices.as_tensor())).reshape(-1).to(device, non_blocking=True),
            feed.skipped.popleft(),
        )


def _decode_failure(names: tuple[str, ...], error: RuntimeError) -> str:
    """A file that passed the signature check but not DALI's decoder (corrupt inside) fails its whole
    batch, and the pipeline cannot go on; name the file(s) PIL cannot decode either."""
    bad = []
    for name in names:
        try:
            with Image.open(name) as image:
                image.load()
        except DECODE_ERRORS as pil_error:
            bad.append(f"{name} ({pil_error})")
    where = ", ".join(bad) if bad else f"one of {len(names)} files from {names[0]} on"
    return (
        f"DALI could not decode {where}: {str(error).strip().splitlines()[0]}; remove or re-encode it, or "
        "use --loader torch, which skips unreadable images"
    )


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def dali_loader(request: TrainRequest) -> Iterator[Batch]:
    """Endless training batches; same contract and order as `pipeline.data.torch_loader`.

    `rank`/`world_size` are the *global* process index and count (Accelerate's `process_index` and
    `num_processes`); the GPU is the training device's (its local index)."""
    r = request
    sampler = ShardedBatchSampler(len(r.source), r.batch_size, r.rank, r.world_size, r.seed, r.start_step)
    feed = _Feed(r.source, iter(sampler), evaluation=False, fail_on_corrupt=r.fail_on_corrupt)
    seed = derive_seed(r.seed, AUGMENT_STREAM, r.rank, r.start_step) % 2**31
    pipe = _build_pipeline(feed, r.transform, r.batch_size, _device_id(r.device), max(1, r.workers), seed)
    return _run(pipe, feed, r.device)


def dali_eval_loader(request: EvalRequest) -> Iterator[Batch]:
    """Every image once over all ranks, center-cropped, in order; the sharding of `pipeline.data.eval_loader`
    (contiguous slices, a short last batch instead of DALI's padding), so summed counts count each image once."""
    r = request
    chunks = eval_chunks(len(r.source), r.batch_size, r.rank, r.world_size)
    if not chunks:
        return iter(())
    feed = _Feed(r.source, iter(BatchSpec(0, tuple(c.tolist()), 0) for c in chunks), True, r.fail_on_corrupt)
    pipe = _build_pipeline(feed, r.transform, r.batch_size, _device_id(r.device), max(1, r.workers), 0)
    return _run(pipe, feed, r.device)
