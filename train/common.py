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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from pipeline.data import Batch, DataError, Source
from pipeline.loaders import LOADERS
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


# The stable flags both stages take (flag: config key, type, help); each script adds its own.
RUN_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--data": (
        "data.path",
        str,
        "ImageNet-layout or CIFAR-10 python folder; --loader ffcv: a .beton or a folder of them "
        "(default: built-in demo data)",
    ),
    "--steps": ("train.steps", int, "optimizer steps"),
    "--batch-size": ("train.batch_size", int, "global batch size, images per step over all processes"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--seed": ("train.seed", int, "random seed (fine-tuning: the first of --seeds)"),
    "--out": ("train.out", str, "run folder (default: runs/<config>-<time>)"),
    "--resume": ("train.resume", "store_true", "continue the run in --out from its newest checkpoint"),
    "--loader": ("data.loader", str, f"loader backend: {', '.join(LOADERS)}"),
}


def validate_run(config: Any) -> None:
    """The checks both stages share: loader backend and the run section."""
    run: RunConfig = config.train
    if config.data.loader not in LOADERS:
        raise ConfigError(f"--loader {config.data.loader}: expected one of {', '.join(LOADERS)}")
    if run.seed < 0:
        raise ConfigError(f"--seed {run.seed}: expected a non-negative integer")
    if run.steps <= 0:
        raise ConfigError(f"--steps {run.steps}: expected a positive number of steps")
    if run.log_every <= 0 or run.checkpoint_every <= 0:
        raise ConfigError("train.log_every and train.checkpoint_every must be positive")


def open_data(config: Any, split: str) -> tuple[Source, str]:
    """The data `--loader` reads for `split` ("train" | "test"), and its path (default: the demo data)."""
    backend = LOADERS[config.data.loader]
    with PartialState().main_process_first():  # one process builds (or converts) the demo data
        path = config.data.path or str(backend.demo(config.data.cache_dir))
    return backend.open(path, split), path


def train_batches(
    config: Any,
    source: Source,
    batch_per_process: int,
    seed: int,
    start_step: int,
    accelerator: Accelerator,
    patch_spec: Any = None,
) -> Iterator[Batch]:
    """The endless, rank-sharded training stream of `--loader` (each backend shards by global rank itself,
    so the loader is never passed to `accelerator.prepare`)."""
    data = config.data
    extra = {}
    if data.loader == "ffcv":
        extra = {"patch_spec": patch_spec, "os_cache": data.ffcv_os_cache, "quasi_random": data.ffcv_quasi_random}
    return LOADERS[data.loader].train(
        source,
        data.image_size,
        data.augment,
        batch_per_process,
        accelerator.process_index,
        accelerator.num_processes,
        seed,
        start_step,
        workers=data.workers,
        device=accelerator.device,
        pad=data.pad,
        crop_scale=data.crop_scale,
        fail_on_corrupt=data.fail_on_corrupt,
        **extra,
    )


def eval_batches(config: Any, source: Source, batch_per_process: int, accelerator: Accelerator) -> Iterator[Batch]:
    """Every image of `source` once over all ranks, center-cropped, through `--loader`."""
    return LOADERS[config.data.loader].evaluate(
        source,
        config.data.image_size,
        batch_per_process,
        accelerator.process_index,
        accelerator.num_processes,
        workers=config.data.workers,
        device=accelerator.device,
        fail_on_corrupt=config.data.fail_on_corrupt,
    )


def per_process_batch(run: RunConfig, accelerator: Accelerator) -> int:
    if run.batch_size <= 0 or run.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"--batch-size {run.batch_size} must be a positive multiple of the {accelerator.num_processes} "
            "processes (it is the global batch)"
        )
    return run.batch_size // accelerator.num_processes


def prepare_run_dir(
    config: Any,
    config_name: str,
    accelerator: Accelerator,
    checkpoint_glob: str = "checkpoints/step_*.pt",
    resumable_keys: frozenset[str] | None = None,
) -> Path:
    """Resolve, check and create the run folder; write the resolved config there (rank 0).

    A folder holding checkpoints (`checkpoint_glob`, relative to it) is only reused with --resume, and then
    only when the config equals the checkpoint's but for `resumable_keys` (default `RESUMABLE_KEYS`).
    """
    run: RunConfig = config.train
    if run.out is None:
        if run.resume:
            raise ConfigError("--resume needs --out RUN_DIR: the run folder whose checkpoints to continue")
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every rank must agree on the folder
        run.out = str(Path("runs") / f"{config_name}-{stamp[0]}")
    folder = Path(run.out)
    found = sorted(p for p in folder.glob(checkpoint_glob) if CHECKPOINT_PATTERN.match(p.name))
    latest = found[-1] if found else None
    if run.resume:
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {folder / Path(checkpoint_glob).parent} to continue from")
        allowed = RESUMABLE_KEYS if resumable_keys is None else resumable_keys
        check_resumable(
            load_checkpoint(latest)["config"], to_dict(config), latest, allowed, "", to_dict(type(config)())
        )
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
RESUMABLE_KEYS = frozenset(
    {
        "train.steps",
        "train.out",
        "train.resume",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.cpu_threads",
        "data.workers",
        # Every backend reads the same images at every step: a run may resume through another one.
        "data.loader",
        "data.ffcv_os_cache",
        "data.path",
        "data.cache_dir",
    }
)


