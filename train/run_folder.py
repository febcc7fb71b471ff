"""The run folder and the resume policy: where a run writes, when a folder may be reused, which config
changes a resume may make, and the log a resumed run continues."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline.atomic import write_atomic
from train.checkpoint import CHECKPOINT_PATTERN, load_checkpoint
from train.config import ConfigError, StageConfig, to_dict

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
        # How the step is executed, not what it computes (up to floating-point rounding).
        "train.compile",
        "train.compile_mode",
        "train.cuda_graph",
        "train.cudnn_benchmark",
        "optim.implementation",
        # What the run measures, not what it trains.
        "monitor.clean",
        "monitor.clean_images",
        "monitor.knn",
        "monitor.every",
        "monitor.knn_train_images",
        "monitor.knn_test_images",
        "monitor.knn_k",
        "monitor.knn_temperature",
        "monitor.batch",
        "data.workers",
        # Every backend reads the same images at every step: a run may resume through another one.
        "data.loader",
        "data.ffcv_os_cache",
        "data.path",
        "data.cache_dir",
    }
)


def _folder_for(config: StageConfig, config_name: str) -> Path:
    run = config.train
    if run.out is None:
        if run.resume:
            raise ConfigError("--resume needs --out RUN_DIR: the run folder whose checkpoints to continue")
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every rank must agree on the folder
        run.out = str(Path("runs") / f"{config_name}-{stamp[0]}")
    return Path(run.out)


def prepare_run_dir(
    config: StageConfig,
    config_name: str,
    accelerator: Accelerator,
    checkpoint_glob: str = "checkpoints/step_*.pt",
    resumable_keys: frozenset[str] = RESUMABLE_KEYS,
) -> Path:
    """Resolve, check and create the run folder; write the resolved config there (rank 0).

    A folder holding checkpoints (`checkpoint_glob`, relative to it) is only reused with --resume, and then
    only when the config equals the checkpoint's but for `resumable_keys`.
    """
    folder = _folder_for(config, config_name)
    found = sorted(p for p in folder.glob(checkpoint_glob) if CHECKPOINT_PATTERN.match(p.name))
    latest = found[-1] if found else None
    if config.train.resume:
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {folder / Path(checkpoint_glob).parent} to continue from")
        saved = load_checkpoint(latest)["config"]
        check_resumable(saved, to_dict(config), latest, resumable_keys, "", to_dict(type(config)()))
    elif latest is not None:
        raise ConfigError(
            f"--out {folder} already holds checkpoints; pass --resume to continue that run or choose another --out"
        )
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if not config.train.resume and (folder / "log.jsonl").exists():
            # No checkpoint means nothing of that run can be continued; its log would only mislead.
            print(f"note: {folder} holds a log but no checkpoint; starting a fresh log")
            (folder / "log.jsonl").unlink()
        write_atomic(folder / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    accelerator.wait_for_everyone()
    return folder


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


def continue_log(path: Path, step: int) -> None:
    """The log a run at `step` writes to: records after `step` dropped (a resumed run writes them again,
    once); a run starting from scratch starts a fresh log."""
    if not step:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept).encode())
