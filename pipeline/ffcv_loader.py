"""The FFCV backend: reads a `.beton` written by `python -m pipeline.convert`.

Sample order is the torch backend's (`ShardedBatchSampler`: one per-epoch permutation, rank r takes
the r-th contiguous batch of every global batch, the remainder dropped), handed to FFCV as its
traversal order, so both backends read the same images at every step and a resumed run continues on
exactly the images it would have read. FFCV's own `distributed=True` is not used: it shards like
`DistributedSampler` (strided, padded), not like our other backends. `quasi_random=True` uses FFCV's
quasi-random order instead (for data sets larger than RAM, with `os_cache=False`; one process only,
since FFCV does not support it distributed).

The ops, in order, for the `image` field (labels and source indices are decoded beside it):

1. decode (JPEG or raw), fused with the crop: `random_resized_crop` -> random resized crop to S;
   `center_crop` (evaluation) -> center crop of 0.875 of the shorter side resized to S; otherwise the
   stored S x S image as is (other sizes: the whole image resized to S x S);
2. `pad_crop_flip`: random horizontal flip, then zero padding + random crop (FFCV's RandomTranslate);
   `random_resized_crop`: random horizontal flip;
3. either (a) to a contiguous uint8 (B, 3, S, S) tensor on the device (non-blocking copy): the batch
   contract of `pipeline.data`; or (b) on the CPU path of pretraining, `SelfiePatches`: the patch
   op compiled into the pipeline, so the loader's threads emit the group-major float32 patch tensor
   and the permutations (`Batch.patches`, `Batch.perm`) ready for P.

FFCV's crop and flip ops draw from numba's generator, unseeded: which images a step reads is
reproducible, its crops and flips are not (with (3b) they draw from thread states that op reseeded for
the previous batch, which leaves their distribution as it was: checked over 384 images). The masks of
(3b) are reproducible: each sample's generator is seeded from the run's seed, its batch and its row, so
a resumed run draws the masks the uninterrupted one would (they differ from the masks the other
backends draw in the step, which depend on the step's seed).
"""

from __future__ import annotations

import io
import json
import queue
from collections.abc import Iterator, Sequence
from pathlib import Path

import numba
import numpy as np
import torch
from PIL import Image

from pipeline.beton_writer import FIELD_NAMES, SIDECAR_FORMAT, fingerprint, sidecar_path
from pipeline.data import (
    CIFAR_TEST_FILE,
    EPOCH_ORDER_STREAM,
    EVAL_CROP_FRACTION,
    MASK_STREAM,
    Batch,
    DataError,
    ShardedBatchSampler,
    derive_seed,
    eval_shard,
)
from pipeline.idx import is_idx_folder
from pipeline.loader_request import EvalRequest, ImageTransform, TrainRequest
from pipeline.patches import PatchSpec, scaled_stats
from pipeline.subsets import SubsetSource

BATCHES_AHEAD = 3  # batches FFCV decodes ahead of the consumer (pipeline.loaders' ready_batches)


