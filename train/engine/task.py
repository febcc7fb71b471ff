"""What the engine asks of what it trains, and of what draws a run's pictures: the contract the loop and
the step hold every task to (train/methods/ implements it: the pretext methods and fine-tuning's
supervised task), written here so the engine imports nothing above it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from pipeline.data import Batch
from pipeline.patches import PatchSpec


class Task(Protocol):
    """What the training loop asks of what it trains."""

    metric: str  # the log key of the task's accuracy (patch_acc, train_acc, ...)
    chance: float  # that accuracy by guessing
    op_stage: str  # the benchmark's name for `inputs` ("patch op", "view op", ...)

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The model's inputs for one loader batch, made on the batch's device; `generator` (on that
        device, reseeded every step) draws any randomness (masks, views), so a resumed run redraws it."""
        ...

    def objective(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy), scalars, the loss differentiable."""
        ...

    def loader_patch_spec(self, loader: str) -> PatchSpec | None:
        """What `loader` may do for the task: cut Selfie-style patches itself (a PatchSpec), or nothing."""
        ...


class Pictures(Protocol):
    """Fixed images drawn with the model's answers at every checkpoint (rank 0)."""

    name: str  # the files are pictures/<name>_step_XXXXXXXX.png

    def write(self, model: nn.Module, path: Path) -> np.ndarray:
        """Draw with `model` (the plain module), write the PNG to `path`, return the (H, W, 3) uint8 picture."""
        ...
