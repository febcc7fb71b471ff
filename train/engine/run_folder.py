"""The run folder and the resume policy: where a run writes, when a folder may be reused, which config
changes a resume may make, the log a resumed run continues, and run.json: what ran there, how, on what."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from pipeline.atomic import open_to_read, remove_stale_temporaries, write_atomic
from train.config import ConfigError, StageConfig, move_old_keys, to_dict
from train.engine.checkpoint import CHECKPOINT_PATTERN, newest_readable
from train.engine.run_lock import acquire, is_record, read_holder

# Keys a resumed run may change: speed, bookkeeping, the horizon, and where the data set lives (it may be
# mounted elsewhere on another node; its contents are the user's responsibility). Any other difference
# from the checkpoint's config is refused.
RESUMABLE_KEYS = frozenset(
    {
        "train.steps",
        "train.out",
        "train.resume",
        "log.every",
        "checkpoint.every",
        "checkpoint.keep",
        "speed.cpu_threads",
        "distributed.collective_timeout",
        "log.print_every",
        "log.tracker",
        "log.tracker_project",
        # How the step is executed, not what it computes (up to floating-point rounding).
        "speed.compile",
        "speed.compile_mode",
        "speed.cuda_graph",
        "speed.cudnn_benchmark",
        "optim.implementation",
        # What the run measures, not what it trains.
        "monitor.clean",
        "monitor.clean_images",
        "monitor.clean_masks",
        "monitor.clean_chunk",
        "monitor.knn_random_inits",
        "monitor.knn",
        "monitor.bn",
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
    if not run.out.strip() or Path(run.out).resolve() == Path.cwd().resolve():
        raise ConfigError(f"--out {run.out!r}: the current folder; expected a run folder of its own (e.g. runs/NAME)")
    if Path(run.out).exists() and not Path(run.out).is_dir():
        raise ConfigError(f"--out {run.out}: a file; expected a run folder (a new one, or a run's to --resume)")
    return Path(run.out)


# What only the other stage's run folder holds: pretraining's checkpoints/, fine-tuning's seed folders.
OTHER_STAGE_MARK = {"pretraining": "seed_*", "finetuning": "checkpoints"}


def is_run_folder(folder: Path, stage: str, checkpoint_glob: str) -> bool:
    """Whether `folder` is recognisably a run of this trainer's `stage`: it holds this stage's checkpoints,
    or its run.json (the invocations record) parses, or its run.lock is a whole record of this stage (a run
    stopped before it wrote run.json). Any other run.lock (not JSON, a link) makes no folder a run folder."""
    holder = read_holder(folder)
    if holder and holder.get("stage", stage) != stage:
        return False
    if any(CHECKPOINT_PATTERN.match(p.name) for p in folder.glob(checkpoint_glob)):
        return True
    if any(folder.glob(OTHER_STAGE_MARK.get(stage, ""))):
        return False
    try:
        with open_to_read(folder / "run.json") as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return is_record(holder)
    return isinstance(record, dict) and isinstance(record.get("invocations"), list)


def check_reusable(folder: Path, config: StageConfig, checkpoint_glob: str) -> None:
    """Refuse, touching nothing, a folder a run may not write into: one that is neither new, empty nor a
    run of this stage (the user's own files), and a --resume of a folder without checkpoints."""
    checkpoints = [p for p in folder.glob(checkpoint_glob) if CHECKPOINT_PATTERN.match(p.name)]
    if config.train.resume and not checkpoints:
        raise ConfigError(f"--resume: no checkpoint in {folder / Path(checkpoint_glob).parent} to continue from")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    stage = type(config).STAGE
    if not checkpoints and not is_run_folder(folder, stage, checkpoint_glob):
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(
            f"--out {folder}: an existing folder that is not a {stage} run of this trainer (it holds {shown}); "
            "expected a new or empty folder, or a run folder to --resume"
        )


# What a run writes in its folder: each must be a real file or folder, never a link to somewhere else.
RUN_ENTRIES = ("run.lock", "run.json", "config.yaml", "log.jsonl", "curves.png", "checkpoints", "pictures")


def refuse_links(folder: Path) -> None:
    """Refuse, with one line, a run folder where one of the names a run writes is a symbolic link."""
    for name in RUN_ENTRIES:
        if (folder / name).is_symlink():
            raise ConfigError(f"--out {folder}: {folder / name} is a symbolic link; refusing to write through it "
                              "(remove it, or choose another --out)")  # fmt: skip


def claim(folder: Path, stage: str, accelerator: Accelerator) -> None:
    """Create the folder and lock it for this run (rank 0); every rank raises what rank 0 met."""
    message = [None]
    if accelerator.is_main_process:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            acquire(folder, stage)
        except OSError as error:
            message[0] = f"--out {folder}: cannot be created ({error.strerror or error})"
        except ConfigError as error:
            message[0] = str(error)
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[0] is not None:
        raise ConfigError(message[0])


def prepare_run_dir(
    config: StageConfig,
    config_name: str,
    accelerator: Accelerator,
    checkpoint_glob: str = "checkpoints/step_*.pt",
    resumable_keys: frozenset[str] = RESUMABLE_KEYS,
) -> Path:
    """Resolve, check, create and lock the run folder; write the resolved config there (rank 0).

    A folder holding checkpoints (`checkpoint_glob`, relative to it) is only reused with --resume, and then
    only when the config equals the checkpoint's but for `resumable_keys`. The lock is held until the
    process ends (train/engine/run_lock.py).
    """
    folder = _folder_for(config, config_name)
    check_reusable(folder, config, checkpoint_glob)
    refuse_links(folder)
    claim(folder, type(config).STAGE, accelerator)
    if accelerator.is_main_process:  # the lock is held: no other run writes here
        for stale in remove_stale_temporaries(folder):
            print(f"note: removed {stale}, a temporary file left by a process that ended mid-write")
    found = sorted(p for p in folder.glob(checkpoint_glob) if CHECKPOINT_PATTERN.match(p.name))
    latest = found[-1] if found else None
    if config.train.resume:
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {folder / Path(checkpoint_glob).parent} to continue from")
        readable, state = newest_readable(found, quiet=not accelerator.is_main_process)
        if readable is None:
            raise ConfigError(f"--resume: none of the checkpoints in {latest.parent} loads")
        saved = move_old_keys(state["config"], type(config))  # a checkpoint written before a key moved
        check_resumable(saved, to_dict(config), readable, resumable_keys, "", to_dict(type(config)()))
    elif latest is not None:
        raise ConfigError(
            f"--out {folder} already holds checkpoints; pass --resume to continue that run or choose another --out"
        )
    if accelerator.is_main_process:
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
    kept = [line for line in read_records(path) if line[1].get("step", 0) <= step]
    write_atomic(path, "".join(text + "\n" for text, _ in kept).encode())


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every record of a JSON-lines file. A line cut short (the run was killed while
    appending it) is dropped with a note; only the last line can be cut, any other bad line is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except ValueError as error:
            if number < len(lines):
                raise ConfigError(
                    f"{path}: line {number} is not JSON ({error}); expected one record per line"
                ) from error
            print(f"note: {path}: its last line was cut short (a kill while it was written); dropped")
    return records


def git_state(root: Path) -> dict[str, Any]:
    """The project's commit and whether its tree differs from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "accelerate", "numpy", "numba", "triton", "ffcv", "nvidia-dali-cuda130", "safetensors"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def record_invocation(folder: Path, accelerator: Accelerator, start_step: int) -> None:
    """Append this invocation to folder/run.json: command line, git commit, package versions, world size,
    every rank's device (a collective: every rank calls it)."""
    name = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else platform.processor()
    mine = [f"{socket.gethostname()}: {accelerator.device} {name}"]
    devices = gather_object(mine) if accelerator.num_processes > 1 else mine
    if accelerator.is_main_process:
        path = folder / "run.json"
        runs = json.loads(path.read_text()).get("invocations", []) if path.is_file() else []
        runs.append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": sys.argv,
                "cwd": os.getcwd(),
                "git": git_state(Path(__file__).resolve().parents[2]),
                "versions": versions(),
                "world_size": accelerator.num_processes,
                "devices": devices,
                "start_step": start_step,
            }
        )
        write_atomic(path, json.dumps({"invocations": runs}, indent=1).encode())
    accelerator.wait_for_everyone()