class BetonSource:
    """A `.beton` from `pipeline.convert` as a data source: index i is row i of the file."""

    def __init__(self, path: str | Path) -> None:
        from ffcv.reader import Reader

        self.path = Path(path)
        self.root = self.path
        sidecar = sidecar_path(self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such .beton file")
        try:
            self.info = json.loads(sidecar.read_text())
        except (OSError, ValueError) as error:
            raise DataError(
                f"{self.path}: its sidecar {sidecar.name} is missing or unreadable ({error}); "
                "write the file with python -m pipeline.convert"
            ) from error
        try:
            self.reader = Reader(str(self.path))
        except Exception as error:  # noqa: BLE001 (FFCV raises AssertionError and others on a bad file)
            raise DataError(f"{self.path}: not a readable .beton file ({error!r})") from error
        self._check_fingerprint(sidecar)
        self._check_samples()
        if self.reader.field_names != list(FIELD_NAMES) or self.reader.num_samples != self.info.get("images"):
            raise DataError(
                f"{self.path}: holds fields {self.reader.field_names} and {self.reader.num_samples} images, "
                f"but its sidecar says {self.info.get('fields')} and {self.info.get('images')}; "
                "write it again with python -m pipeline.convert"
            )
        fields = self.reader.metadata
        self.labels = np.asarray(fields["f1"], dtype=np.int64)
        self.source_indices = np.asarray(fields["f2"], dtype=np.int64)  # position of each row in the source
        self.classes = list(self.info["classes"])
        size = self.info.get("uniform_size")
        self.uniform_size = tuple(size) if size else None
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise DataError(
                f"{self.path}: labels run {self.labels.min()} .. {self.labels.max()} but its sidecar names "
                f"{len(self.classes)} classes; convert it again"
            )

    def _check_fingerprint(self, sidecar: Path) -> None:
        """The sidecar describes this file, and (format v2) is as conversion wrote it."""
        v2 = self.info.get("format") == SIDECAR_FORMAT
        if fingerprint(self.reader, self.info if v2 else None) != self.info.get("fingerprint"):
            raise DataError(
                f"{self.path}: its sidecar {sidecar.name} does not match the file (edited, or left from another "
                "conversion); convert it again with python -m pipeline.convert"
            )
        if not v2:
            print(f"note: {self.path} was converted by an older version; its sidecar's classes and sizes are not "
                  "checked (convert it again to have them checked)")  # fmt: skip

    def _check_samples(self) -> None:
        """Every sample's bytes lie inside the file and every image's size is what the sidecar and its own
        allocation allow. FFCV reads them unchecked: a pointer past the end trains on whatever the mapping
        holds, and a claimed 60000x60000 image is allocated before it is decoded. The fingerprint does not
        cover this: a forger recomputes it."""
        end = self.path.stat().st_size
        table, images = self.reader.alloc_table, self.reader.metadata["f0"]
        ptr, size = table["ptr"].astype(np.uint64), table["size"].astype(np.uint64)
        outside = (ptr > end) | (size > np.uint64(end) - np.minimum(ptr, np.uint64(end)))
        order = np.argsort(ptr, kind="stable")
        at = np.minimum(np.searchsorted(ptr[order], images["data_ptr"]), max(len(ptr) - 1, 0))
        unknown = ~(ptr[order][at] == images["data_ptr"]) if len(ptr) else np.ones(len(images), bool)
        if outside.any() or unknown.any():
            row = int(np.flatnonzero(outside)[0]) if outside.any() else int(np.flatnonzero(unknown)[0])
            raise DataError(f"{self.path}: sample {row}'s bytes point outside the file ({end} bytes); a damaged or "
                            "forged .beton, convert it again with python -m pipeline.convert")  # fmt: skip
        pixels = images["height"].astype(np.int64) * images["width"].astype(np.int64) * 3
        uniform = self.info.get("uniform_size")
        wrong = (images["mode"] == 1) & (pixels > size[order][at].astype(np.int64))
        if uniform:
            wrong |= (images["height"] != uniform[0]) | (images["width"] != uniform[1])
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            claim = f"{images['height'][row]}x{images['width'][row]}"
            raise DataError(
                f"{self.path}: sample {row} claims {claim} pixels, not what its sidecar ({uniform}) or its stored "
                "bytes allow; convert it again"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"{self.path}[{index}] ({self.info['source']} #{self.source_indices[index]})"

    def load(self, index: int) -> Image.Image:
        """One image, decoded here without FFCV (for pictures and checks, not for training)."""
        image = self.reader.metadata["f0"][index]
        table = self.reader.alloc_table
        size = int(table["size"][np.flatnonzero(table["ptr"] == image["data_ptr"])[0]])
        with open(self.path, "rb") as f:
            f.seek(int(image["data_ptr"]))
            data = f.read(size)
        if image["mode"] == 1:  # raw
            shape = (int(image["height"]), int(image["width"]), 3)
            return Image.fromarray(np.frombuffer(data[: np.prod(shape)], np.uint8).reshape(shape))
        with Image.open(io.BytesIO(data)) as decoded:
            return decoded.convert("RGB")


def _noted(source: BetonSource) -> BetonSource:
    """Images the conversion left out are said again wherever the file is used."""
    skipped = source.info.get("skipped") or []
    if skipped:
        print(
            f"note: {source.path} leaves out {len(skipped)} unreadable source image(s), first {skipped[0]} "
            f"(all listed in {sidecar_path(source.path).name})"
        )
    return source


def open_betons(path: str | Path, split: str) -> BetonSource:
    """`path` is a .beton (the train split) or a folder holding train.beton and val.beton/test.beton."""
    root = Path(path)
    if root.suffix == ".beton":
        if split != "train":
            raise DataError(
                f"--data {root}: a single .beton has no test split; pass a folder holding "
                "train.beton and val.beton (or test.beton)"
            )
        return _noted(BetonSource(root))
    names = ("train.beton",) if split == "train" else ("val.beton", "test.beton")
    for name in names:
        if (root / name).is_file():
            return _noted(BetonSource(root / name))
    raise DataError(
        f"--data {root}: --loader ffcv reads .beton files, and {root} holds no {' or '.join(names)}; "
        f"write it with: {_convert_hint(root, split, names[0])}"
    )


def _convert_hint(root: Path, split: str, name: str) -> str:
    """The converter command for `root`: a CIFAR-10 or IDX folder holds both splits, so its `.beton` goes
    to a folder of its own (the data's may be read-only, as Debian's are); an image folder's beside it."""
    if is_idx_folder(root) or (root / CIFAR_TEST_FILE).exists():
        target = Path("~/data") / f"{root.name}-beton"
        return (
            f"python -m pipeline.convert --src {root} --split {split} --dst {target / name} "
            f"(both splits), then --data {target}"
        )
    return f"python -m pipeline.convert --src {root / ('train' if split == 'train' else 'val')} --dst {root / name}"


@numba.njit(cache=True)
def _mask_seed(run_seed, first_row, last_row, row):  # pragma: no cover (compiled)
    """A 32-bit seed for one sample's mask from the run's seed, its batch (first and last rows: the
    batches of a reshuffled epoch differ) and its row: reproducible from the traversal order alone."""
    h = np.uint64(run_seed) ^ np.uint64(0xCBF29CE484222325)
    for value in (np.uint64(first_row), np.uint64(last_row), np.uint64(row)):
        h = (h ^ value) * np.uint64(0x100000001B3)
        h ^= h >> np.uint64(29)
    return np.uint32(h & np.uint64(0xFFFFFFFF))


@numba.njit(cache=True)  # not fastmath (FFCV compiles its ops with it): the division must round as torch's does
def _patch_sample(image, noise, patch, num_context, batch, sample, mean255, std255, flat):  # pragma: no cover
    """Sample `sample` of an HWC uint8 batch into the flat group-major buffer, plus its permutation.

    The buffer holds B * N * C * p * p patch values (context block, then masked block) followed by
    B * N permutation entries (as float32: exact for positions below 2**24)."""
    grid = image.shape[0] // patch
    num_patches = grid * grid
    channels = image.shape[2]
    num_masked = num_patches - num_context
    patch_values = channels * patch * patch
    perm = np.argsort(noise)
    for slot in range(num_patches):
        position = perm[slot]
        flat[batch * num_patches * patch_values + sample * num_patches + slot] = np.float32(position)
        if slot < num_context:
            out_index = sample * num_context + slot
        else:
            out_index = batch * num_context + sample * num_masked + slot - num_context
        base = out_index * patch_values
        top, left = (position // grid) * patch, (position % grid) * patch
        for i in range(patch):  # read the HWC image in memory order (1.7x the channel-first order)
            for j in range(patch):
                for c in range(channels):
                    value = np.float32(image[top + i, left + j, c])
                    flat[base + (c * patch + i) * patch + j] = (value - mean255[c]) / std255[c]


def _selfie_patches_op():
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State

    class SelfiePatches(Operation):
        """HWC uint8 batch -> one float32 buffer per batch: group-major normalised patches, then the
        permutations; `split_patch_buffer` turns it into views (B * N, C, p, p) and (B, N)."""

        def __init__(self, spec: PatchSpec, seed: int) -> None:
            super().__init__()
            self.spec = spec
            self.seed = seed

        def generate_code(self):
            spec = self.spec
            my_range = Compiler.get_iterator()
            mean255 = scaled_stats(tuple(spec.mean), torch.device("cpu")).numpy().copy()
            std255 = scaled_stats(tuple(spec.std), torch.device("cpu")).numpy().copy()
            patch, num_context, run_seed = spec.patch_size, spec.num_context, self.seed

            def selfie_patches(images, dst, indices):
                batch = images.shape[0]
                num_patches = (images.shape[1] // patch) ** 2
                flat = dst.reshape(-1)
                for sample in my_range(batch):
                    # Reseeded per sample, in the thread that draws: the masks depend on the order only.
                    np.random.seed(_mask_seed(run_seed, indices[0], indices[batch - 1], indices[sample]))
                    noise = np.random.random(num_patches)
                    _patch_sample(images[sample], noise, patch, num_context, batch, sample, mean255, std255, flat)
                return dst[:batch]

            selfie_patches.is_parallel = True
            selfie_patches.with_indices = True
            return selfie_patches

        def declare_state_and_memory(self, previous_state: State):
            from dataclasses import replace

            height, width, channels = previous_state.shape
            if height != width or height % self.spec.patch_size:
                raise DataError(f"images of {height}x{width} do not cut into {self.spec.patch_size}px patches")
            num_patches = (height // self.spec.patch_size) ** 2
            shape = (num_patches * channels * self.spec.patch_size**2 + num_patches,)
            state = replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("float32"))
            return state, AllocationQuery(shape, np.dtype("float32"))

    return SelfiePatches


def split_patch_buffer(buffer: torch.Tensor, spec: PatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N * C * p * p + N) float32 from `SelfiePatches` -> patches (B * N, C, p, p) view, perm (B, N) int64."""
    batch = buffer.shape[0]
    flat = buffer.reshape(-1)
    patch_values = batch * (buffer.shape[1] // (3 * spec.patch_size**2 + 1)) * 3 * spec.patch_size**2
    patches = flat[:patch_values].view(-1, 3, spec.patch_size, spec.patch_size)
    perm = flat[patch_values:].view(batch, -1).long()
    return patches, perm


def image_ops(
    source: BetonSource,
    transform: ImageTransform,
    device: torch.device,
    patch_spec: PatchSpec | None,
    mask_seed: int = 0,
) -> list:
    """The ordered op list of the image field (see the module docstring)."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor, ToTorchImage

    image_size, augment = transform.image_size, transform.augment
    size = (image_size, image_size)
    if augment == "random_resized_crop":
        ops = [RandomResizedCropRGBImageDecoder(size, scale=tuple(transform.crop_scale)), RandomHorizontalFlip()]
    elif augment == "center_crop" and source.uniform_size != size:
        ops = [_resized_crop_decoder(_eval_crop(image_size))(size)]
    else:
        ops = [SimpleRGBImageDecoder() if source.uniform_size == size else _resized_crop_decoder(_whole_crop)(size)]
        if augment == "pad_crop_flip":
            ops += [RandomHorizontalFlip(), RandomTranslate(padding=transform.pad)]
    if patch_spec is not None:
        return [*ops, _selfie_patches_op()(patch_spec, mask_seed), ToTensor()]
    ops += [ToTensor(), ToTorchImage(channels_last=False)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type == "cuda" else [])


def _whole_crop(height, width, scale, ratio):  # pragma: no cover (compiled by FFCV)
    """The whole image (resized to S x S after), as the other backends do for images not already S x S."""
    return np.uint32(0), np.uint32(0), height, width


def _eval_crop(image_size: int):
    """Evaluation's crop, as the other backends take it: an S x S image whole, any other the center square
    of 0.875 of its shorter side (then resized to S: the same as resizing to S / 0.875 and cropping S)."""

    def eval_crop(height, width, scale, ratio):  # pragma: no cover (compiled by FFCV)
        if height == image_size and width == image_size:
            return np.uint32(0), np.uint32(0), height, width
        side = np.uint32(EVAL_CROP_FRACTION * min(height, width))
        return (height - side) // np.uint32(2), (width - side) // np.uint32(2), side, side

    return eval_crop


def _resized_crop_decoder(crop):
    """An FFCV decoder that decodes, takes `crop(height, width, scale, ratio) -> (top, left, h, w)` and
    resizes it to the output size, in one compiled pass."""
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    class CropRGBDecoder(ResizedCropRGBImageDecoder):
        def __init__(self, output_size) -> None:
            super().__init__(output_size)
            self.scale = None
            self.ratio = None

        @property
        def get_crop_generator(self):
            return crop

    return CropRGBDecoder


def _beton_rows(source: BetonSource | SubsetSource) -> tuple[BetonSource, np.ndarray]:
    if isinstance(source, SubsetSource) and isinstance(source.source, BetonSource):
        return source.source, source.indices
    if isinstance(source, BetonSource):
        return source, np.arange(len(source))
    raise DataError(
        f"--loader ffcv reads .beton files, not {getattr(source, 'root', source)}; "
        "write one with python -m pipeline.convert"
    )


def _view_of_row(beton: BetonSource, rows: np.ndarray) -> np.ndarray:
    """Position in the loader's source (a subset view or the whole file) of each .beton row; -1 outside."""
    view = np.full(len(beton), -1, dtype=np.int64)
    view[rows] = np.arange(len(rows))
    return view


def _order_class(positions_of_pass, quasi_random: bool):
    """A TraversalOrder class whose k-th pass reads `positions_of_pass(k, inner_order)` (beton rows)."""
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder

    class PlannedOrder(TraversalOrder):
        def __init__(self, loader) -> None:
            super().__init__(loader)
            self.inner = QuasiRandom(loader) if quasi_random else None

        def sample_order(self, epoch: int) -> Sequence[int]:
            return positions_of_pass(epoch, self.inner)

    return PlannedOrder


def ffcv_loader(request: TrainRequest) -> Iterator[Batch]:
    """Endless training batches from a .beton; same contract and order as `pipeline.data.torch_loader`.

    With `patch_spec` (CPU only), batches carry `patches` and `perm` made in the pipeline, and `images`
    is None. `fail_on_corrupt` has nothing to do: conversion already left unreadable images out.
    """
    from ffcv.loader import Loader, OrderOption

    r = request
    beton, rows = _beton_rows(r.source)
    _refuse_unsupported(r)
    sampler = ShardedBatchSampler(len(r.source), r.batch_size, r.rank, r.world_size, r.seed, r.start_step)
    threads = torch.get_num_threads()
    image = image_ops(beton, r.transform, r.device, r.patch_spec, derive_seed(r.seed, MASK_STREAM, r.rank))
    loader = Loader(
        str(beton.path),
        batch_size=r.batch_size,
        num_workers=max(1, r.workers),
        os_cache=r.os_cache and not r.quasi_random,
        order=OrderOption.SEQUENTIAL,
        indices=rows,
        pipelines={"image": image, "label": _int_ops(), "index": _int_ops()},
        drop_last=True,
        batches_ahead=BATCHES_AHEAD,
        seed=derive_seed(r.seed, EPOCH_ORDER_STREAM) % 2**31,  # quasi-random order: the run's, not a random draw
    )
    loader.traversal_order = _order_class(_pass_positions(sampler, rows, r.start_step), r.quasi_random)(loader)
    torch.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count; keep the run's
    return _batches(loader, beton, _view_of_row(beton, rows), r.device, r.patch_spec, threads)


def _refuse_unsupported(request: TrainRequest) -> None:
    if request.patch_spec is not None and request.device.type != "cpu":
        raise ValueError("the in-pipeline patch op is the CPU path; on a GPU the device patch op runs in the step")
    if request.quasi_random and request.world_size > 1:
        raise DataError("--data.ffcv_quasi_random=true works in one process only (FFCV lacks it distributed)")


def _pass_positions(sampler: ShardedBatchSampler, rows: np.ndarray, start_step: int):
    """k -> the .beton rows of this rank's k-th pass from `start_step` (the first pass starts mid-epoch):
    the sampler's order, or FFCV's quasi-random order (`inner`) where that is asked for."""
    steps_per_epoch, batch_size = sampler.steps_per_epoch, sampler.batch_size
    first_epoch, skip = divmod(start_step, steps_per_epoch)

    def positions_of_pass(k: int, inner) -> np.ndarray:
        epoch = first_epoch + k
        if inner is not None:
            order = np.asarray(inner.sample_order(epoch), dtype=np.int64)[: steps_per_epoch * batch_size]
        else:
            order = rows[sampler.rank_batches(epoch).reshape(-1)]
        return order[(skip if k == 0 else 0) * batch_size :].astype(np.uint64)

    return positions_of_pass


def _int_ops() -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


def _batches(
    loader, beton: BetonSource, view_of_row: np.ndarray, device, patch_spec, threads: int, endless: bool = True
) -> Iterator[Batch]:
    """Batches of consecutive passes as one stream (or of one pass). Identities come from the decoded
    `index` field, so they are what FFCV read, not what was asked of it."""
    while True:
        epoch = iter(loader)
        try:
            yield from _converted(epoch, beton, view_of_row, device, patch_spec, threads)
        finally:
            _stop_epoch(epoch)
        if not endless:
            return


def _stop_epoch(epoch) -> None:
    """Stops FFCV's loading thread of one pass and waits for it, then frees the pass's memory.

    FFCV's own `close()` only asks: its daemon thread goes on decoding (numba code on TBB's pool) until its
    queue is full, and a process that exits meanwhile aborts in TBB ("terminate called without an active
    exception", 7 in 45 exits after one batch, none in 30 with this). A thread that ended its pass blocks
    on a full queue with no deadline, so one batch is taken off to let it end.
    """
    epoch.terminate_event.set()  # what close() sets: the thread returns at its next full-queue timeout
    epoch.join(timeout=1.0)
    while epoch.is_alive():
        try:
            epoch.output_queue.get_nowait()
        except queue.Empty:
            pass
        epoch.join(timeout=1.0)
    epoch.close()  # only now: with os_cache=False it stops the page readers the thread waits on


def _converted(epoch, beton: BetonSource, view_of_row: np.ndarray, device, patch_spec, threads: int) -> Iterator[Batch]:
    """FFCV's outputs live in buffers it refills a few batches later; each batch is copied out (a
    memcpy, small beside decoding) so that a batch stays valid for as long as it is held, as with
    every other backend."""
    for images, labels, source_index in epoch:
        images, labels = images.clone(), labels.clone()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        rows = np.searchsorted(beton.source_indices, source_index.numpy())  # rows are in source order
        indices = torch.from_numpy(view_of_row[rows])
        labels = labels.to(device, non_blocking=True)
        indices = indices.to(device, non_blocking=True)
        if patch_spec is None:
            yield Batch(images, labels, indices)
        else:
            patches, perm = split_patch_buffer(images, patch_spec)
            yield Batch(None, labels, indices, (), patches, perm)


def ffcv_eval_loader(request: EvalRequest) -> Iterator[Batch]:
    """Every image once over all ranks, center-cropped, in order; the sharding of `pipeline.data.eval_loader`
    (contiguous slices, a short last batch, nothing padded), so summed counts count each image once."""
    from ffcv.loader import Loader, OrderOption

    r = request
    beton, rows = _beton_rows(r.source)
    shard = rows[eval_shard(len(rows), r.rank, r.world_size)]
    if not len(shard):
        return iter(())
    threads = torch.get_num_threads()
    loader = Loader(
        str(beton.path),
        batch_size=r.batch_size,
        num_workers=max(1, r.workers),
        order=OrderOption.SEQUENTIAL,
        indices=shard,
        pipelines={
            "image": image_ops(beton, r.transform, r.device, None),
            "label": _int_ops(),
            "index": _int_ops(),
        },
        drop_last=False,
    )
    torch.set_num_threads(threads)
    return _batches(loader, beton, _view_of_row(beton, rows), r.device, None, threads, endless=False)
