"""Batch-norm statistics for the monitors (train/evaluation/batch_norm.py): recalibration on a copy, and scoring with
each batch's own statistics without touching the running ones."""

from __future__ import annotations

import torch
from torch import nn

from model.resnet_cifar import resnet8
from train.evaluation.batch_norm import batch_statistics, recalibrate_batch_norm


def test_batch_norm_recalibration_changes_only_the_running_statistics() -> None:
    torch.manual_seed(0)
    model = resnet8(width=0.25)
    for module in model.modules():  # statistics far from what the images give
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(5.0)
            module.running_var.fill_(9.0)
            module.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    recalibrate_batch_norm(model, images, 8, lambda x: x.float() / 255)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    first = model.stem[1]  # the first norm sees the stem convolution's output: its stats are the batch's
    with torch.no_grad():
        features = model.stem[0](images.float() / 255)
    torch.testing.assert_close(first.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_batch_statistics_score_as_training_does_and_leave_the_running_statistics() -> None:
    torch.manual_seed(0)
    model = resnet8(width=0.25)
    for module in model.modules():  # stale statistics, as after a few steps
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(5.0)
            module.running_var.fill_(1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        stale = model.eval().forward_features(images)
        with batch_statistics(model):
            own = model.forward_features(images)
        in_training = model.train().forward_features(images)  # what training computes (it updates the stats)
    torch.testing.assert_close(own, in_training)
    assert not torch.allclose(own, stale)
    model.load_state_dict(before)
    with torch.no_grad(), batch_statistics(model.eval()):
        model.forward_features(images)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and "forward" not in vars(model.stem[1])  # restored
