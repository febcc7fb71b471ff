"""What pretraining and fine-tuning share: Accelerate set-up, run folder, optimizer and schedule,
atomic checkpoints, RNG state, rank-0 JSON-lines logging, and the CLI error exit."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from pipeline.data import DataError
from train.config import PRECISIONS, ConfigError, OptimConfig, RunConfig, to_dict

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
CHECKPOINT_FORMAT = 1


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run stops before a checkpoint could record the broken state."""


def make_accelerator(run: RunConfig) -> Accelerator:
    if run.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {run.precision!r}")
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
    if run.batch_size <= 0 or run.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"--batch-size {run.batch_size} must be a positive multiple of the {accelerator.num_processes} "
            "processes (it is the global batch)"
        )
    return run.batch_size // accelerator.num_processes


def prepare_run_dir(config: Any, config_name: str, accelerator: Accelerator) -> Path:
    """Resolve, check and create the run folder; write the resolved config there (rank 0)."""
    run: RunConfig = config.train
    if run.out is None:
        if run.resume:
            raise ConfigError("--resume needs --out RUN_DIR: the run folder whose checkpoints to continue")
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every rank must agree on the folder
        run.out = str(Path("runs") / f"{config_name}-{stamp[0]}")
    folder = Path(run.out)
    checkpoints = Checkpoints(folder / "checkpoints", run.keep_checkpoints)
    latest = checkpoints.latest()
    if run.resume:
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {checkpoints.folder} to continue from")
        check_resumable(load_checkpoint(latest)["config"], to_dict(config), latest)
    elif latest is not None:
        raise ConfigError(
            f"--out {folder} already holds checkpoints; pass --resume to continue that run or choose another --out"
        )
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if not run.resume and (folder / "log.jsonl").exists():
            # No checkpoint means nothing of that run can be continued; its log would only mislead.
            print(f"note: {folder} holds a log but no checkpoint; starting a fresh log")
            (folder / "log.jsonl").unlink()
        write_atomic(folder / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    accelerator.wait_for_everyone()
    return folder


# Keys a resumed run may change: speed, bookkeeping, the horizon, and where the data set lives (it may be
# mounted elsewhere on another node; its contents are the user's responsibility). Any other difference
# from the checkpoint's config is refused.
RESUMABLE_KEYS = {
    "train.steps",
    "train.out",
    "train.resume",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.cpu_threads",
    "data.workers",
    "data.path",
    "data.cache_dir",
}


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path, prefix: str = "") -> None:
    for key in sorted(saved.keys() | current.keys()):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            check_resumable(old, new, path, dotted + ".")
        elif old != new and dotted not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--resume: {dotted} is {new!r} here but {old!r} in {path}; resume with the run's own config "
                "or start a new run"
            )


def truncate_log(path: Path, step: int) -> None:
    """Drop records after `step`: a resumed run writes them again, once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


NO_DECAY_NAMES = ("position", "u0")  # learned embeddings and the pooling token


def build_sgd(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    """Nesterov SGD. Weight decay on conv/linear weights only, unless `optim.decay_all` (L2 on everything)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix_weight = param.ndim > 1 and not any(part in name for part in NO_DECAY_NAMES)
        (decay if optim.decay_all or is_matrix_weight else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr multiplier: linear from 1/warmup up to 1 over `warmup_steps`, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Checkpoints:
    """`step_XXXXXXXX.pt` files in one folder, each written to a temporary name and renamed into place."""

    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = folder
        self.keep = max(1, keep)

    def all(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        tmp = self.folder / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in self.all()[: -self.keep]:
            old.unlink()
        return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ConfigError(f"{path}: not a readable checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a checkpoint written by this trainer (format {CHECKPOINT_FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(accelerator: Accelerator) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective call: every rank must make it)."""
    if accelerator.num_processes == 1:
        return [rng_state()]
    return gather_object([rng_state()])


class JsonlLogger:
    """Appends one JSON object per line to `path`, on the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run `main`; a bad flag, value, file or data set ends with one clear line and exit status 2."""
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
