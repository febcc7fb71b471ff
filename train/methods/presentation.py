"""The optional half of a method's contract: how it shows itself (its name in tables, the start-of-run line,
the accuracy's name, the benchmark's name for its input op, pictures at every checkpoint). Every member has
a default, so a new method can train, resume and be fine-tuned without any of it (tests/test_methods.py)."""

from __future__ import annotations

from typing import ClassVar

import torch

from pipeline.data import Source
from train.config.schema import PretrainConfig
from train.engine.task import Pictures


class Presentation:
    """Defaults for how a pretext method presents itself; `PretextMethod` inherits them, a method overrides
    what it wants to say better."""

    name: ClassVar[str]  # from the core: the --method value
    chance: float  # from the core
    label: ClassVar[str | None] = None  # its name in tables (train/pretext_table.py); None: its --method value
    accuracy_name: ClassVar[str] = "pretext"  # printed as "<name> <accuracy_name> accuracy"
    op_stage: ClassVar[str] = "input op"  # the benchmark's name for `inputs`

    def describe(self) -> str:
        """The start-of-run summary of the task (after the image size)."""
        return f"chance {self.chance:.1%}"

    @classmethod
    def table_label(cls, config: PretrainConfig) -> str:
        """Its name in tables, with the settings that tell its variants apart."""
        return cls.label or cls.name

    def pictures(self, source: Source, device: torch.device) -> Pictures | None:
        """What to draw at every checkpoint; None: nothing."""
        return None
