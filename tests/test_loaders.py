"""Every loader backend against the same contract: shapes, identities, sharding, evaluation."""

import importlib
import inspect
import subprocess
import sys
import threading
import typing
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment import PAD_MODES
from pipeline.beton_writer import ConvertOptions, convert
from pipeline.data import Batch, DataError, ShardedBatchSampler, open_source
from pipeline.loader_request import OPTIONAL_FIELDS, EvalRequest, TrainRequest, unhonoured
from pipeline.loaders import LOADERS, LoaderBackend
from pipeline.patches import IMAGENET_MEAN, IMAGENET_STD, PatchSpec, patchify_and_mask
from pipeline.subsets import SubsetSource
from tests.conftest import HANG_GUARD_S, ROOT
from tests.test_data import make_cifar, make_folder

BACKENDS = sorted(LOADERS)
BATCH, WORLD, SEED = 4, 2, 5


def square_folder(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(2)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 training images of 32 x 32 in 3 classes (+ 9 test images), as a folder and as .beton files."""
    root = tmp_path_factory.mktemp("loaders")
    square_folder(root / "data" / "train", classes=3, per_class=10)
    square_folder(root / "data" / "val", classes=3, per_class=3)
    (root / "betons").mkdir()
    for split, name in (("train", "train"), ("test", "val")) if LOADERS["ffcv"].installed() else ():
        convert(root / "data", root / "betons" / f"{name}.beton", split, ConvertOptions(write_mode="raw", workers=1))
    return root


def data_of(image_set: Path, backend: str, split: str = "train"):
    return LOADERS[backend].open(image_set / ("betons" if backend == "ffcv" else "data"), split)


def stream(backend: str, source, steps: int, augment: str = "none", rank: int = 0, world: int = WORLD, **kwargs):
    kwargs.setdefault("workers", 1)
    request = TrainRequest(
        source=source,
        image_size=32,
        augment=augment,
        batch_size=BATCH,
        seed=SEED,
        rank=rank,
        world_size=world,
        **kwargs,
    )
    loader = LOADERS[backend].train(request)
    batches = list(islice(loader, steps))
    loader.close()
    return batches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", ["pad_crop_flip", "random_resized_crop", "none"])
def test_batch_contract(image_set: Path, backend: str, augment: str) -> None:
    for batch in stream(backend, data_of(image_set, backend), 4, augment):
        assert batch.images.shape == (BATCH, 3, 32, 32) and batch.images.dtype == torch.uint8
        assert batch.images.is_contiguous()
        assert batch.labels.dtype == batch.indices.dtype == torch.int64
        assert batch.labels.shape == batch.indices.shape == (BATCH,)
        assert batch.patches is None and batch.perm is None


@pytest.mark.needs_loader("ffcv")
@pytest.mark.needs_loader("dali")
def test_all_backends_read_the_same_images_at_every_step(image_set: Path) -> None:
    steps = 3 * ShardedBatchSampler(30, BATCH, 0, WORLD, SEED).steps_per_epoch  # three epochs
    for rank in range(WORLD):
        runs = {b: stream(b, data_of(image_set, b), steps, "none", rank) for b in BACKENDS}
        for step, batches in enumerate(zip(*runs.values(), strict=True)):
            reference = batches[0]
            for backend, batch in zip(runs, batches, strict=True):
                assert torch.equal(batch.indices, reference.indices), (backend, rank, step)
                assert torch.equal(batch.labels, reference.labels), (backend, rank, step)
                # Lossless PNG and raw .beton pixels, no augmentation: the images themselves agree.
                assert torch.equal(batch.images, reference.images), (backend, rank, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_epoch_reads_every_image_once_over_disjoint_rank_shards(image_set: Path, backend: str) -> None:
    source = data_of(image_set, backend)
    per_epoch = ShardedBatchSampler(len(source), BATCH, 0, WORLD, SEED).steps_per_epoch  # 3: 24 of 30 images
    shards = [stream(backend, source, 2 * per_epoch, "pad_crop_flip", rank) for rank in range(WORLD)]
    for epoch in range(2):
        seen = [
            torch.cat([b.indices for b in shard[epoch * per_epoch : (epoch + 1) * per_epoch]]).tolist()
            for shard in shards
        ]
        assert not set(seen[0]) & set(seen[1])
        every = seen[0] + seen[1]
        assert len(every) == len(set(every)) == per_epoch * BATCH * WORLD
        labels = torch.cat([b.labels for shard in shards for b in shard[epoch * per_epoch : (epoch + 1) * per_epoch]])
        assert labels.tolist() == [int(source.labels[i]) for i in every]
    first = [torch.cat([b.indices for b in s[:per_epoch]]) for s in shards]
    second = [torch.cat([b.indices for b in s[per_epoch:]]) for s in shards]
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # reshuffled per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_reads_the_images_an_uninterrupted_run_would(image_set: Path, backend: str) -> None:
    source = data_of(image_set, backend)
    straight = stream(backend, source, 8, "none", rank=1)
    resume = {"rank": 1, "world_size": WORLD, "start_step": 5, "workers": 1}
    request = TrainRequest(source=source, image_size=32, augment="none", batch_size=BATCH, seed=SEED, **resume)
    loader = LOADERS[backend].train(request)
    resumed = list(islice(loader, 3))
    for a, b in zip(straight[5:], resumed, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labeled_subsets_stream_their_own_positions(image_set: Path, backend: str) -> None:
    base = data_of(image_set, backend)
    subset = SubsetSource(base, np.array([1, 4, 7, 12, 15, 21, 22, 29]))
    for batch in stream(backend, subset, 4, "none", world=1):
        assert batch.indices.max() < len(subset)
        assert batch.labels.tolist() == [int(subset.labels[i]) for i in batch.indices]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_evaluation_counts_every_image_once(image_set: Path, backend: str, world: int) -> None:
    source = data_of(image_set, backend, "test")
    reference = data_of(image_set, "torch", "test")
    seen = []
    for rank in range(world):
        request = EvalRequest(source=source, image_size=32, batch_size=2, rank=rank, world_size=world, workers=1)
        for batch in LOADERS[backend].evaluate(request):
            assert batch.images.shape[1:] == (3, 32, 32) and len(batch.images) <= 2
            seen += batch.indices.tolist()
            for image, index in zip(batch.images, batch.indices, strict=True):
                assert torch.equal(image, torch.from_numpy(np.asarray(reference.load(int(index)))).permute(2, 0, 1))
    assert seen == list(range(9))


@pytest.mark.needs_loader("dali")
def test_dali_evaluation_leaves_an_unreadable_image_out(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "val", classes=2, per_class=3, size=32)
    (root / "class1" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    source = open_source(root)
    batches = list(LOADERS["dali"].evaluate(EvalRequest(source=source, image_size=32, batch_size=4, workers=1)))
    assert [i for b in batches for i in b.indices.tolist()] == [0, 1, 2, 3, 5]
    assert any("1.png: truncated PNG" in entry for b in batches for entry in b.skipped)


@pytest.mark.needs_loader("dali")
def test_dali_training_replaces_an_unreadable_image_and_names_it(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", classes=2, per_class=4, size=32)
    (root / "class0" / "2.png").write_bytes(b"")
    source = open_source(root)
    batches = stream("dali", source, 4, "none", world=1)
    assert 2 not in torch.cat([b.indices for b in batches]).tolist()
    assert any("2.png: empty file" in entry for b in batches for entry in b.skipped)
    with pytest.raises(DataError, match="2.png: empty file"):
        stream("dali", source, 4, "none", world=1, fail_on_corrupt=True)


@pytest.mark.needs_loader("dali")
def test_dali_reads_cifar_through_its_external_source(tmp_path: Path) -> None:
    cifar = open_source(make_cifar(tmp_path / "cifar", per_batch=4), "train")
    for backend_batch, torch_batch in zip(
        stream("dali", cifar, 3, world=1), stream("torch", cifar, 3, world=1), strict=True
    ):
        assert torch.equal(backend_batch.indices, torch_batch.indices)
        assert torch.equal(backend_batch.images, torch_batch.images)


@pytest.mark.needs_loader("ffcv")
@pytest.mark.parametrize("workers", [1, 2])  # 2: the parallel (prange) compilation of the op
def test_ffcv_pipeline_patch_op_equals_the_reference(image_set: Path, workers: int) -> None:
    spec = PatchSpec(8, 5, IMAGENET_MEAN, IMAGENET_STD)
    source = data_of(image_set, "ffcv")
    patched = stream("ffcv", source, 4, "none", world=1, patch_spec=spec, workers=workers)
    plain = stream("ffcv", source, 4, "none", world=1, workers=workers)
    for with_patches, images in zip(patched, plain, strict=True):
        assert with_patches.images is None and torch.equal(with_patches.indices, images.indices)
        assert with_patches.patches.shape == (BATCH * 16, 3, 8, 8) and with_patches.perm.shape == (BATCH, 16)
        assert all(sorted(row) == list(range(16)) for row in with_patches.perm.tolist())
        expected = patchify_and_mask(images.images, with_patches.perm, 8, 5)
        assert torch.equal(with_patches.patches.view(torch.int32), expected.view(torch.int32))
    assert not torch.equal(patched[0].perm, patched[1].perm)


def test_split_patch_buffer_layout() -> None:
    from pipeline.ffcv_loader import split_patch_buffer

    spec = PatchSpec(2, 1, IMAGENET_MEAN, IMAGENET_STD)
    buffer = torch.arange(2 * (4 * 3 * 4 + 4), dtype=torch.float32).view(2, -1)
    patches, perm = split_patch_buffer(buffer, spec)
    assert patches.shape == (8, 3, 2, 2) and perm.tolist() == [[96, 97, 98, 99], [100, 101, 102, 103]]
    assert patches.data_ptr() == buffer.data_ptr()  # a view: no copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_of_another_size_are_resized_whole(tmp_path: Path, backend: str) -> None:
    root = tmp_path / "data" / "train"
    ramp = np.linspace(0, 255, 64)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):  # 40 x 64 horizontal gradients: a center crop would lose both ends
            image = np.broadcast_to(ramp[None, :, None] * (0.5 + 0.1 * i), (40, 64, 3))
            Image.fromarray(image.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    (tmp_path / "betons").mkdir()
    convert(root, tmp_path / "betons" / "train.beton", options=ConvertOptions(write_mode="raw", workers=1))
    source = LOADERS[backend].open(tmp_path / ("betons" if backend == "ffcv" else "data"), "train")
    expected = open_source(root)
    for batch in stream(backend, source, 2, "none", world=1):
        for image, index in zip(batch.images, batch.indices, strict=True):
            whole = np.asarray(expected.load(int(index)).resize((32, 32), Image.BILINEAR), dtype=np.float64)
            assert np.abs(image.permute(1, 2, 0).numpy() - whole).max() <= 4  # interpolation differences only


@pytest.mark.needs_loader("ffcv")
@pytest.mark.needs_loader("dali")
def test_backends_refuse_data_they_cannot_read(image_set: Path) -> None:
    from pipeline.ffcv_loader import BetonSource

    with pytest.raises(DataError, match="--loader ffcv reads .beton files.*python -m pipeline.convert"):
        LOADERS["ffcv"].open(image_set / "data", "train")
    betons = LOADERS["ffcv"].open(image_set / "betons", "train")
    assert isinstance(betons, BetonSource)
    with pytest.raises(DataError, match="--loader dali reads image folders"):
        stream("dali", betons, 1)
    with pytest.raises(DataError, match="--loader ffcv reads .beton files"):
        stream("ffcv", open_source(image_set / "data"), 1)
    with pytest.raises(DataError, match="one process only"):
        stream("ffcv", betons, 1, quasi_random=True)
    with pytest.raises(DataError, match="a single .beton has no test split"):
        LOADERS["ffcv"].open(image_set / "betons" / "train.beton", "test")


@pytest.mark.needs_loader("ffcv")
@pytest.mark.parametrize("workers", [1, 2])  # 2: FFCV compiles the op's loop as numba's parallel prange
def test_ffcv_pipeline_masks_are_reproducible_and_resume(image_set: Path, workers: int) -> None:
    spec = PatchSpec(8, 5, IMAGENET_MEAN, IMAGENET_STD)
    source = data_of(image_set, "ffcv")
    one = stream("ffcv", source, 6, "none", world=1, patch_spec=spec, workers=workers)
    two = stream("ffcv", source, 6, "none", world=1, patch_spec=spec, workers=workers)
    resume = {"start_step": 4, "workers": workers, "patch_spec": spec}
    request = TrainRequest(source=source, image_size=32, augment="none", batch_size=BATCH, seed=SEED, **resume)
    loader = LOADERS["ffcv"].train(request)
    resumed = list(islice(loader, 2))
    loader.close()
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a.perm, b.perm) and torch.equal(a.patches, b.patches)
    for a, b in zip(one[4:], resumed, strict=True):
        assert torch.equal(a.perm, b.perm) and torch.equal(a.patches, b.patches)
    assert len({tuple(b.perm[0].tolist()) for b in one}) == len(one)  # masks vary from batch to batch


@pytest.mark.needs_loader("dali")
def test_dali_names_a_file_corrupt_inside(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", classes=2, per_class=4, size=32)
    bad = root / "class1" / "0.png"
    data = bytearray(bad.read_bytes())
    data[60:400] = bytes(340)  # valid signature and IEND, garbage pixel data
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"DALI could not decode .*class1/0.png"):
        stream("dali", open_source(root), 4, "none", world=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_crops_alike_on_mixed_sizes(tmp_path: Path, backend: str) -> None:
    """S x S images pass whole, others lose their border the same way in every backend."""
    root = tmp_path / "data" / "val"
    ramp = np.linspace(0, 255, 64)
    for c, (height, width) in enumerate([(32, 32), (32, 48), (40, 64)]):
        (root / f"c{c}").mkdir(parents=True)
        image = np.broadcast_to(ramp[None, :width, None] * np.ones((height, 1, 3)), (height, width, 3))
        Image.fromarray(image.astype(np.uint8)).save(root / f"c{c}" / "0.png")
    (tmp_path / "betons").mkdir()
    convert(tmp_path / "data", tmp_path / "betons" / "val.beton", "test", ConvertOptions(write_mode="raw", workers=1))
    source = LOADERS[backend].open(tmp_path / ("betons" if backend == "ffcv" else "data"), "test")
    plain = EvalRequest(source=open_source(tmp_path / "data", "test"), image_size=32, batch_size=3, workers=0)
    reference = [b.images for b in LOADERS["torch"].evaluate(plain)]
    request = EvalRequest(source=source, image_size=32, batch_size=3, workers=1)
    got = [b.images for b in LOADERS[backend].evaluate(request)]
    assert torch.equal(got[0][0], reference[0][0])  # the 32 x 32 image, untouched
    assert (got[0].float() - reference[0].float()).abs().max() <= 8  # interpolation differences only


@pytest.mark.needs_loader("ffcv")
def test_using_ffcv_keeps_the_runs_torch_thread_count(image_set: Path) -> None:
    """Importing ffcv sets torch's intra-op threads to 1; a CPU run through the ffcv backend must not lose them."""
    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from pipeline.loader_request import TrainRequest\n"
        "from pipeline.loaders import LOADERS\n"
        f"source = LOADERS['ffcv'].open({str(image_set / 'betons')!r}, 'train')\n"
        "request = TrainRequest(source=source, image_size=32, augment='none', batch_size=4, seed=0, workers=1)\n"
        "stream = LOADERS['ffcv'].train(request)\n"
        "next(stream); next(stream); stream.close()\n"
        "print('threads', torch.get_num_threads())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert "threads 2" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.needs_loader("ffcv")
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_closing_an_ffcv_stream_early_leaves_no_loading_thread(image_set: Path, kind: str) -> None:
    """FFCV's thread goes on decoding after its own close(), and a process that exits meanwhile can abort
    in numba's TBB pool. eval: 4 batches of 30 images, one read, so the thread ends its pass blocked on a
    full queue."""
    from ffcv.loader.epoch_iterator import EpochIterator

    source = data_of(image_set, "ffcv")
    if kind == "train":
        request = TrainRequest(source=source, image_size=32, augment="none", batch_size=BATCH, seed=SEED, workers=1)
        batches = LOADERS["ffcv"].train(request)
    else:
        batches = LOADERS["ffcv"].evaluate(EvalRequest(source=source, image_size=32, batch_size=8, workers=1))
    next(batches)
    batches.close()
    assert not [thread for thread in threading.enumerate() if isinstance(thread, EpochIterator) and thread.is_alive()]


def test_device_prefetch_hands_every_batch_over_in_order_on_the_device() -> None:
    """On a CPU the prefetch is a plain pass-through (tests/test_gpu.py checks the CUDA side stream)."""
    from pipeline.data import Batch, device_prefetch

    batches = [
        Batch(torch.full((2, 3, 4, 4), k, dtype=torch.uint8), torch.tensor([k, k]), torch.arange(2)) for k in range(3)
    ]
    out = list(device_prefetch(iter(batches), torch.device("cpu")))
    assert [int(b.labels[0]) for b in out] == [0, 1, 2] and all(
        torch.equal(a.images, b.images) for a, b in zip(out, batches, strict=True)
    )


# The entry points each backend's module exports, each built from one request (pipeline/loaders.py).
ENTRY_POINTS = {
    "torch": ("pipeline.data", "torch_loader", "eval_loader"),
    "dali": ("pipeline.dali_loader", "dali_loader", "dali_eval_loader"),
    "ffcv": ("pipeline.ffcv_loader", "ffcv_loader", "ffcv_eval_loader"),
}
NON_DEFAULT = {"patch_spec": PatchSpec(8, 5, IMAGENET_MEAN, IMAGENET_STD), "os_cache": False, "quasi_random": True}


def takes_one_request(function, kind: type) -> bool:
    parameters = list(inspect.signature(function).parameters)
    hints = typing.get_type_hints(function)
    return parameters == ["request"] and hints["request"] is kind and hints["return"] == Iterator[Batch]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_registered_backend_is_a_loader_backend_built_from_one_request(backend: str) -> None:
    loader = LOADERS[backend]
    assert isinstance(loader, LoaderBackend) and loader.name == backend
    assert loader.options <= set(OPTIONAL_FIELDS) and set(loader.pad_modes) <= set(PAD_MODES)
    assert takes_one_request(loader.train, TrainRequest) and takes_one_request(loader.evaluate, EvalRequest)
    assert takes_one_request(loader.train_stream, TrainRequest)
    assert takes_one_request(loader.eval_stream, EvalRequest)
    module, train, evaluate = ENTRY_POINTS[backend]
    entry = importlib.import_module(module)  # importable without the backend's package: it imports it late
    assert takes_one_request(getattr(entry, train), TrainRequest)
    assert takes_one_request(getattr(entry, evaluate), EvalRequest)


def test_something_that_is_not_a_backend_is_not_a_loader_backend() -> None:
    assert not isinstance(object(), LoaderBackend)
    assert not isinstance(SimpleNamespace(name="x", options=frozenset(), pad_modes=("zero",)), LoaderBackend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_for_what_a_backend_cannot_honour_is_refused_by_name(backend: str) -> None:
    loader = LOADERS[backend]
    plain = TrainRequest(source=SimpleNamespace(), image_size=32, augment="pad_crop_flip", batch_size=4, seed=0)
    assert unhonoured(plain, loader.options, loader.pad_modes) == []  # the defaults: what every backend does
    for name, value in NON_DEFAULT.items():
        asked = replace(plain, **{name: value})
        if name in loader.options:
            assert unhonoured(asked, loader.options, loader.pad_modes) == []
        else:  # refused before the backend reads anything (the source here is not a data set)
            with pytest.raises(ValueError, match=rf"the {backend} loader cannot honour {name}="):
                loader.train(asked)
    for mode in set(PAD_MODES) - set(loader.pad_modes):
        with pytest.raises(ValueError, match=rf"the {backend} loader cannot honour pad_mode='{mode}'"):
            loader.train(replace(plain, pad_mode=mode))
        for unpadded in (replace(plain, pad=0, pad_mode=mode), replace(plain, augment="none", pad_mode=mode)):
            assert unhonoured(unpadded, loader.options, loader.pad_modes) == []  # no pad: the mode changes nothing
