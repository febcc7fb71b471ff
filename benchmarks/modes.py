"""What `benchmarks.throughput` times: one `Bench` (the trainer's config, model, optimizer and step for a
stage and a batch size) and the registry of modes that drive it (`MODES`: the loaders' come from the
loader registry, every registered method runs in every mode).

  LOADER            end to end: files (or the .beton) -> loader -> the trainer's step (train/engine/step.py)
  synthetic         the same step on uint8 batches already on the device, a fresh one each step from a pool
                    larger than the L2 cache: the ceiling a perfect data pipeline would reach
  no-model:LOADER   the pipeline alone, up to the model's inputs (patches, views): the data side's limit
  raw-ffcv          FFCV's loader doing only decode + random resized crop on the same .beton
  naive             a per-image PIL `Dataset` in a torch `DataLoader`, then a Python loop over the batch's
                    images: the input op on one image and the model's public forward on it, the mean loss
  no-model:naive    the naive baseline's data side alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.data_sets import benchmark_data
from benchmarks.harness import DATA_STAGE, StageClock, Step
from pipeline.augment import random_resized_crop_box
from pipeline.data import Batch, open_source
from pipeline.loaders import LOADERS
from train.config import FinetuneConfig, PretrainConfig, StageConfig, load_config
from train.engine.loading import train_batches
from train.engine.session import make_accelerator
from train.engine.setup import prepare_training
from train.engine.step import EagerStep, make_step
from train.engine.task import Task
from train.methods import method_flags, stage_class
from train.methods.supervised import SupervisedTask
from train.methods.supervised import build_model as build_classifier
from train.stages import pretraining

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # benchmark name -> speed.precision
STAGES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}
SYNTHETIC_POOL_BYTES = 2 * 64 * 2**20  # fresh synthetic batches cycle through this much memory (> an L2 cache)


def build_config(args: argparse.Namespace, batch: int) -> StageConfig:
    overrides = {
        "data.require_path": False,  # the benchmark opens its own data (benchmarks/loaders.py)
        "data.image_size": args.image_size,
        "data.augment": "pad_crop_flip" if args.image_size <= 64 else "random_resized_crop",
        "data.workers": args.workers,
        "train.batch_size": batch,
        "speed.precision": PRECISIONS[args.precision],
        "speed.channels_last": args.channels_last,
        "speed.compile": args.compile,
        "speed.compile_mode": args.compile_mode,
        "speed.cuda_graph": args.cuda_graph,
        # The schedule: a short warm-up, then a horizon no benchmark reaches (the rate stays near its peak).
        "optim.warmup_steps": 10,
        "train.steps": 10**9,
    }
    if args.width is not None:  # else the config's: the demo's quarter width at <= 64 px, full at 224
        overrides["model.width"] = args.width
    if args.stage == "pretrain":
        overrides["method"] = args.method
        flagged = {key: getattr(args, key) for key, _, _ in method_flags().values()}
        overrides |= {key: value for key, value in flagged.items() if value is not None}
    else:
        overrides["finetune.arch"] = args.arch
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:  # a bare word: the string itself
            overrides[key] = value
    return load_config(stage_class(STAGES[args.stage]), "demo" if args.image_size <= 64 else "imagenet224", overrides)


def loaders_of(mode_names: list[str]) -> set[str]:
    """The loader backends these modes read through ("torch", "no-model:ffcv", "raw-ffcv", ...)."""
    return {loader for name in mode_names for loader in LOADERS if name.split(":")[-1].removeprefix("raw-") == loader}


class Bench:
    """One model, optimizer, accelerator and step shared by the modes of one batch size; each mode
    restarts from the same weights (the optimizer's momentum carries over: it changes no timing)."""

    def __init__(self, args: argparse.Namespace, batch: int) -> None:
        self.args, self.batch = args, batch
        self.config = build_config(args, batch)
        self.accelerator = make_accelerator(self.config)
        self.device = self.accelerator.device
        data = args.data if args.data != "auto" else ("demo" if args.image_size <= 64 else "jpeg")
        needs_beton = any(LOADERS[loader].reads_beton for loader in loaders_of(args.mode_list))
        self.folder, self.beton = benchmark_data(data, args.cache, args.images, build_beton=needs_beton)
        self.classes = len(open_source(self.folder).classes)
        self.task, build = self._task_and_build()
        prepared = prepare_training(self.config, self.accelerator, build, init_seed=0)
        self.net, self.model, self.optimizer = prepared.net, prepared.model, prepared.optimizer
        self.initial = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.parts = prepared.step_parts(self.task, self.config.optim.grad_clip)
        self.run_step = make_step(self.parts, self.config.speed.cuda_graph)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.last_loss: torch.Tensor | None = None  # the last training step's loss, read after the timing

    def _task_and_build(self) -> tuple[Task, Callable[[], torch.nn.Module]]:
        if self.args.stage == "finetune":
            return SupervisedTask(self.config, self.classes), partial(build_classifier, self.config, self.classes)
        method = pretraining.validate(self.config)
        return method(self.config, self.device), partial(pretraining.build_model, self.config)

    def eager_step(self) -> EagerStep:
        """The step on the plain module, eagerly (what a FLOP count can see)."""
        return EagerStep(dataclasses.replace(self.parts, model=self.net))

    def reset(self) -> None:
        with torch.no_grad():  # in place: a captured graph keeps reading the same tensors
            for name, tensor in self.net.state_dict().items():
                tensor.copy_(self.initial[name])
        self.model.train()
        self.last_loss = None

    def stream(self, loader: str) -> Iterator[Batch]:
        config = dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, loader=loader))
        backend = LOADERS[loader]
        source = backend.open(self.beton if backend.reads_beton else self.folder, "train")
        return train_batches(config, source, self.batch, 0, 0, self.accelerator, self.task.loader_patch_spec(loader))

    def step(self, batch: Batch, clock: StageClock) -> None:
        self.last_loss = self.run_step([batch], self.generator, clock.stage)[0]  # kept on the device: no sync

    def inputs_only(self, batch: Batch, clock: StageClock) -> None:
        """The data side of a step: the task's op on the loader's batch (nothing when FFCV cut the patches)."""
        if batch.patches is None:
            with clock.stage(self.task.op_stage):
                self.task.inputs(batch, self.generator)

    def synthetic_pool(self) -> list[Batch]:
        """Random uint8 batches on the device, enough of them to span more than an L2 cache."""
        size, batch = self.config.data.image_size, self.batch
        count = max(2, -(-SYNTHETIC_POOL_BYTES // (batch * 3 * size * size)))
        generator = torch.Generator().manual_seed(0)
        pool = []
        for _ in range(count):
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
            labels = torch.randint(0, self.classes, (batch,), generator=generator)
            pool.append(Batch(images.to(self.device), labels.to(self.device), torch.arange(batch, device=self.device)))
        return pool


@contextmanager
def loader_mode(bench: Bench, loader: str, model: bool) -> Iterator[Step]:
    stream = bench.stream(loader)

    def step(clock: StageClock) -> None:
        with clock.stage(DATA_STAGE):
            batch = next(stream)
        (bench.step if model else bench.inputs_only)(batch, clock)

    try:
        yield step
    finally:
        stream.close()


@contextmanager
def synthetic_mode(bench: Bench) -> Iterator[Step]:
    pool, count = bench.synthetic_pool(), [0]

    def step(clock: StageClock) -> None:
        bench.step(pool[count[0] % len(pool)], clock)
        count[0] += 1

    yield step


@contextmanager
def raw_ffcv_mode(bench: Bench) -> Iterator[Step]:
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    size, threads = bench.config.data.image_size, torch.get_num_threads()
    pipeline = [RandomResizedCropRGBImageDecoder((size, size)), ToTensor()]
    loader = Loader(
        str(bench.beton),
        batch_size=bench.batch,
        num_workers=max(1, bench.args.workers),
        order=OrderOption.RANDOM,
        seed=0,
        drop_last=True,
        pipelines={"image": pipeline, "label": None, "index": None},
    )
    stream = endless(loader)

    def step(clock: StageClock) -> None:
        with clock.stage(DATA_STAGE):
            next(stream)
        if torch.get_num_threads() != threads:  # each FFCV epoch sets torch's threads to its worker count
            torch.set_num_threads(threads)

    try:
        yield step
    finally:
        stream.close()  # stops FFCV's loading thread when the mode ends
        torch.set_num_threads(threads)


def endless(loader) -> Iterator:
    while True:
        epoch = iter(loader)
        try:
            yield from epoch
        finally:
            if hasattr(epoch, "close"):
                epoch.close()


class NaiveImages(torch.utils.data.Dataset):
    """Per-image decode and augmentation with PIL, the usual way: one sample per `__getitem__`."""

    def __init__(self, folder: Path, size: int, pad: int) -> None:
        self.source = open_source(folder)
        self.size, self.pad = size, pad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.source.load(index)
        rng = np.random.default_rng()
        if self.size > 64:
            top, left, height, width = random_resized_crop_box(image.height, image.width, rng, (0.08, 1.0))
            image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + width, top + height))
        else:
            image = image.resize((self.size, self.size))
            canvas = Image.new("RGB", (self.size + 2 * self.pad,) * 2)
            canvas.paste(image, (self.pad, self.pad))
            x, y = rng.integers(0, 2 * self.pad + 1, 2)
            image = canvas.crop((x, y, x + self.size, y + self.size))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), int(self.source.labels[index])


