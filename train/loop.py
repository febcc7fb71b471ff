"""The one training loop. Pretraining (a pretext method) and fine-tuning (the supervised classifier) both
run it: `start_training` builds the model, optimizer and schedule, prepares them with Accelerate and
restores a checkpoint; `fit` runs the steps with logging, checkpoints, pictures and curves; `train_step`
is one step.

Order within a step, the same for every task: the task's input op, one model call on all of its inputs,
the loss, backward, (clipping), optimizer and schedule. Per finished step: a log record when due, the
`after_step` hook (fine-tuning's test evaluation, left out of images/s), then a checkpoint when due. Every
log record of a step is written before that step's checkpoint, so a resumed run that drops the records
after its checkpoint (`continue_log`) writes each one once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.data import MASK_STREAM, Batch, derive_seed
from train.checkpoint import Checkpoints, all_rng_states, restore_training_state, training_state
from train.config import StageConfig
from train.diagnostics import plot_curves
from train.methods.base import Pictures, Task
from train.metrics import JsonlLogger, MetricWindow
from train.optim import build_schedule, build_sgd
from train.run_folder import continue_log


def _no_stage(name: str) -> AbstractContextManager:
    return nullcontext()


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    task: Task,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    grad_clip: float = 0.0,
    stage: Callable[[str], AbstractContextManager] = _no_stage,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's input op (on the device, `generator` drawing its randomness), one model call on all of
    the batch's inputs, the loss, a step. Returns detached (loss, accuracy).

    `stage(name)` wraps each stage (benchmarks.throughput times them with it)."""
    with stage(task.op_stage):
        inputs = task.inputs(batch, generator)
    with stage("forward"):
        loss, accuracy = task.objective(model, inputs)
    with stage("backward"):
        accelerator.backward(loss)
    with stage("optimizer"):
        if grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), accuracy.detach()


@dataclass
class Training:
    """One run's state between set-up and the loop."""

    accelerator: Accelerator
    model: torch.nn.Module  # prepared (possibly DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    folder: Path  # where log.jsonl, checkpoints/, pictures/ and curves.png go
    checkpoints: Checkpoints
    logger: JsonlLogger
    kind: str  # the checkpoint kind ("<method>_pretrain", "finetune")
    seed: int  # the run's seed: masks, dropout, data order
    num_images: int  # the training data's size, recorded in checkpoints
    start_step: int
    extra_state: dict[str, Any] = field(default_factory=dict)  # added to every checkpoint dict


