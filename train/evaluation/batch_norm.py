"""Batch-norm statistics that fit the model being measured.

A monitor scores the training model between steps. Its running statistics lag behind its weights (an
average over past steps, with momentum 0.1; after ten steps they are mostly the initial ones), so in eval
mode an early model is scored on statistics it never had: a clean loss of 2,143 (demo) or 8.9e6
(Fashion-MNIST) at step 10. Two remedies, each where it fits:

- `batch_statistics`: normalise every batch with its own statistics, as the training forward does; one
  forward, nothing recalibrated, the running statistics untouched. The clean pretext metric uses it: it
  scores what the training loss optimises, on batches of fixed size (`monitor.clean_chunk`).
- `recalibrate_batch_norm`: re-estimate the running statistics on a copy, from whole images (the kNN
  monitor and linear probes, whose inputs, whole images, are not what pretraining normalised: patches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def chunks(tensor: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [tensor[start : start + size] for start in range(0, len(tensor), size)]


def _norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _own_statistics(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[nn.Module]:
    """Inside it, every batch norm of `module` normalises with the statistics of the batch it is given,
    whatever the module's mode; its running statistics are neither read nor written, and a synchronised
    batch norm does not wait for other processes (a monitor runs on rank 0 alone)."""
    norms = _norms(module)
    for norm in norms:
        norm.forward = lambda x, norm=norm: _own_statistics(norm, x)
    try:
        yield module
    finally:
        for norm in norms:
            del norm.forward


@torch.no_grad()
def recalibrate_batch_norm(module: nn.Module, images: torch.Tensor, batch: int, prepare: Callable) -> nn.Module:
    """Re-estimate every batch-norm layer's running mean and variance of `module` on `images` (a cumulative
    average over the batches, in train mode); its weights and every other buffer stay as they were.
    `prepare` turns uint8 images into the module's input. Returns `module` in eval mode."""
    norms = _norms(module)
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms if m.track_running_stats]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches
    module.train()
    for images_chunk in chunks(images, batch):
        module.forward_features(prepare(images_chunk))
    for norm, (momentum, tracked) in zip([m for m in norms if m.track_running_stats], saved, strict=True):
        norm.momentum = momentum
        norm.num_batches_tracked.copy_(tracked)
    return module.eval()
