"""The learning rate a config gives a run: the linear scaling rule for `optim.base_lr`, its one-line
description (printed at a run's start and by --print-config), and the warning when the warm-up is longer
than the run."""

from __future__ import annotations

from train.config.schema import OptimSection

SCALING_BATCH = 256  # the linear scaling rule's reference batch: lr = base_lr x batch / 256


def peak_lr(optim: OptimSection, global_batch: int) -> float:
    """The peak learning rate a run uses: base_lr x global batch / 256 when base_lr is set, else lr."""
    return optim.base_lr * global_batch / SCALING_BATCH if optim.base_lr > 0 else optim.lr


def describe_lr(optim: OptimSection, global_batch: int) -> str:
    if optim.base_lr > 0:
        return (
            f"peak lr {peak_lr(optim, global_batch):g} (base_lr {optim.base_lr:g} x {global_batch} / {SCALING_BATCH})"
        )
    return f"peak lr {optim.lr:g}"


def warmup_warning(optim: OptimSection, steps: int) -> str | None:
    """Why the configured peak lr would never be reached, or None."""
    if optim.warmup_steps > steps:
        return (
            f"warning: optim.warmup_steps={optim.warmup_steps} is longer than the run's {steps} steps: the lr "
            f"climbs to {optim.warmup_steps and steps / optim.warmup_steps:.0%} of its peak and never reaches it"
        )
    return None
