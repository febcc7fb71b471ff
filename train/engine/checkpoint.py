"""The one checkpoint format: what a resumed run needs to continue bit for bit, every rank's RNG state,
and the folder of step_XXXXXXXX.pt files, each written atomically.

A checkpoint holds only tensors and plain containers (dicts, lists, tuples, str, numbers, None), so it is
read with `torch.load(..., weights_only=True)`: reading a file, even a hostile one, never runs code from
it. A file that needs anything else (a class, a function: what a pickle runs when it is loaded) is
refused. Checkpoints of format 1 (this trainer before format 2) held numpy's RNG state as a numpy array,
which only a full unpickling reads; `python -m train.upgrade_checkpoint FILE|RUN_DIR` converts them, and
is for files of a trusted source only (it unpickles them).
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from pipeline.atomic import write_atomic
from train.config import ConfigError, to_dict
from train.engine.checkpoint_schema import check_finite_weights, check_schema

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
CHECKPOINT_FORMAT = 2  # 2: loadable with weights_only=True (1: numpy RNG state as an array)
UPGRADE = "python -m train.upgrade_checkpoint"


def has_checkpoint(folder: Path, pattern: str = "checkpoints/*") -> bool:
    """Whether any file matching `pattern` under `folder` is a checkpoint (a run to resume)."""
    return any(CHECKPOINT_PATTERN.match(p.name) for p in folder.glob(pattern))


class UnreadableCheckpoint(ConfigError):
    """A file that is not a readable checkpoint at all (torn by a copy, truncated): a resume falls back to
    an older one. Every other refusal (a file needing code to load, a bad field) stops the run."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, a folder removed); the message names the path."""


class Checkpoints:
    """`step_XXXXXXXX.pt` files in one folder; the newest `keep` are kept."""

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

    def newest_readable(self, quiet: bool = False) -> tuple[Path | None, dict[str, Any] | None]:
        """The newest checkpoint that loads, and its state; a newer one that does not (torn by a copy,
        corrupted) is named and skipped."""
        return newest_readable(self.all(), quiet)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write step `step`'s checkpoint atomically, then drop the oldest beyond `keep`. A failed write
        (disk full, a folder gone) is one line naming the path; the previous checkpoints stay as they were."""
        path = self.folder / f"step_{step:08d}.pt"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda f: torch.save(state, f))
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            message = (
                f"{path}: the checkpoint could not be written ({error}); the newest one in {self.folder} is intact"
            )
            raise CheckpointWriteError(message) from error
        for old in self.all()[: -self.keep]:
            old.unlink()
        return path


def newest_readable(paths: list[Path], quiet: bool = False) -> tuple[Path | None, dict[str, Any] | None]:
    """Of `paths` (oldest first), the newest checkpoint that loads, and its state. A torn newer one is named
    and skipped; one that is refused for what it holds stops the search (it is not damage to work around)."""
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except UnreadableCheckpoint as error:
            if not quiet:
                print(f"warning: skipping {path}, it does not load ({error}); resuming from an older checkpoint")
    return None, None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of this trainer, read without running anything from the file, its fields checked and
    its weights finite; anything else is a ConfigError naming the file (and the field)."""
    try:
        with warnings.catch_warnings():  # torch warns of a foreign pickle protocol; the refusal says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused a global: a class or function to call
        raise ConfigError(refusal(path, str(error))) from error
    except Exception as error:  # torch raises several types for a truncated or foreign file
        message = " ".join(str(error).split())[:200]
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint ({message})") from error
    if isinstance(state, dict) and state.get("format") == 1:
        raise ConfigError(f"{path}: a checkpoint of format 1 (an older trainer); {upgrade_advice(path)}")
    check_schema(path, state, CHECKPOINT_FORMAT)
    check_finite_weights(path, state["model"])
    return state


def refusal(path: Path, message: str) -> str:
    found = re.search(r"GLOBAL (\S+)", message)
    needs = f"the global {found.group(1)}" if found else "objects other than tensors and plain containers"
    # A format-1 checkpoint needs numpy's array reconstruction (its numpy RNG state); nothing else is ours.
    advice = (
        upgrade_advice(path) if found and found.group(1).startswith("numpy") else "not a checkpoint of this trainer"
    )
    return (
        f"{path}: refused, it needs {needs} to load, which no checkpoint of this trainer holds (loading it "
        f"could run code from the file); {advice}"
    )


def upgrade_advice(path: Path) -> str:
    return f"if it is this trainer's checkpoint of format 1 and you trust its source, convert it: {UPGRADE} {path}"


