"""The one training loop. Pretraining (a pretext method) and fine-tuning (the supervised classifier) both
run it on what `start_training` (train/engine/setup.py) set up: `fit` runs the steps (train/engine/step.py:
eager, or replayed from a CUDA graph) with logging, checkpoints, pictures and curves.

Per finished step: a log record when due, the
`after_step` hook (fine-tuning's test evaluation, left out of images/s), then a checkpoint when due. Every
log record of a step is written before that step's checkpoint, so a resumed run that drops the records
after its checkpoint (`continue_log`) writes each one once.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.data import MASK_STREAM, Batch, derive_seed
from train.config import StageConfig
from train.engine.checkpoint import CheckpointWriteError, all_rng_states, training_state
from train.engine.curves import plot_curves
from train.engine.metrics import MetricWindow, NonFiniteLoss
from train.engine.setup import Training
from train.engine.signals import StopRequests, stopped
from train.engine.step import make_step
from train.engine.task import Pictures, Task


def check_finite(net: torch.nn.Module, step: int, folder: Path) -> None:
    """Refuse to checkpoint non-finite weights (an update can break them after a finite loss): one fused
    norm per parameter, one host read. Every rank holds the same weights, so every rank agrees."""
    tensors = [p.detach() for p in net.parameters()] + [b for b in net.buffers() if b.is_floating_point()]
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    if not bool(torch.isfinite(torch.stack(norms)).all()):
        raise NonFiniteLoss(
            f"non-finite weights after step {step} (the update diverged); nothing was saved, the newest "
            f"checkpoint in {folder} is the last good state"
        )


def micro_batches(stream: Iterator[Batch], count: int) -> Iterator[list[Batch]]:
    """The loader's batches in lists of `count` consecutive micro-batches (train.grad_accum), one per step."""
    try:
        while len(group := list(itertools.islice(stream, count))) == count:
            yield group
    finally:
        stream.close()  # as `yield from` would: the backend's workers stop when the run does


ETA_LINES = 5  # progress lines whose pace estimates the time left


class ProgressLines:
    """When stdout is not a terminal (a batch job's log), a plain line every `every` steps (log.print_every;
    every log record at 0): step, loss, the task's accuracy, images/s and the time left (rank 0)."""

    def __init__(self, every: int, steps: int, metric: str, start_step: int, accelerator: Accelerator) -> None:
        self.every, self.steps, self.metric, self.start_step = every, steps, metric, start_step
        self.enabled = accelerator.is_main_process and not sys.stdout.isatty()
        self.printed = start_step
        # (time, step) at the last few lines: the time left comes from the recent pace, so the first
        # steps' warm-up (compilation, caches, loader start) stops counting once later lines exist.
        self.recent: deque[tuple[float, int]] = deque([(time.perf_counter(), start_step)], maxlen=ETA_LINES)

    def line(self, done: int, record: dict[str, Any]) -> None:
        if not self.enabled or done - self.printed < self.every:
            return
        self.printed = done
        self.recent.append((time.perf_counter(), done))
        if len(self.recent) > 2 and self.recent[0][1] == self.start_step:
            self.recent.popleft()
        (then, before), (now, _) = self.recent[0], self.recent[-1]
        left = (now - then) / (done - before) * (self.steps - done)
        print(
            f"step {done}/{self.steps}: loss {record['loss']:.4f}, {self.metric} {record[self.metric]:.1%}, "
            f"{record['images_per_s']:,.0f} images/s, {left / 60:.1f} min left",
            flush=True,
        )


@dataclass
class Hooks:
    """What a stage adds to the loop, each part optional. Their time is left out of images/s."""

    pictures: Pictures | None = None  # drawn at every checkpoint (rank 0)
    after_step: Callable[[int], None] | None = None  # every rank, after every step (fine-tuning's test pass)
    # (step, checkpoint due) -> extra fields of that step's log record (rank 0; the pretraining monitors)
    log_fields: Callable[[int, bool], dict[str, Any]] | None = None


class RunFolderGone(CheckpointWriteError):
    """The run folder was deleted or replaced while the run went on."""