def check_resumable(
    saved: dict[str, Any],
    current: dict[str, Any],
    path: Path,
    allowed: frozenset[str] = RESUMABLE_KEYS,
    prefix: str = "",
    defaults: dict[str, Any] | None = None,
) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key outside `allowed`. A key the
    checkpoint lacks (it predates the key) counts as its value in `defaults`, the config class's defaults."""
    defaults = defaults or {}
    for key in sorted(saved.keys() | current.keys()):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            check_resumable(old, new, path, allowed, dotted + ".", defaults.get(key))
        elif old != new and dotted not in allowed:
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


def training_state(
    kind: str,
    model,
    optimizer,
    scheduler,
    accelerator: Accelerator,
    step: int,
    config: Any,
    rng_states: list,
    num_images: int,
) -> dict[str, Any]:
    """The one checkpoint dict: everything a resumed run needs to continue bit for bit."""
    return {
        "images": num_images,  # the training data's size: it fixes every epoch's order
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "step": step,
        "model": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng_states,
        "world_size": accelerator.num_processes,
        "config": to_dict(config),
    }


def restore_training_state(
    path: Path, kind: str, model, optimizer, scheduler, accelerator: Accelerator, num_images: int
) -> int:
    """Load a `training_state` checkpoint into the prepared objects on every rank; returns its step."""
    state = load_checkpoint(path)
    if state.get("kind") != kind:
        raise ConfigError(f"{path}: a {state.get('kind')!r} checkpoint, not a {kind!r} one")
    if state.get("images", num_images) != num_images:
        raise ConfigError(
            f"{path}: the run trained on {state['images']} images and --data now holds {num_images}, so every "
            "epoch's order would differ; resume with the data it started with (a .beton written without "
            "unreadable files holds fewer images than its folder)"
        )
    try:
        accelerator.unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"{path}: its model does not match this config's model ({error})") from error
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if state["world_size"] == accelerator.num_processes:
        set_rng_state(state["rng"][accelerator.process_index])
    else:
        accelerator.print(
            f"note: checkpoint from {state['world_size']} processes, resuming on "
            f"{accelerator.num_processes}: dropout RNG streams restart"
        )
    return int(state["step"])


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


class MetricWindow:
    """Per-step metrics averaged over a logging window and over ranks, written as one log.jsonl record.

    Metrics stay on the device between records, so logging costs one reduction per window, not a
    host sync per step. `flush` is a collective: every rank must call it at the same step.
    """

    def __init__(self, accelerator: Accelerator, logger: JsonlLogger, images_per_step: int, state_hint: str) -> None:
        self.accelerator = accelerator
        self.logger = logger
        self.images_per_step = images_per_step
        self.state_hint = state_hint  # where the last good state is, for the divergence message
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.skipped: list[str] = []
        self.skipped_total = 0
        self.start = time.perf_counter()

    def add(self, skipped: tuple[str, ...] = (), **metrics: torch.Tensor) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1
        self.skipped.extend(f"rank {self.accelerator.process_index}: {entry}" for entry in skipped)

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (a test evaluation) out of images/s."""
        self.start += seconds

    def flush(self, step: int, **fields: Any) -> dict[str, Any]:
        """Write {"step", <metric means>, **fields, "images_per_s", "time"}; raise on a non-finite mean."""
        names = list(self.sums)
        means = self.accelerator.reduce(torch.stack([self.sums[n] for n in names]) / self.steps, "mean")
        values = dict(zip(names, means.tolist(), strict=True))
        if not torch.isfinite(means).all():
            raise NonFiniteLoss(f"non-finite {names[0]} at step {step} ({values}); {self.state_hint}")
        # Every rank's unreadable files reach the rank-0 log.
        skipped = gather_object(self.skipped) if self.accelerator.num_processes > 1 else self.skipped
        for entry in skipped:
            self.skipped_total += 1
            self.logger.write(
                {"event": "skipped_image", "step": step, "image": entry, "skipped_total": self.skipped_total}
            )
        elapsed = time.perf_counter() - self.start
        record = {
            "step": step,
            **{name: round(value, 5) for name, value in values.items()},
            **fields,
            "images_per_s": round(self.steps * self.images_per_step / elapsed, 2),
            "time": round(time.time(), 3),
        }
        self.logger.write(record)
        self.sums, self.steps, self.skipped = {}, 0, []
        self.start = time.perf_counter()
        return record


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
