"""The optimizer and learning-rate schedule both stages use: Nesterov SGD (Selfie §3.2, the default),
LARS or AdamW; a linear warm-up, then cosine decay; the linear scaling rule for `optim.base_lr`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from train.config import OptimSection
from train.config.checks import check_graphable
from train.config.learning_rate import SCALING_BATCH, peak_lr

NO_DECAY_NAMES = ("position", "u0")  # learned embeddings and the pooling token


def implementation_flags(implementation: str, device: torch.device) -> dict[str, bool | None]:
    """torch.optim's `fused`/`foreach` arguments for `optim.implementation` on `device`."""
    if implementation == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def parameter_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """[decayed conv/linear weights, everything else] (everything decayed with `optim.decay_all`). The
    second group is what LARS leaves unadapted: norm scales, biases, embeddings, u0."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix_weight = param.ndim > 1 and not any(part in name for part in NO_DECAY_NAMES)
        (decay if optim.decay_all or is_matrix_weight else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": optim.weight_decay, "adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "adapt": False},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017): each adapted parameter's update is
    scaled by eta x |w| / |g + wd w| (1 where either norm is zero); groups with adapt=False take plain
    momentum SGD. The trust ratio is computed on the device, with no host sync (graph-capturable)."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool, eta: float) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "eta": eta, "weight_decay": 0.0}
        super().__init__(params, defaults | {"adapt": True})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad.clone()
        if group["adapt"]:
            weight_norm, grad_norm = param.norm(), grad.norm()
            trust = torch.where((weight_norm > 0) & (grad_norm > 0), group["eta"] * weight_norm / grad_norm, 1.0)
            grad.mul_(trust)
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        update = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
        param.sub_(update * group["lr"])


def build_optimizer(
    model: torch.nn.Module,
    optim: OptimSection,
    device: torch.device | str = "cpu",
    global_batch: int = SCALING_BATCH,
    cuda_graph: bool = False,
) -> torch.optim.Optimizer:
    """`optim.name`'s optimizer for parameters that will train on `device`, at the peak lr for `global_batch`.
    For a graphed step (`cuda_graph`), AdamW keeps its step count and tensor lr on the device
    (`capturable`): without it the fused AdamW step fails at capture."""
    check_graphable(optim, cuda_graph)
    groups, lr = parameter_groups(model, optim), peak_lr(optim, global_batch)
    flags = implementation_flags(optim.implementation, torch.device(device))
    if optim.name == "lars":
        return LARS(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, eta=optim.lars_eta)
    for group in groups:
        del group["adapt"]
    if optim.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=optim.betas, **flags, **({"capturable": True} if cuda_graph else {})
        )
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, **flags)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr multiplier: linear from 1/warmup up to 1 over `warmup_steps`, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimSection, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim.warmup_steps, steps))
