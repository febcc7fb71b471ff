"""The protocol every trained task follows, the pretext-method base class, and the method registry.

The training loop (train/engine/loop.py) runs a `Task`: a pretext method during pretraining, the supervised
classifier (train/methods/supervised.py) during fine-tuning. A pretext method is one subclass of
`PretextMethod` in one file and one `register(TheMethod)` call; everything else derives from the registry:
`--method` choices, config sections (`section` + `Settings`), the stable flags, the log keys, the table
labels, the benchmark's `--method`, and what fine-tuning reads from its checkpoints.

A pretext model's contract: `model(*method.inputs(batch, generator))` returns an object with a scalar
`loss` and a scalar `accuracy`, and equals `model.forward_head(model.forward_features(inputs[0]),
*inputs[1:])`, where `forward_features` runs the backbone that fine-tuning reuses (stored under
`encoder_prefix` in the model's state dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.data import Batch, Source
from pipeline.patches import PatchSpec
from train.config.schema import PretrainConfig


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


class PretextMethod:
    """A pretext task. Subclass it, set the class attributes, implement `build_model` and `inputs`, and
    `register` the class. The methods with a default body are optional."""

    name: ClassVar[str]  # --method value and registry key; checkpoints record kind "<name>_pretrain"
    label: ClassVar[str]  # its name in tables (train/pretext_table.py)
    metric: ClassVar[str]  # log key of its pretext accuracy
    accuracy_name: ClassVar[str] = "pretext"  # printed as "<name> <accuracy_name> accuracy"
    op_stage: ClassVar[str] = "input op"  # the benchmark's name for `inputs`
    encoder_prefix: ClassVar[str] = "backbone."  # where the backbone that fine-tuning reuses is in the state dict
    pool_prefix: ClassVar[str | None] = None  # where an attention pooling A is (resnet36_attn reuses it)
    section: ClassVar[str | None] = None  # its config section, --<section>.key=value (shareable in a family)
    Settings: ClassVar[type | None] = None  # that section's dataclass
    flags: ClassVar[dict[str, tuple[str, Any, str]]] = {}  # its stable flags: flag -> (key, type, help)

    chance: float  # set by __init__ (it may depend on the config)

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        """Called after `check`, on every rank, with the training device."""
        self.config = config
        self.device = device

    @classmethod
    def check(cls, config: PretrainConfig) -> None:
        """Refuse, with a ConfigError naming the keys, settings that cannot work together (the model's own
        arguments are checked by a trial build)."""

    @classmethod
    def build_model(cls, config: PretrainConfig) -> nn.Module:
        raise NotImplementedError

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def objective(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(*inputs)
        return out.loss, out.accuracy

    def clean_probe(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Scalar figures of one group of the clean metric (train/evaluation/clean_metric.py): `loss`, `acc` and any
        of the method's own (an `..._acc` key is logged with the method's metric in place of `acc`)."""
        loss, accuracy = self.objective(model, inputs)
        return {"loss": loss, "acc": accuracy}

    def settings(self) -> Any:
        """This method's config section."""
        return getattr(self.config, self.section) if self.section else None

    def describe(self) -> str:
        """The start-of-run summary of the task (after the image size)."""
        return f"chance {self.chance:.1%}"

    @classmethod
    def table_label(cls, config: PretrainConfig) -> str:
        """Its name in tables, with the settings that tell its variants apart."""
        return cls.label

    @classmethod
    def backbone_input(cls, config: dict) -> tuple[str, int]:
        """What the reused backbone was trained on, as (kind, side) from a checkpoint's config: whole
        "images" of data.image_size, or "patches" of a method's own size. An export records it."""
        return "images", int(config["data"]["image_size"])

    def loader_patch_spec(self, loader: str) -> PatchSpec | None:
        """What a loader may do for the method: a PatchSpec lets `loader` cut and mask Selfie-style patches
        inside its pipeline (FFCV on a CPU); None means the loader delivers images."""
        return None

    def pictures(self, source: Source, device: torch.device) -> Pictures | None:
        return None