def naive_inputs(bench: Bench, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The task's input op on each image alone: a Python loop over the batch's samples."""
    images, labels = images.to(bench.device), labels.to(bench.device)
    one = torch.zeros(1, dtype=torch.int64, device=bench.device)
    return [
        bench.task.inputs(Batch(images[b : b + 1], labels[b : b + 1], one), bench.generator) for b in range(len(images))
    ]


def naive_update(bench: Bench, per_image: list[tuple[torch.Tensor, ...]], clock: StageClock) -> None:
    """The model's public forward on each image (its backbone on that image's inputs, then the method's
    head), the mean loss, one update."""
    with clock.stage("forward"), bench.accelerator.autocast():
        loss = torch.stack([bench.task.objective(bench.net, inputs)[0] for inputs in per_image]).mean()
    with clock.stage("backward"):
        bench.accelerator.backward(loss)  # through the fp16 scaler when there is one
    bench.last_loss = loss.detach()
    with clock.stage("optimizer"):
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)


@contextmanager
def naive_mode(bench: Bench, model: bool) -> Iterator[Step]:
    config, workers = bench.config, bench.args.workers
    dataset = NaiveImages(bench.folder, config.data.image_size, config.data.pad)
    loader = torch.utils.data.DataLoader(
        dataset, bench.batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    stream = endless(loader)

    def step(clock: StageClock) -> None:
        with clock.stage(DATA_STAGE):
            images, labels = next(stream)
        with clock.stage(bench.task.op_stage):
            per_image = naive_inputs(bench, images, labels)
        if model:
            naive_update(bench, per_image, clock)

    try:
        yield step
    finally:
        stream.close()  # the DataLoader (and its persistent workers) goes with this generator's frame


@dataclass(frozen=True)
class Mode:
    run: Callable[[Bench], AbstractContextManager[Step]]  # sets up the mode's step, tears it down after
    trains: bool  # reaches the loss (a training mode), or stops at the model's inputs (the data side)
    leaves_threads: bool  # leaves threads behind: runs after the modes that fork worker processes
    ready: Callable[[int], int] = lambda workers: 0  # workers -> batches held ready (the warm-up drains them)
    trainer_step: bool = False  # runs the trainer's own step, so one step's FLOPs give its TFLOP/s


def build_modes() -> dict[str, Mode]:
    """Every mode, the loaders' from the loader registry, in the order they run (forking modes first)."""
    naive_ready = lambda workers: 2 * max(1, workers)  # noqa: E731
    found = {
        "synthetic": Mode(synthetic_mode, True, False, trainer_step=True),
        "naive": Mode(partial(naive_mode, model=True), True, False, naive_ready),
        "no-model:naive": Mode(partial(naive_mode, model=False), False, False, naive_ready),
    }
    for name, backend in LOADERS.items():
        threads, ready = not backend.worker_processes, backend.ready_batches
        found[name] = Mode(partial(loader_mode, loader=name, model=True), True, threads, ready, trainer_step=True)
        found[f"no-model:{name}"] = Mode(partial(loader_mode, loader=name, model=False), False, threads, ready)
    found["raw-ffcv"] = Mode(raw_ffcv_mode, False, True, LOADERS["ffcv"].ready_batches)
    return dict(sorted(found.items(), key=lambda item: item[1].leaves_threads))


MODES = build_modes()
