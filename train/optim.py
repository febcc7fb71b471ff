"""The optimizer and learning-rate schedule both stages use (Selfie §3.2: Nesterov SGD, warm-up, cosine)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from train.config import OptimConfig

NO_DECAY_NAMES = ("position", "u0")  # learned embeddings and the pooling token


def implementation_flags(implementation: str, device: torch.device) -> dict[str, bool | None]:
    """torch.optim's `fused`/`foreach` arguments for `optim.implementation` on `device`."""
    if implementation == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def build_sgd(model: torch.nn.Module, optim: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.SGD:
    """Nesterov SGD for parameters that will train on `device`. Weight decay on conv/linear weights only,
    unless `optim.decay_all` (L2 on everything)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix_weight = param.ndim > 1 and not any(part in name for part in NO_DECAY_NAMES)
        (decay if optim.decay_all or is_matrix_weight else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    flags = implementation_flags(optim.implementation, torch.device(device))
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, **flags)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr multiplier: linear from 1/warmup up to 1 over `warmup_steps`, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim.warmup_steps, steps))
