"""What a training process sets up before its first step: the precision it trains in, the Accelerator
(with its trackers, accumulation, and the CPU's threads), the per-process batch, and a trial build of the
model so bad model settings stop before anything is written. The checks here need the machine or the
accelerator; those of the config alone are train/config/checks.py's."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs, ProjectConfiguration

from train.config import ConfigError, SpeedSection, StageConfig, TrainSection
from train.config.checks import launcher_precision, settled_precision
from train.engine.tracking import check_tracker


def resolve_precision(speed: SpeedSection) -> str | None:
    """Settle `speed.precision` to no | bf16 | fp16 (train/config/checks.py, settled_precision). Returns a
    note when the config overrides a different launcher choice."""
    speed.precision = settled_precision(speed)
    launcher = launcher_precision()
    if launcher is not None and launcher != speed.precision:
        config = f"speed.precision={speed.precision} (the config's)"
        return f"note: {config} overrides accelerate's mixed_precision={launcher}"
    return None


def check_machine(speed: SpeedSection) -> None:
    cuda = torch.cuda.is_available()
    if speed.precision == "fp16" and not cuda:
        raise ConfigError("speed.precision=fp16 needs a CUDA device; use bf16 or no on this machine")
    if speed.cuda_graph and not cuda:
        raise ConfigError("speed.cuda_graph=true needs a CUDA device; on this machine train eagerly")


def check_processes(speed: SpeedSection, accelerator: Accelerator) -> None:
    if speed.cuda_graph and accelerator.num_processes > 1:
        raise ConfigError(
            f"speed.cuda_graph=true runs one process; this run has {accelerator.num_processes} (graphing the "
            "all-reduce of several processes is not supported yet): train eagerly, or compile"
        )


def make_accelerator(config: StageConfig) -> Accelerator:
    """The Accelerator of `config`'s run. Checked here only what needs this machine or the launched
    processes (CUDA present, how many processes, the tracker's package); what the config alone decides is
    train/config/checks.py's, run by the stage's validate before this."""
    speed = config.speed
    note = resolve_precision(speed)
    check_machine(speed)
    check_tracker(config.log)
    # A graph must not capture autocast's cast cache: its casts belong to the replayed step itself.
    autocast = [AutocastKwargs(cache_enabled=False)] if speed.cuda_graph else []
    # A peer that stops answering (a wedged node) ends the job after this long, instead of never.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.distributed.collective_timeout))
    log_with = None if config.log.tracker == "none" else config.log.tracker
    # cpu=True on a machine without CUDA is what lets Accelerate form a gloo group under torchrun.
    accelerator = Accelerator(
        mixed_precision=speed.precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[*autocast, timeout],
        gradient_accumulation_steps=config.train.grad_accum,
        log_with=log_with,
        # Where a tracker writes is set to the run folder once it is known (train/engine/tracking.py).
        project_config=ProjectConfiguration(project_dir=os.getcwd()) if log_with else None,
    )
    check_processes(speed, accelerator)
    if note:
        accelerator.print(note)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    if accelerator.device.type == "cpu":
        # `accelerate launch` pins OMP_NUM_THREADS=1 when not told otherwise, which halves CPU speed.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(speed.cpu_threads or max(1, cores // max(1, local_processes)))
    return accelerator


def per_process_batch(train: TrainSection, accelerator: Accelerator) -> int:
    """Images per process in one micro-batch: the global batch over processes and accumulation steps."""
    parts = accelerator.num_processes * train.grad_accum
    if train.batch_size % parts:
        raise ConfigError(
            f"--batch-size {train.batch_size} must be a multiple of {accelerator.num_processes} processes x "
            f"{train.grad_accum} accumulated micro-batches (it is the global batch of one optimizer step)"
        )
    return train.batch_size // parts


def check_model_builds(build: Callable[[], torch.nn.Module], what: str) -> None:
    """Build the model on the meta device (no memory, no initialisation cost): settings the model refuses
    (heads not dividing the width, ...) become a ConfigError before any run folder exists."""
    try:
        with torch.device("meta"):
            build()
    except ValueError as error:
        raise ConfigError(f"model settings do not build {what}: {error}") from error
