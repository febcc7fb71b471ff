"""The one checkpoint format: what a resumed run needs to continue bit for bit, every rank's RNG state,
and the folder of step_XXXXXXXX.pt files, each written atomically."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from pipeline.atomic import write_atomic
from train.config import ConfigError, to_dict

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
CHECKPOINT_FORMAT = 1


def has_checkpoint(folder: Path, pattern: str = "checkpoints/*") -> bool:
    """Whether any file matching `pattern` under `folder` is a checkpoint (a run to resume)."""
    return any(CHECKPOINT_PATTERN.match(p.name) for p in folder.glob(pattern))


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
    """Of `paths` (oldest first), the newest checkpoint that loads, and its state."""
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except ConfigError as error:
            if not quiet:
                print(f"warning: skipping {path}, it does not load ({error}); resuming from an older checkpoint")
    return None, None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ConfigError(f"{path}: not a readable checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a checkpoint written by this trainer (format {CHECKPOINT_FORMAT})")
    return state


STANDARD_KEYS = frozenset(
    {"images", "format", "kind", "step", "model", "optimizer", "scheduler", "scaler", "rng", "world_size", "config"}
)


def training_state(
    kind: str,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    step: int,
    config: Any,
    rng_states: list,
    num_images: int,
) -> dict[str, Any]:
    """The one checkpoint dict: everything a resumed run needs to continue bit for bit (`net`: the plain
    module, under any DDP or compile wrapper)."""
    return {
        "images": num_images,  # the training data's size: it fixes every epoch's order
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "step": step,
        "model": net.state_dict(),
        "optimizer": plain_optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng_states,
        "world_size": accelerator.num_processes,
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
    path: Path,
    kind: str,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    num_images: int,
    state: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Load a `training_state` checkpoint (`state`: already loaded from `path`) into the plain module and
    the prepared optimizer on every rank; returns its step and what the run added to it (`extra_state`: a
    tracker's run id, ...)."""
    state = state if state is not None else load_checkpoint(path)
    if state.get("kind") != kind:
        raise ConfigError(f"{path}: a {state.get('kind')!r} checkpoint, not a {kind!r} one")
    if state.get("images", num_images) != num_images:
        raise ConfigError(
            f"{path}: the run trained on {state['images']} images and --data now holds {num_images}, so every "
            "epoch's order would differ; resume with the data it started with (a .beton written without "
            "unreadable files holds fewer images than its folder)"
        )
    try:
        net.load_state_dict(state["model"])
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
    return int(state["step"]), {key: value for key, value in state.items() if key not in STANDARD_KEYS}


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
