"""What a training process sets up before its first step: the Accelerator (and the CPU's threads), the
per-process batch, and a trial build of the model so bad model settings stop before anything is written."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs

from train.config import GRAPHING_COMPILE_MODES, ConfigError, RunConfig


def check_step_options(run: RunConfig) -> None:
    """How the step runs: options that cannot work together, refused whatever the machine."""
    if not run.cuda_graph:
        return
    if run.precision == "fp16":
        raise ConfigError(
            "train.cuda_graph=true with train.precision=fp16: fp16's loss scaler reads its overflow check on "
            "the host every step, which a graph cannot; use bf16"
        )
    if run.compile and run.compile_mode in GRAPHING_COMPILE_MODES:
        raise ConfigError(
            f"train.compile_mode={run.compile_mode} captures CUDA graphs of its own, which cannot sit inside "
            "train.cuda_graph's; use compile_mode default or max-autotune-no-cudagraphs"
        )


def make_accelerator(run: RunConfig) -> Accelerator:
    check_step_options(run)
    if run.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or no on this machine")
    if run.cuda_graph and not torch.cuda.is_available():
        raise ConfigError("train.cuda_graph=true needs a CUDA device; on this machine train eagerly")
    # A graph must not capture autocast's cast cache: its casts belong to the replayed step itself.
    autocast = [AutocastKwargs(cache_enabled=False)] if run.cuda_graph else []
    # cpu=True on a machine without CUDA is what lets Accelerate form a gloo group under torchrun.
    accelerator = Accelerator(
        mixed_precision=run.precision, cpu=not torch.cuda.is_available(), kwargs_handlers=autocast
    )
    if run.cuda_graph and accelerator.num_processes > 1:
        raise ConfigError(
            f"train.cuda_graph=true runs one process; this run has {accelerator.num_processes} (graphing the "
            "all-reduce of several processes is not supported yet): train eagerly, or compile"
        )
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = run.cudnn_benchmark
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
