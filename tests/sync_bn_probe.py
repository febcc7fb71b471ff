"""Run by tests/test_training_options.py under `torchrun --nproc_per_node 2` (gloo, CPU): each rank runs a
batch-norm network, synchronised (model/sync_batch_norm.py), on its half of one fixed batch, and saves its
output, its gradients and the running statistics; `reference` is the same network on the whole batch in
one process."""

import os
import sys
from pathlib import Path

import torch
from torch import nn

BATCH = 8


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def batch() -> torch.Tensor:
    return torch.randn(BATCH, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> dict:
    out = model(x)
    out.square().sum().backward()
    norm = model[1]
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"out": out.detach(), "grads": grads, "running_mean": norm.running_mean, "running_var": norm.running_var}


def reference() -> dict:
    return run(network(), batch())


if __name__ == "__main__":
    import torch.distributed as dist

    from model.sync_batch_norm import synchronise_batch_norm

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = synchronise_batch_norm(network(), torch.device("cpu"))
    half = batch().chunk(world)[rank]
    torch.save(run(model, half), Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.destroy_process_group()
    assert os.environ["WORLD_SIZE"] == str(world)
