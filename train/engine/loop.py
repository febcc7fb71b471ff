"""The one training loop. Pretraining (a pretext method) and fine-tuning (the supervised classifier) both
run it: `start_training` builds the model, optimizer and schedule, prepares them with Accelerate (and
torch.compile), and restores a checkpoint; `fit` runs the steps (train/engine/step.py: eager, or replayed from a
CUDA graph) with logging, checkpoints, pictures and curves.

Per finished step: a log record when due, the
`after_step` hook (fine-tuning's test evaluation, left out of images/s), then a checkpoint when due. Every
log record of a step is written before that step's checkpoint, so a resumed run that drops the records
after its checkpoint (`continue_log`) writes each one once.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from model.sync_batch_norm import synchronise_batch_norm
from pipeline.data import MASK_STREAM, Batch, derive_seed
from train.config import StageConfig
from train.engine.checkpoint import Checkpoints, all_rng_states, restore_training_state, training_state
from train.engine.metrics import JsonlLogger, MetricWindow, NonFiniteLoss
from train.engine.optim import build_optimizer, build_schedule
from train.engine.run_folder import continue_log
from train.engine.signals import StopRequests, stopped
from train.engine.step import make_step
from train.engine.tracking import TrackerSink
from train.evaluation.curves import plot_curves
from train.methods.base import Task
from train.methods.presentation import Pictures


@dataclass
class Training:
    """One run's state between set-up and the loop."""

    accelerator: Accelerator
    model: torch.nn.Module  # what the step calls: prepared (DDP-wrapped with several processes), compiled
    net: torch.nn.Module  # the plain module under any wrapper: checkpoints, evaluation, pictures
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    folder: Path  # where log.jsonl, checkpoints/, pictures/ and curves.png go
    checkpoints: Checkpoints
    logger: JsonlLogger
    kind: str  # the checkpoint kind ("<method>_pretrain", "finetune")
    seed: int  # the run's seed: masks, dropout, data order
    num_images: int  # the training data's size, recorded in checkpoints
    start_step: int
    # added to every checkpoint dict, and read back from the one a run resumed from (a tracker's run id)
    extra_state: dict[str, Any] = field(default_factory=dict)
    tracker: TrackerSink | None = None  # where log records and pictures also go (train.log_with)


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
    net = build()
    if config.train.sync_bn and accelerator.num_processes > 1:
        net = synchronise_batch_norm(net, accelerator.device)
    optimizer = build_optimizer(net, config.optim, accelerator.device, config.train.batch_size, config.train.cuda_graph)
    scheduler = build_schedule(optimizer, config.optim, config.train.steps)
    # The loader is not prepared: it shards by global rank itself (pipeline.data) and must not be
    # re-sharded; the scheduler is not prepared so that it steps once per optimizer step.
    model, optimizer = accelerator.prepare(net, optimizer)
    if config.train.compile:
        model = torch.compile(model, mode=config.train.compile_mode)
    torch.manual_seed(derive_seed(seed, accelerator.process_index))  # per-rank dropout
    checkpoints = Checkpoints(folder / "checkpoints", config.train.keep_checkpoints)
    start_step, restored = 0, {}
    path, state = checkpoints.newest_readable(quiet=True) if config.train.resume else (None, None)
    if path is not None:
        start_step, restored = restore_training_state(
            path, kind, net, optimizer, scheduler, accelerator, num_images, state
        )
    logger = JsonlLogger(folder / "log.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        continue_log(logger.path, start_step)
    accelerator.wait_for_everyone()
    fields = (model, net, optimizer, scheduler, folder, checkpoints, logger, kind, seed, num_images, start_step)
    return Training(accelerator, *fields, {**restored, **(extra_state or {})})


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


def micro_batches(stream: Iterator[Batch], count: int) -> Iterator[Batch | list[Batch]]:
    """The loader's batches, or (count > 1) lists of `count` consecutive micro-batches, one per step."""
    if count == 1:
        yield from stream  # closing this generator closes `stream` too
        return
    try:
        while len(group := list(itertools.islice(stream, count))) == count:
            yield group
    finally:
        stream.close()  # as `yield from` would: the backend's workers stop when the run does


ETA_LINES = 5  # progress lines whose pace estimates the time left


class ProgressLines:
    """When stdout is not a terminal (a batch job's log), a plain line every `train.print_every` steps
    (every log record at 0): step, loss, the task's accuracy, images/s and the time left (rank 0)."""

    def __init__(self, run, metric: str, start_step: int, accelerator: Accelerator) -> None:
        self.run, self.metric, self.start_step = run, metric, start_step
        self.enabled = accelerator.is_main_process and not sys.stdout.isatty()
        self.printed = start_step
        # (time, step) at the last few lines: the time left comes from the recent pace, so the first
        # steps' warm-up (compilation, caches, loader start) stops counting once later lines exist.
        self.recent: deque[tuple[float, int]] = deque([(time.perf_counter(), start_step)], maxlen=ETA_LINES)

    def line(self, done: int, record: dict[str, Any]) -> None:
        if not self.enabled or done - self.printed < self.run.print_every:
            return
        self.printed = done
        self.recent.append((time.perf_counter(), done))
        if len(self.recent) > 2 and self.recent[0][1] == self.start_step:
            self.recent.popleft()
        (then, before), (now, _) = self.recent[0], self.recent[-1]
        left = (now - then) / (done - before) * (self.run.steps - done)
        print(
            f"step {done}/{self.run.steps}: loss {record['loss']:.4f}, {self.metric} {record[self.metric]:.1%}, "
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
        parts = (training.model, task, training.optimizer, training.scheduler, training.accelerator)
        self.run_step = make_step(*parts, config.optim.grad_clip, config.train.cuda_graph)
        self.report = ProgressLines(config.train, task.metric, training.start_step, training.accelerator)

    def step(self, step: int, batch: Batch | list[Batch]) -> None:
        """One optimizer step on a batch, or on the micro-batches of one (train.grad_accum)."""
        t = self.t
        # The schedule's value for this step, computed on the host (a graphed step's rate is a device tensor).
        self.step_lr = t.scheduler.base_lrs[0] * t.scheduler.lr_lambdas[0](step)
        self.generator.manual_seed(derive_seed(t.seed, MASK_STREAM, step, t.accelerator.process_index))
        loss, accuracy = self.run_step(batch, self.generator)
        skipped = tuple(e for b in batch for e in b.skipped) if isinstance(batch, list) else batch.skipped
        self.window.add(skipped, loss=loss, **{self.task.metric: accuracy})

    def log(self, done: int, progress: tqdm, fields: dict[str, Any]) -> None:
        epoch = round(done * self.run.batch_size / self.epoch_images, 4)
        self.last = self.window.flush(
            done, chance_acc=round(self.task.chance, 5), lr=self.step_lr, epoch=epoch, **fields
        )
        progress.set_postfix(loss=f"{self.last['loss']:.3f}", acc=f"{self.last[self.task.metric]:.1%}", refresh=False)
        self.report.line(done, self.last)

    def after(self, done: int, hooks: Hooks, progress: tqdm, title: str, stops: StopRequests) -> None:
        """A finished step's log record, hook and checkpoint when due. A stop signal makes the step a
        checkpoint step (several processes agree at a log step) and ends the run after it."""
        run, main = self.run, self.t.accelerator.is_main_process
        checkpoint_due = done % run.checkpoint_every == 0 or done == run.steps
        logging = done % run.log_every == 0 or checkpoint_due
        signum = stops.agreed(self.t.accelerator) if logging or self.t.accelerator.num_processes == 1 else None
        checkpoint_due = checkpoint_due or signum is not None
        if logging or checkpoint_due:
            fields = self.timed_out(hooks.log_fields, done, checkpoint_due) if hooks.log_fields and main else {}
            self.log(done, progress, fields)
        if hooks.after_step is not None:
            self.timed_out(hooks.after_step, done)
        if checkpoint_due:
            self.checkpoint(done, hooks.pictures, title)
        if signum is not None:
            raise stopped(signum, done, self.t.folder, self.t.accelerator.is_main_process)

    def timed_out(self, hook: Callable, *args: Any) -> Any:
        """`hook(*args)`, its time left out of the window's images/s."""
        started = time.perf_counter()
        result = hook(*args)
        self.window.exclude(time.perf_counter() - started)
        return result

    def checkpoint(self, done: int, pictures: Pictures | None, title: str) -> None:
        t = self.t
        check_finite(t.net, done, t.checkpoints.folder)  # the state to be saved, not the loss before it
        rng_states = all_rng_states(t.accelerator)
        if t.accelerator.is_main_process:
            state = training_state(
                t.kind, t.net, t.optimizer, t.scheduler, t.accelerator, done, self.config, rng_states, t.num_images
            )
            t.checkpoints.save(state | t.extra_state, done)
            if pictures is not None:
                path = t.folder / "pictures" / f"{pictures.name}_step_{done:08d}.png"
                picture = pictures.write(t.net, path)
                if t.tracker is not None:
                    t.tracker.picture(f"pictures/{pictures.name}", picture, done)
            plot_curves(t.logger.path, t.folder / "curves.png", title)
        t.accelerator.wait_for_everyone()


def fit(
    training: Training,
    task: Task,
    config: StageConfig,
    batches: Callable[[int], Iterator[Batch]],
    epoch_images: int,
    title: str,
    hooks: Hooks | None = None,
    progress_name: str | None = None,
) -> FitResult:
    """Train from `training.start_step` to `config.train.steps` on `batches(start_step)` (a loader
    stream); an epoch is `epoch_images` images. At every checkpoint, rank 0 draws the hooks' pictures
    (pictures/<pictures.name>_step_XXXXXXXX.png) and curves.png, titled `title`."""
    run, start = config.train, training.start_step
    if start >= run.steps:
        training.accelerator.print(f"nothing to do: the checkpoint is at step {start} of {run.steps}")
        return FitResult({}, 0)
    loop = Loop(training, task, config, epoch_images)
    stream = micro_batches(batches(start * run.grad_accum), run.grad_accum)
    show = None if training.accelerator.is_main_process else True
    progress = tqdm(
        total=run.steps, initial=start, desc=progress_name, disable=show, mininterval=1.0, dynamic_ncols=True
    )
    training.model.train()
    hooks = hooks or Hooks()
    try:
        with StopRequests() as stops:
            for step, batch in zip(range(start, run.steps), stream, strict=False):
                loop.step(step, batch)
                progress.update(1)
                loop.after(step + 1, hooks, progress, title, stops)
    finally:
        progress.close()
        stream.close()  # stops the backend's workers and threads before the process goes on
    return FitResult(loop.last, loop.window.skipped_total)
