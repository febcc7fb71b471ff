"""The one set-up path from a config to a model ready to train, shared by pretraining, fine-tuning and the
benchmark: `prepare_training` builds the model (under a seed: the same weights on every rank), its
optimizer and schedule, prepares them with Accelerate and compiles; `start_training` adds what a run
keeps on disk (run folder, checkpoints, log) and, with --resume, restores the newest checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from model.sync_batch_norm import synchronise_batch_norm
from pipeline.data import derive_seed
from train.config import StageConfig
from train.engine.checkpoint import Checkpoints, restore_training_state
from train.engine.metrics import JsonlLogger
from train.engine.optim import build_optimizer, build_schedule
from train.engine.run_folder import continue_log
from train.engine.step import StepParts
from train.engine.task import Task
from train.engine.tracking import TrackerSink


@dataclass
class Prepared:
    """A model ready to train: what `prepare_training` hands to a run or the benchmark."""

    accelerator: Accelerator
    model: torch.nn.Module  # what the step calls: prepared (DDP-wrapped with several processes), compiled
    net: torch.nn.Module  # the plain module under any wrapper: checkpoints, evaluation, pictures
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def step_parts(self, task: Task, grad_clip: float) -> StepParts:
        """What the step (train/engine/step.py) updates: this model trained on `task`."""
        return StepParts(self.model, task, self.optimizer, self.scheduler, self.accelerator, grad_clip)


def prepare_training(
    config: StageConfig, accelerator: Accelerator, build: Callable[[], torch.nn.Module], init_seed: int
) -> Prepared:
    """Build under `init_seed`, the optimizer at the config's peak lr and its warm-up-cosine schedule over
    train.steps, prepared by Accelerate (and torch.compile with speed.compile)."""
    torch.manual_seed(init_seed)
    net = build()
    if config.distributed.sync_bn and accelerator.num_processes > 1:
        net = synchronise_batch_norm(net, accelerator.device)
    speed = config.speed
    optimizer = build_optimizer(net, config.optim, accelerator.device, config.train.batch_size, speed.cuda_graph)
    scheduler = build_schedule(optimizer, config.optim, config.train.steps)
    # The loader is not prepared: it shards by global rank itself (pipeline.data) and must not be
    # re-sharded; the scheduler is not prepared so that it steps once per optimizer step.
    model, optimizer = accelerator.prepare(net, optimizer)
    if speed.compile:
        model = torch.compile(model, mode=speed.compile_mode)
    return Prepared(accelerator, model, net, optimizer, scheduler)


@dataclass
class RunSpec:
    """What a run trains and where its state goes: `start_training`'s input beside the config and model."""

    folder: Path  # where log.jsonl, checkpoints/, pictures/ and curves.png go
    kind: str  # the checkpoint kind ("<method>_pretrain", "finetune")
    seed: int  # the run's seed: masks, dropout, data order
    init_seed: int  # the initial weights' seed, the same on every rank
    num_images: int  # the training data's size, recorded in checkpoints
    # added to every checkpoint dict (a tracker's run id, ...); a resumed run's own values win
    extra_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Training(Prepared):
    """One run's state between set-up and the loop: the prepared model and what the run keeps on disk."""

    folder: Path  # where log.jsonl, checkpoints/, pictures/ and curves.png go
    checkpoints: Checkpoints
    logger: JsonlLogger
    kind: str  # the checkpoint kind ("<method>_pretrain", "finetune")
    seed: int  # the run's seed: masks, dropout, data order
    num_images: int  # the training data's size, recorded in checkpoints
    start_step: int
    # added to every checkpoint dict, and read back from the one a run resumed from (a tracker's run id)
    extra_state: dict[str, Any] = field(default_factory=dict)
    tracker: TrackerSink | None = None  # where log records and pictures also go (log.tracker)


def start_training(
    config: StageConfig, accelerator: Accelerator, build: Callable[[], torch.nn.Module], spec: RunSpec
) -> Training:
    """`prepare_training` under `spec.init_seed`, then, with --resume and a checkpoint in `spec.folder`,
    restore; the log continues at the restored step."""
    prepared = prepare_training(config, accelerator, build, spec.init_seed)
    torch.manual_seed(derive_seed(spec.seed, accelerator.process_index))  # per-rank dropout
    checkpoints = Checkpoints(spec.folder / "checkpoints", config.checkpoint.keep)
    logger = JsonlLogger(spec.folder / "log.jsonl", accelerator.is_main_process)
    training = Training(
        **{f.name: getattr(prepared, f.name) for f in fields(Prepared)},
        folder=spec.folder,
        checkpoints=checkpoints,
        logger=logger,
        kind=spec.kind,
        seed=spec.seed,
        num_images=spec.num_images,
        start_step=0,
        extra_state=dict(spec.extra_state),
    )
    path, state = checkpoints.newest_readable(quiet=True) if config.train.resume else (None, None)
    if path is not None:
        training.start_step, restored = restore_training_state(path, training, state)
        training.extra_state = restored | training.extra_state
    if accelerator.is_main_process:
        spec.folder.mkdir(parents=True, exist_ok=True)
        continue_log(logger.path, training.start_step)
    accelerator.wait_for_everyone()
    return training
