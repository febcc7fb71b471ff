"""Batch norm over the global batch of several processes (distributed.sync_bn).

On CUDA it is torch's own `SyncBatchNorm`. torch's runs on accelerators only, so on CPU processes (the gloo
backend: tests, CPU clusters) `GlobalBatchNorm2d` does the same: per channel, the sum and the sum of squares
of every rank's batch are all-reduced (a differentiable all-reduce, so the gradient flows through the
global statistics as in one large batch), then each rank normalises its own part with them. The running
statistics follow, updated with the global batch's unbiased variance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        local = torch.cat([x.float().sum(dim=(0, 2, 3)), x.float().square().sum(dim=(0, 2, 3)), count])
        total = dist_functional.all_reduce(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def synchronise_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm2d computing global-batch statistics (same parameters, same state-dict
    names, so checkpoints move between synchronised and per-rank runs)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)  # fmt: skip
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            synchronise_batch_norm(child, device)
    return model