class FolderWatch:
    """The run folder as it was when the run started: a run whose folder is deleted (or replaced) stops
    with one line instead of re-creating parts of it (a log, a checkpoint folder) that no --resume uses."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.identity = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self.folder)
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def check(self, done: int) -> None:
        if self._identity() != self.identity:
            raise RunFolderGone(
                f"{self.folder}: the run folder was deleted or replaced while the run went on; stopped after "
                f"step {done} without writing there"
            )


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
        self.run_step = make_step(training.step_parts(task, config.optim.grad_clip), config.speed.cuda_graph)
        every, steps = config.log.print_every, config.train.steps
        self.report = ProgressLines(every, steps, task.metric, training.start_step, training.accelerator)
        self.folder_watch = FolderWatch(training.folder)

    def step(self, step: int, batches: list[Batch]) -> None:
        """One optimizer step on the micro-batches of one batch (one, unless train.grad_accum > 1)."""
        t = self.t
        # The schedule's value for this step, computed on the host (a graphed step's rate is a device tensor).
        self.step_lr = t.scheduler.base_lrs[0] * t.scheduler.lr_lambdas[0](step)
        self.generator.manual_seed(derive_seed(t.seed, MASK_STREAM, step, t.accelerator.process_index))
        loss, accuracy = self.run_step(batches, self.generator)
        skipped = tuple(entry for batch in batches for entry in batch.skipped)
        self.window.add(skipped, loss=loss, **{self.task.metric: accuracy})

    def log(self, done: int, progress: tqdm, fields: dict[str, Any]) -> None:
        epoch = round(done * self.run.batch_size / self.epoch_images, 4)
        self.last = self.window.flush(
            done, chance_acc=round(self.task.chance, 5), lr=self.step_lr, epoch=epoch, **fields
        )
        progress.set_postfix(loss=f"{self.last['loss']:.3f}", acc=f"{self.last[self.task.metric]:.1%}", refresh=False)
        self.report.line(done, self.last)

    def after(self, done: int, hooks: Hooks, progress: tqdm, title: str, stops: StopRequests) -> None:
        """A finished step's log record, hook and checkpoint when due. A stop signal (several processes
        agree at a log step) writes the step's checkpoint at once and ends the run (`stop`)."""
        config, main = self.config, self.t.accelerator.is_main_process
        checkpoint_due = done % config.checkpoint.every == 0 or done == config.train.steps
        logging = done % config.log.every == 0 or checkpoint_due
        signum = stops.agreed(self.t.accelerator) if logging or self.t.accelerator.num_processes == 1 else None
        if main and (logging or signum is not None):
            self.folder_watch.check(done)
        if signum is not None:
            self.stop(done, progress, signum)
        if logging:
            fields = self.timed_out(hooks.log_fields, done, checkpoint_due) if hooks.log_fields and main else {}
            self.log(done, progress, fields)
        if hooks.after_step is not None:
            self.timed_out(hooks.after_step, done)
        if checkpoint_due:
            self.checkpoint(done, hooks.pictures, title)

    def stop(self, done: int, progress: tqdm, signum: int) -> None:
        """End the run on a stop signal: the step's log record (without the monitors) and its checkpoint
        first, then the exit. The monitors, the test evaluation, the pictures and the curves are left out:
        they can take minutes, and a scheduler's grace period before its kill is often under one."""
        self.log(done, progress, {})
        self.checkpoint(done, None, None)
        raise stopped(signum, done, self.t.folder, self.t.accelerator.is_main_process)

    def timed_out(self, hook: Callable, *args: Any) -> Any:
        """`hook(*args)`, its time left out of the window's images/s."""
        started = time.perf_counter()
        result = hook(*args)
        self.window.exclude(time.perf_counter() - started)
        return result

    def checkpoint(self, done: int, pictures: Pictures | None, title: str | None) -> None:
        """Step `done`'s checkpoint, then (rank 0) its pictures and the curves; `title` None: no curves."""
        t = self.t
        check_finite(t.net, done, t.checkpoints.folder)  # the state to be saved, not the loss before it
        rng_states = all_rng_states(t.accelerator)
        if t.accelerator.is_main_process:
            t.checkpoints.save(training_state(t, done, self.config, rng_states) | t.extra_state, done)
            if pictures is not None:
                path = t.folder / "pictures" / f"{pictures.name}_step_{done:08d}.png"
                picture = pictures.write(t.net, path)
                if t.tracker is not None:
                    t.tracker.picture(f"pictures/{pictures.name}", picture, done)
            if title is not None:
                plot_curves(t.logger.path, t.folder / "curves.png", title)
        t.accelerator.wait_for_everyone()


@dataclass
class TrainingData:
    """What `fit` trains on: the loader's stream and the size of an epoch."""

    batches: Callable[[int], Iterator[Batch]]  # the first micro-batch to read -> the loader's stream from it
    epoch_images: int  # an epoch's images: the log's epoch column


def fit(
    training: Training,
    task: Task,
    config: StageConfig,
    data: TrainingData,
    title: str,
    hooks: Hooks | None = None,
    progress_name: str | None = None,
) -> FitResult:
    """Train from `training.start_step` to `config.train.steps` on `data`. At every checkpoint, rank 0 draws
    the hooks' pictures (pictures/<pictures.name>_step_XXXXXXXX.png) and curves.png, titled `title`."""
    run, start = config.train, training.start_step
    if start >= run.steps:
        training.accelerator.print(f"nothing to do: the checkpoint is at step {start} of {run.steps}")
        return FitResult({}, 0)
    loop = Loop(training, task, config, data.epoch_images)
    stream = micro_batches(data.batches(start * run.grad_accum), run.grad_accum)
    show = None if training.accelerator.is_main_process else True
    progress = tqdm(
        total=run.steps, initial=start, desc=progress_name, disable=show, mininterval=1.0, dynamic_ncols=True
    )
    training.model.train()
    hooks = hooks or Hooks()
    try:
        with StopRequests() as stops:
            for step, batches in zip(range(start, run.steps), stream, strict=False):
                loop.step(step, batches)
                progress.update(1)
                loop.after(step + 1, hooks, progress, title, stops)
    finally:
        progress.close()
        stream.close()  # stops the backend's workers and threads before the process goes on
    return FitResult(loop.last, loop.window.skipped_total)
