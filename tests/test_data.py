import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    BatchAssembler,
    BatchSpec,
    CifarSource,
    DataError,
    FolderSource,
    ShardedBatchSampler,
    check_readable,
    open_source,
    torch_loader,
)
from pipeline.demo import DEMO_IMAGE_SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS, demo_dataset
from pipeline.loader_request import TrainRequest


def make_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.png"
            )
    return root


def make_cifar(root: Path, per_batch: int = 10) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_folder_source_layout_and_splits(tmp_path: Path) -> None:
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", per_class=2)
    train, test = open_source(tmp_path, "train"), open_source(tmp_path, "test")
    assert isinstance(train, FolderSource) and len(train) == 12 and len(test) == 6
    assert train.classes == ["class0", "class1", "class2"]
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    bare = open_source(make_folder(tmp_path / "bare"), "train")
    assert len(bare) == 12
    with pytest.raises(DataError, match="no test split"):
        open_source(tmp_path / "bare", "test")


def test_cifar_source_reads_python_batches(tmp_path: Path) -> None:
    root = make_cifar(tmp_path / "cifar")
    train, test = open_source(root, "train"), open_source(root, "test")
    assert isinstance(train, CifarSource) and len(train) == 50 and len(test) == 10
    with open(root / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # Row 3 of batch 2: 1024 red, 1024 green, 1024 blue values, row-major.
    expected = raw[b"data"][3].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(train.load(13)), expected)
    assert train.labels[13] == raw[b"labels"][3]
    (root / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        open_source(root, "train")


def test_bad_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        open_source(tmp_path / "empty")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.jpg").write_text("not an image")
    source = open_source(tmp_path / "junk")
    with pytest.raises(DataError, match="no readable image"):
        check_readable(source)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_are_disjoint_and_cover_an_epoch(world: int) -> None:
    samplers = [ShardedBatchSampler(50, 4, rank, world, seed=1) for rank in range(world)]
    per_epoch = samplers[0].steps_per_epoch
    assert per_epoch == 50 // (4 * world)
    streams = [iter(s) for s in samplers]
    for _epoch in range(2):
        seen = []
        for _ in range(per_epoch):
            specs = [next(stream) for stream in streams]
            assert len({s.step for s in specs}) == 1
            seen.extend(i for s in specs for i in s.indices)
        assert len(seen) == len(set(seen)) == per_epoch * 4 * world  # each image at most once per epoch


def test_sampler_resumes_where_it_left_off() -> None:
    full = iter(ShardedBatchSampler(30, 4, 1, 2, seed=7))
    specs = [next(full) for _ in range(9)]
    resumed = iter(ShardedBatchSampler(30, 4, 1, 2, seed=7, start_step=5))
    assert [next(resumed) for _ in range(4)] == specs[5:]
    other_epoch_order = ShardedBatchSampler(30, 4, 0, 1, seed=7)
    assert not torch.equal(other_epoch_order.epoch_order(0), other_epoch_order.epoch_order(1))


def test_sampler_rejects_a_data_set_smaller_than_a_batch() -> None:
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedBatchSampler(10, 8, 0, 2, seed=0)


@pytest.mark.parametrize("augment", ["pad_crop_flip", "random_resized_crop", "none"])
def test_batch_contract(tmp_path: Path, augment: str) -> None:
    source = open_source(make_folder(tmp_path / "data"))
    batch = BatchAssembler(source, 32, augment)[BatchSpec(0, (0, 5, 11), seed=3)]
    assert batch.images.shape == (3, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous()
    assert batch.labels.tolist() == [0, 1, 2] and batch.indices.tolist() == [0, 5, 11]
    again = BatchAssembler(source, 32, augment)[BatchSpec(0, (0, 5, 11), seed=3)]
    assert torch.equal(batch.images, again.images)  # augmentation depends on the spec's seed only


def test_corrupt_images_are_skipped_and_named_or_fatal(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    bad = root / "class1" / "1.png"
    bad.write_bytes(b"garbage")
    source = open_source(root)
    batch = BatchAssembler(source, 32, "none")[BatchSpec(0, (4, 5, 6), seed=0)]
    assert batch.indices.tolist() == [4, 6, 6] and batch.images.shape[0] == 3
    assert len(batch.skipped) == 1 and str(bad) in batch.skipped[0]
    with pytest.raises(DataError, match="1.png"):
        BatchAssembler(source, 32, "none", fail_on_corrupt=True)[BatchSpec(0, (5,), seed=0)]


def test_torch_loader_with_workers_matches_in_process(tmp_path: Path) -> None:
    source = open_source(make_folder(tmp_path / "data", per_class=8))
    request = TrainRequest(source=source, image_size=32, augment="pad_crop_flip", batch_size=4, seed=11, world_size=2)
    a = [b for _, b in zip(range(5), torch_loader(replace(request, workers=0)), strict=False)]
    b = [b for _, b in zip(range(5), torch_loader(replace(request, workers=2)), strict=False)]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.indices, y.indices)


def test_demo_data_is_deterministic_and_labelled(tmp_path: Path, demo_root: Path) -> None:
    train, val = open_source(demo_root, "train"), open_source(demo_root, "test")
    assert len(train.classes) == 10
    assert len(train) == 10 * TRAIN_PER_CLASS and len(val) == 10 * VAL_PER_CLASS
    assert train.load(0).size == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    again = demo_dataset(tmp_path / "other-cache")
    for index in (0, 777, len(train) - 1):
        name = Path(train.files[index]).relative_to(demo_root)
        assert (again / name).read_bytes() == (demo_root / name).read_bytes()
    assert demo_dataset(tmp_path / "other-cache") == again  # cached, not rebuilt


class NumbaThreads(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        import numba

        return numba.get_num_threads()


def test_a_loader_worker_runs_one_thread_in_every_pool_it_has() -> None:
    """Workers beside the training process's threads must not each bring a full thread pool (issue 17)."""
    import numba

    from pipeline.data import one_thread_per_worker

    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # what a worker inherits: every core
    loader = torch.utils.data.DataLoader(NumbaThreads(), batch_size=None, num_workers=1,
                                         worker_init_fn=one_thread_per_worker)  # fmt: skip
    assert list(loader) == [1]


class _Recorder:
    """A stand-in for the `torch.cuda` namespace that writes down every stream, event and wait in order."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        recorder = self

        class Event:
            count = 0

            def __init__(self) -> None:
                Event.count += 1
                self.id = Event.count

            def record(self, stream: str) -> None:
                recorder.log.append(("record", self.id, stream))

        class Stream:
            def __init__(self, name: str) -> None:
                self.name = name

            def wait_event(self, event: Event) -> None:
                recorder.log.append(("wait_event", event.id, self.name))

            def wait_stream(self, other) -> None:
                recorder.log.append(("wait_stream", getattr(other, "name", other), self.name))

        self.Event, self.main = Event, Stream("main")

    def stream(self, side: str):
        from contextlib import contextmanager

        @contextmanager
        def entered():
            self.log.append(("on", side))
            yield
            self.log.append(("off", side))

        return entered()

    def current_stream(self):
        return self.main


class _Tensor:
    def __init__(self, k: int) -> None:
        self.k = k

    def record_stream(self, stream) -> None:
        pass


def test_each_prefetched_batch_waits_for_its_own_copy_only() -> None:
    """CUDA's side-stream prefetch, its ordering under a stand-in: batch k + 1's copy is issued before
    batch k is used (overlap), and the consumer waits on the event recorded after batch k's own copy,
    never on the whole side stream (which would wait for batch k + 1's copy too)."""
    from pipeline.data import Batch, side_stream_prefetch

    cuda = _Recorder()

    def copy(batch):
        cuda.log.append(("copy", batch.labels.k))
        return batch

    host = [Batch(_Tensor(k), _Tensor(k), _Tensor(k)) for k in range(4)]
    for batch in side_stream_prefetch(iter(host), copy, "side", cuda):
        cuda.log.append(("use", batch.labels.k))
    log = cuda.log
    assert [entry[1] for entry in log if entry[0] == "use"] == [0, 1, 2, 3]
    assert not [entry for entry in log if entry[0] == "wait_stream"]
    for k in range(4):
        copied, used = log.index(("copy", k)), log.index(("use", k))
        event = next(entry[1] for entry in log[copied:] if entry[0] == "record")
        assert ("on", "side") in log[:copied] and log[copied + 1] == ("record", event, "side")
        waits = [entry for entry in log[:used] if entry[0] == "wait_event" and entry[1] == event]
        assert waits == [("wait_event", event, "main")]  # on the consumer's stream, once
        last_wait = [entry for entry in log[:used] if entry[0] == "wait_event"][-1]
        assert last_wait[1] == event  # its own copy's event, not a later one
        if k < 3:
            assert log.index(("copy", k + 1)) < used  # the next copy is already under way


class Marker:
    """Unpickling it creates the file `path`: what a crafted data file would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_read(tmp_path: Path, protocol: int) -> None:
    """The real files are protocol 2 from numpy 1 (numpy.core.multiarray._reconstruct); numpy 2 writes
    numpy._core, protocol 5 its buffer form."""
    root = tmp_path / "c10"
    root.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [1, 2, 3, 4], b"data": data, b"filenames": [b"a"] * 4}
    raw = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as numpy 1 wrote it
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(raw)
    source = open_source(root)
    assert len(source) == 20 and np.array_equal(source.images[5], data[1].reshape(3, 32, 32).transpose(1, 2, 0))


def crafted_cifar(root: Path, marker: Path) -> Path:
    make_cifar(root)
    batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10, b"extra": Marker(marker)}
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return root


def test_a_crafted_cifar_batch_runs_nothing_in_pretraining_or_the_converter(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from tests.conftest import ROOT, TINY, run_script
    from train.engine.cli import run_cli
    from train.stages import pretraining as pretrain

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    root = crafted_cifar(tmp_path / "c10", marker)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(pretrain.main, [*TINY, "--data", str(root), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and f"{root / 'data_batch_1'}: refused" in error[0], error
    converted = run_script(["-m", "pipeline.convert", "--src", str(root), "--dst", str(tmp_path / "c.beton")], ROOT)
    assert converted.returncode == 2 and f"{root / 'data_batch_1'}: refused" in converted.stderr, converted.stderr
    assert len(converted.stderr.strip().splitlines()) == 1, converted.stderr
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "c.beton").exists()


def test_a_fifo_named_like_an_image_is_left_out_and_named(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "data", classes=2, per_class=3)
    fifo = root / "class0" / "0-fifo.png"  # sorted first: the file a probe would open first
    os.mkfifo(fifo)
    source = open_source(root)
    assert len(source) == 6 and str(fifo) not in source.files
    assert f"note: {fifo}: not a regular file" in capsys.readouterr().out
    check_readable(source)  # returns: nothing opens the FIFO


def test_images_smaller_than_the_crop_are_warned_about(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "data", classes=2, per_class=2, size=1)
    check_readable(open_source(root), crop=32)
    assert "is 7x1 px, smaller than the 32 px training crop" in capsys.readouterr().out
    check_readable(open_source(make_folder(tmp_path / "big", classes=2, per_class=2, size=40)), crop=32)
    assert "smaller than" not in capsys.readouterr().out