def start_training(
    config: StageConfig,
    accelerator: Accelerator,
    folder: Path,
    build: Callable[[], torch.nn.Module],
    kind: str,
    seed: int,
    init_seed: int,
    num_images: int,
    extra_state: dict[str, Any] | None = None,
) -> Training:
    """Build (under `init_seed`: the same weights on every rank), prepare and, with --resume and a
    checkpoint in `folder`, restore; the log continues at the restored step."""
    torch.manual_seed(init_seed)
    model = build()
    optimizer = build_sgd(model, config.optim)
    scheduler = build_schedule(optimizer, config.optim, config.train.steps)
    # The loader is not prepared: it shards by global rank itself (pipeline.data) and must not be
    # re-sharded; the scheduler is not prepared so that it steps once per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(derive_seed(seed, accelerator.process_index))  # per-rank dropout
    checkpoints = Checkpoints(folder / "checkpoints", config.train.keep_checkpoints)
    start_step = 0
    if config.train.resume and checkpoints.latest() is not None:
        start_step = restore_training_state(
            checkpoints.latest(), kind, model, optimizer, scheduler, accelerator, num_images
        )
    logger = JsonlLogger(folder / "log.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        continue_log(logger.path, start_step)
    accelerator.wait_for_everyone()
    fields = (model, optimizer, scheduler, folder, checkpoints, logger, kind, seed, num_images, start_step)
    return Training(accelerator, *fields, extra_state or {})


@dataclass
class FitResult:
    last: dict[str, Any]  # the last log record ({} when no step was left to run)
    skipped_images: int  # unreadable images skipped over the run's steps


class Loop:
    """`fit`'s state while it runs; each method is one part of a step."""

    def __init__(self, training: Training, task: Task, config: StageConfig, epoch_images: int) -> None:
        self.t, self.task, self.run = training, task, config.train
        self.config, self.epoch_images = config, epoch_images
        hint = f"the newest checkpoint in {training.checkpoints.folder} is the last good state"
        self.window = MetricWindow(training.accelerator, training.logger, self.run.batch_size, hint)
        self.generator = torch.Generator(device=training.accelerator.device)
        self.last: dict[str, Any] = {}

    def step(self, step: int, batch: Batch) -> None:
        t = self.t
        step_lr = t.optimizer.param_groups[0]["lr"]
        self.generator.manual_seed(derive_seed(t.seed, MASK_STREAM, step, t.accelerator.process_index))
        loss, accuracy = train_step(
            t.model,
            batch,
            self.task,
            self.generator,
            t.optimizer,
            t.scheduler,
            t.accelerator,
            self.config.optim.grad_clip,
        )
        self.window.add(batch.skipped, loss=loss, **{self.task.metric: accuracy})
        self.step_lr = step_lr

    def log(self, done: int, progress: tqdm) -> None:
        epoch = round(done * self.run.batch_size / self.epoch_images, 4)
        self.last = self.window.flush(done, chance_acc=round(self.task.chance, 5), lr=self.step_lr, epoch=epoch)
        progress.set_postfix(loss=f"{self.last['loss']:.3f}", acc=f"{self.last[self.task.metric]:.1%}", refresh=False)

    def hook(self, after_step: Callable[[int], None], done: int) -> None:
        started = time.perf_counter()
        after_step(done)
        self.window.exclude(time.perf_counter() - started)

    def checkpoint(self, done: int, pictures: Pictures | None, title: str) -> None:
        t = self.t
        rng_states = all_rng_states(t.accelerator)
        if t.accelerator.is_main_process:
            state = training_state(
                t.kind, t.model, t.optimizer, t.scheduler, t.accelerator, done, self.config, rng_states, t.num_images
            )
            t.checkpoints.save(state | t.extra_state, done)
            if pictures is not None:
                path = t.folder / "pictures" / f"{pictures.name}_step_{done:08d}.png"
                pictures.write(t.accelerator.unwrap_model(t.model), path)
            plot_curves(t.logger.path, t.folder / "curves.png", title)
        t.accelerator.wait_for_everyone()


def fit(
    training: Training,
    task: Task,
    config: StageConfig,
    batches: Callable[[int], Iterator[Batch]],
    epoch_images: int,
    title: str,
    pictures: Pictures | None = None,
    after_step: Callable[[int], None] | None = None,
    progress_name: str | None = None,
) -> FitResult:
    """Train from `training.start_step` to `config.train.steps` on `batches(start_step)` (a loader
    stream); an epoch is `epoch_images` images. `pictures` are drawn at every checkpoint (rank 0, as
    pictures/<pictures.name>_step_XXXXXXXX.png), curves.png too, titled `title`."""
    run, start = config.train, training.start_step
    if start >= run.steps:
        training.accelerator.print(f"nothing to do: the checkpoint is at step {start} of {run.steps}")
        return FitResult({}, 0)
    loop = Loop(training, task, config, epoch_images)
    stream = batches(start)
    show = None if training.accelerator.is_main_process else True
    progress = tqdm(
        total=run.steps, initial=start, desc=progress_name, disable=show, mininterval=1.0, dynamic_ncols=True
    )
    training.model.train()
    try:
        for step, batch in zip(range(start, run.steps), stream, strict=False):
            loop.step(step, batch)
            done = step + 1
            progress.update(1)
            checkpoint_due = done % run.checkpoint_every == 0 or done == run.steps
            if done % run.log_every == 0 or checkpoint_due:
                loop.log(done, progress)
            if after_step is not None:
                loop.hook(after_step, done)
            if checkpoint_due:
                loop.checkpoint(done, pictures, title)
    finally:
        progress.close()
        stream.close()  # stops the backend's workers and threads before the process goes on
    return FitResult(loop.last, loop.window.skipped_total)
