"""What a training process sets up before its first step: the Accelerator (and the CPU's threads), the
per-process batch, and a trial build of the model so bad model settings stop before anything is written."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import Accelerator

from train.config import ConfigError, RunConfig


def make_accelerator(run: RunConfig) -> Accelerator:
    if run.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or no on this machine")
    # cpu=True on a machine without CUDA is what lets Accelerate form a gloo group under torchrun.
    accelerator = Accelerator(mixed_precision=run.precision, cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        # `accelerate launch` pins OMP_NUM_THREADS=1 when not told otherwise, which halves CPU speed.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(run.cpu_threads or max(1, cores // max(1, local_processes)))
    return accelerator


def per_process_batch(run: RunConfig, accelerator: Accelerator) -> int:
    if run.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"--batch-size {run.batch_size} must be a multiple of the {accelerator.num_processes} processes "
            "(it is the global batch)"
        )
    return run.batch_size // accelerator.num_processes


def check_model_builds(build: Callable[[], torch.nn.Module], what: str) -> None:
    """Build the model on the meta device (no memory, no initialisation cost): settings the model refuses
    (heads not dividing the width, ...) become a ConfigError before any run folder exists."""
    try:
        with torch.device("meta"):
            build()
    except ValueError as error:
        raise ConfigError(f"model settings do not build {what}: {error}") from error
