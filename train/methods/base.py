"""A method's contract, in two parts: the required core, in `PretextMethod`, and the optional presentation
(train/methods/presentation.py), which it inherits with defaults.

The training loop (train/engine/loop.py) runs a `Task` (train/engine/task.py): a pretext method during
pretraining, the supervised classifier (train/methods/supervised.py) during fine-tuning. The core of a pretext
method is its `name`, its `metric` and `chance`, `build_model`, `inputs`, and (by default the model's own)
`objective`. Optional: its own config section (`section`, `Settings`, `flags`, `check`, `moved_keys`), the
shape of an attention pooling fine-tuning rebuilds (`pool_shape`), the clean-metric probe, what a loader
may do for it, and the presentation. The registry (train/methods/registry.py) lists the methods.

A pretext model's contract: `model(*method.inputs(batch, generator))` returns an object with a scalar
`loss` and a scalar `accuracy`, and equals `model.forward_head(model.forward_features(inputs[0]),
*inputs[1:])`, where `forward_features` runs `model.backbone`, the network fine-tuning reuses; a model
with an attention pooling fine-tuning can reuse (resnet36_attn) has it as `model.pool`. Where they sit
in the state dict (`Parts`) is derived from those attributes and recorded in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from model.attention_pool import PoolShape
from pipeline.data import Batch
from pipeline.patches import PatchSpec
from train.config.schema import PretrainConfig
from train.methods.presentation import Presentation


class PretextMethod(Presentation):
    """A pretext task. The core, which a method must give: `name`, `metric`, `chance` (a class attribute, or
    set in `__init__` when it depends on the config), `build_model` and `inputs`. Everything with a default
    body or value is optional; the presentation's defaults come from `Presentation`."""

    # -- the core
    name: ClassVar[str]  # --method value and registry key; checkpoints record kind "<name>_pretrain"
    metric: ClassVar[str]  # log key of its pretext accuracy
    chance: float  # that accuracy by guessing

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        """Called after `check`, on every rank, with the training device."""
        self.config = config
        self.device = device

    @classmethod
    def build_model(cls, config: PretrainConfig) -> nn.Module:
        """The pretext model (see the module's docstring): `.backbone`, `forward_features`, `forward_head`."""
        raise NotImplementedError

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The model's inputs for one loader batch, on the batch's device (see `Task.inputs`)."""
        raise NotImplementedError

    def objective(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(*inputs)
        return out.loss, out.accuracy

    # its backbone embeds the image's patches, one per cell of a grid (`backbone_input` gives their side): the
    # probes also score the image's patch grid as it sees it (train/evaluation/probes.py)
    patch_network: ClassVar[bool] = False

    # -- optional: its own config section and command line
    section: ClassVar[str | None] = None  # its config section, --<section>.key=value (shareable in a family)
    Settings: ClassVar[type | None] = None  # that section's dataclass
    flags: ClassVar[dict[str, tuple[str, Any, str]]] = {}  # its stable flags: flag -> (key, type, help)
    # keys it took from a shared section into its own, old dotted key -> new ("model.x" -> "<section>.x"):
    # saved configs in the old layout still load, and the old key typed is refused naming the new one
    moved_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def check(cls, config: PretrainConfig) -> None:
        """Refuse, with a ConfigError naming the keys, settings that cannot work together (the model's own
        arguments are checked by a trial build)."""

    # -- optional: what the monitors, the loaders and an export may ask
    def clean_probe(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Scalar figures of one group of the clean metric (train/evaluation/clean_metric.py): `loss`, `acc` and any
        of the method's own (an `..._acc` key is logged with the method's metric in place of `acc`)."""
        loss, accuracy = self.objective(model, inputs)
        return {"loss": loss, "acc": accuracy}

    def loader_patch_spec(self, loader: str) -> PatchSpec | None:
        """What a loader may do for the method: a PatchSpec lets `loader` cut and mask Selfie-style patches
        inside its pipeline (FFCV on a CPU); None means the loader delivers images."""
        return None

    @classmethod
    def pool_shape(cls, config: dict) -> PoolShape | None:
        """The shape of its model's attention pooling (`model.pool`) under a checkpoint's config (in the
        current layout), which fine-tuning rebuilds to reuse it; None: it has none."""
        return None

    @classmethod
    def backbone_input(cls, config: dict) -> tuple[str, int]:
        """What the reused backbone was trained on, as (kind, side) from a checkpoint's config: whole
        "images" of data.image_size, or "patches" of a method's own size. An export records it."""
        return "images", int(config["data"]["image_size"])


@dataclass(frozen=True)
class Parts:
    """Where a pretext model's reusable parts sit in its state dict; checkpoints record them (the keys
    encoder_prefix and pool_prefix), and fine-tuning and export read them from there."""

    encoder_prefix: str  # the backbone's, e.g. "backbone."
    pool_prefix: str | None  # the attention pooling's; None: the model has none

    def state(self) -> dict[str, str | None]:
        """As a checkpoint records them."""
        return {"encoder_prefix": self.encoder_prefix, "pool_prefix": self.pool_prefix}


def parts_of(model: nn.Module) -> Parts:
    """`model`'s Parts, from its fixed attributes `backbone` and (if any) `pool`."""
    names = {id(module): name for name, module in model.named_modules()}
    pool = getattr(model, "pool", None)
    return Parts(names[id(model.backbone)] + ".", names[id(pool)] + "." if pool is not None else None)


def method_parts(method: type[PretextMethod], config: PretrainConfig) -> Parts:
    """The Parts of `method`'s model under `config`, built on the meta device (no memory, no random draws)."""
    with torch.device("meta"):
        return parts_of(method.build_model(config))