STANDARD_KEYS = frozenset(
    {"images", "format", "kind", "step", "model", "optimizer", "scheduler", "scaler", "rng", "world_size", "config"}
)


class Resumable(Protocol):
    """What a checkpoint saves of a run and restores into it (train.engine.setup.Training is one)."""

    kind: str  # the checkpoint kind ("<method>_pretrain", "finetune")
    net: torch.nn.Module  # the plain module, under any DDP or compile wrapper
    optimizer: torch.optim.Optimizer  # the prepared one
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    num_images: int  # the training data's size: it fixes every epoch's order


def training_state(run: Resumable, step: int, config: Any, rng_states: list) -> dict[str, Any]:
    """The one checkpoint dict: everything a resumed run needs to continue bit for bit."""
    return {
        "images": run.num_images,
        "format": CHECKPOINT_FORMAT,
        "kind": run.kind,
        "step": step,
        "model": run.net.state_dict(),
        "optimizer": plain_optimizer_state(run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None,
        "rng": rng_states,
        "world_size": run.accelerator.num_processes,
        "config": to_dict(config),
    }


def plain_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with plain-float learning rates (a graphed step keeps them as device
    tensors), so any run, eager or graphed, on any device, can resume from it."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def restore_training_state(
    path: Path, run: Resumable, state: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """Load a `training_state` checkpoint (`state`: already loaded from `path`) into the run's plain module
    and prepared optimizer on every rank; returns its step and what the run added to it (`extra_state`: a
    tracker's run id, ...)."""
    state = state if state is not None else load_checkpoint(path)
    check_resumable(path, state, run)
    try:
        run.net.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"{path}: its model does not match this config's model ({error})") from error
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    accelerator = run.accelerator
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if state["world_size"] == accelerator.num_processes:
        set_rng_state(state["rng"][accelerator.process_index])
    else:
        accelerator.print(
            f"note: checkpoint from {state['world_size']} processes, resuming on "
            f"{accelerator.num_processes}: dropout RNG streams restart"
        )
    return int(state["step"]), {key: value for key, value in state.items() if key not in STANDARD_KEYS}


def check_resumable(path: Path, state: dict[str, Any], run: Resumable) -> None:
    """A checkpoint of another kind, or of data of another size, is refused before anything is loaded."""
    if state.get("kind") != run.kind:
        raise ConfigError(f"{path}: a {state.get('kind')!r} checkpoint, not a {run.kind!r} one")
    if state.get("images", run.num_images) != run.num_images:
        raise ConfigError(
            f"{path}: the run trained on {state['images']} images and --data now holds {run.num_images}, so "
            "every epoch's order would differ; resume with the data it started with (a .beton written without "
            "unreadable files holds fewer images than its folder)"
        )


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (numpy's key array as an int64 tensor), so a
    checkpoint holding them loads with weights_only=True."""
    algorithm, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "algorithm": str(algorithm),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(accelerator: Accelerator) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective call: every rank must make it)."""
    if accelerator.num_processes == 1:
        return [rng_state()]
    return gather_object([rng_state()])


def upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint dict in format 2: numpy's RNG states and the tracker id as plain values."""
    for rank_state in state.get("rng") or []:
        numpy_state = rank_state.get("numpy")
        if isinstance(numpy_state, tuple):
            algorithm, keys, position, has_gauss, cached = numpy_state
            rank_state["numpy"] = {
                "algorithm": str(algorithm),
                "keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)),
                "pos": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
    if state.get("tracker_run_id") is not None:
        state["tracker_run_id"] = str(state["tracker_run_id"])
    return state | {"format": CHECKPOINT_FORMAT}


def checkpoint_files(target: Path) -> list[Path]:
    """`target` itself, or every checkpoint under a run folder."""
    if not target.is_dir():
        return [target]
    return sorted(p for p in target.rglob("step_*.pt") if CHECKPOINT_PATTERN.match(p.name))


def upgrade(path: Path) -> None:
    """Rewrite a format-1 checkpoint in format 2, atomically. It UNPICKLES the file (weights_only=False):
    a hostile file runs its code here, so only for checkpoints of a trusted source."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a missing, truncated or foreign file
        raise ConfigError(f"{path}: not a readable checkpoint ({' '.join(str(error).split())[:200]})") from error
    if not isinstance(state, dict) or state.get("format") != 1:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: not a format-1 checkpoint of this trainer (format {found!r})")
    state = upgraded(state)
    check_schema(path, state, CHECKPOINT_FORMAT)
    write_atomic(path, lambda f: torch.save(state, f))
