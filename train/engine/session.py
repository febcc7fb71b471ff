"""What a training process sets up before its first step: the precision it trains in, the Accelerator
(with its trackers, accumulation, and the CPU's threads), the per-process batch, and a trial build of the
model so bad model settings stop before anything is written."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs, ProjectConfiguration

from train.config import GRAPHING_COMPILE_MODES, ConfigError, OptimSection, TrainSection
from train.engine.optim import check_graphable
from train.engine.tracking import check_tracker

LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` (or `accelerate config`) chose


def resolve_precision(run: TrainSection) -> str | None:
    """Settle `run.precision` to no | bf16 | fp16: `auto` takes the launcher's choice (else no), `fp32` is
    `no`. Returns a note when the config overrides a different launcher choice."""
    launcher = os.environ.get(LAUNCHER_PRECISION)
    launcher = launcher if launcher in ("no", "bf16", "fp16") else None
    if run.precision == "auto":
        run.precision = launcher or "no"
    elif run.precision == "fp32":
        run.precision = "no"
    if launcher is not None and launcher != run.precision:
        return f"note: train.precision={run.precision} (the config's) overrides accelerate's mixed_precision={launcher}"
    return None


def check_step_options(run: TrainSection) -> None:
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
    if run.grad_accum > 1:
        raise ConfigError("train.cuda_graph=true replays one batch per step; with train.grad_accum > 1 train eagerly")


def check_machine(run: TrainSection) -> None:
    cuda = torch.cuda.is_available()
    if run.precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or no on this machine")
    if run.cuda_graph and not cuda:
        raise ConfigError("train.cuda_graph=true needs a CUDA device; on this machine train eagerly")


def check_processes(run: TrainSection, accelerator: Accelerator) -> None:
    if run.cuda_graph and accelerator.num_processes > 1:
        raise ConfigError(
            f"train.cuda_graph=true runs one process; this run has {accelerator.num_processes} (graphing the "
            "all-reduce of several processes is not supported yet): train eagerly, or compile"
        )


def make_accelerator(run: TrainSection, optim: OptimSection | None = None) -> Accelerator:
    note = resolve_precision(run)
    check_step_options(run)
    if optim is not None:
        check_graphable(optim, run.cuda_graph)
    check_machine(run)
    check_tracker(run)
    # A graph must not capture autocast's cast cache: its casts belong to the replayed step itself.
    autocast = [AutocastKwargs(cache_enabled=False)] if run.cuda_graph else []
    # A peer that stops answering (a wedged node) ends the job after this long, instead of never.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=run.collective_timeout))
    log_with = None if run.log_with == "none" else run.log_with
    # cpu=True on a machine without CUDA is what lets Accelerate form a gloo group under torchrun.
    accelerator = Accelerator(
        mixed_precision=run.precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[*autocast, timeout],
        gradient_accumulation_steps=run.grad_accum,
        log_with=log_with,
        # Where a tracker writes is set to the run folder once it is known (train/engine/tracking.py).
        project_config=ProjectConfiguration(project_dir=os.getcwd()) if log_with else None,
    )
    check_processes(run, accelerator)
    if note:
        accelerator.print(note)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = run.cudnn_benchmark
    if accelerator.device.type == "cpu":
        # `accelerate launch` pins OMP_NUM_THREADS=1 when not told otherwise, which halves CPU speed.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(run.cpu_threads or max(1, cores // max(1, local_processes)))
    return accelerator


def per_process_batch(run: TrainSection, accelerator: Accelerator) -> int:
    """Images per process in one micro-batch: the global batch over processes and accumulation steps."""
    parts = accelerator.num_processes * run.grad_accum
    if run.batch_size % parts:
        raise ConfigError(
            f"--batch-size {run.batch_size} must be a multiple of {accelerator.num_processes} processes x "
            f"{run.grad_accum} accumulated micro-batches (it is the global batch of one optimizer step)"
        )
    return run.batch_size // parts


def check_model_builds(build: Callable[[], torch.nn.Module], what: str) -> None:
    """Build the model on the meta device (no memory, no initialisation cost): settings the model refuses
    (heads not dividing the width, ...) become a ConfigError before any run folder exists."""
    try:
        with torch.device("meta"):
            build()
    except ValueError as error:
        raise ConfigError(f"model settings do not build {what}: {error}") from error
