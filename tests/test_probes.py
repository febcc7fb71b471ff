"""The standard probe (train/evaluation/probes.py): the patch grid in grid order, a frozen copy in eval mode (stored or
re-estimated batch norm) that leaves the training network as it was, both probes in every view, and the baselines
of random initialisations (mean and spread) and raw pixels, measured without touching the run's random stream."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from model.resnet_cifar import resnet8
from pipeline.data import RANDOM_INIT_STREAM, derive_seed
from train.config import MonitorSection
from train.evaluation.estimates import mean_sd
from train.evaluation.probes import ProbeMonitor, linear_probe, patch_grid


def toy_probes(inits: int, patch_side: int | None = 8) -> ProbeMonitor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 4
    images[labels == 1, 0] //= 4  # a class a probe can find: one channel darker
    settings = MonitorSection(knn_random_inits=inits, knn_k=5, batch=20)
    labelled = ((images[:24], labels[:24]), (images[24:], labels[24:]))
    return ProbeMonitor(
        lambda net: net, lambda x: x.float() / 255, labelled, settings, Accelerator(cpu=True), patch_side
    )


def build() -> nn.Module:
    return resnet8(width=0.25)


def test_the_patch_grid_is_each_images_patches_in_grid_order() -> None:
    cells = torch.arange(2 * 4 * 4).reshape(2, 1, 4, 4)  # image i, cell (r, c) holds i * 16 + 4r + c
    images = cells.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).expand(2, 3, 32, 32)
    patches = patch_grid(images, 8)
    assert patches.shape == (32, 3, 8, 8)
    assert patches[:, 0, 0, 0].tolist() == list(range(32))  # image 0's 16 patches row by row, then image 1's
    assert all(bool((patch == patch[0, 0, 0]).all()) for patch in patches)  # each patch one whole cell


def test_every_probe_view_and_protocol_is_measured_and_the_network_is_left_as_it_was() -> None:
    probes, net = toy_probes(inits=1), build()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    figures = probes.figures(net)
    keys = {f"{p}{v}_acc_{b}" for p in ("knn", "linear") for v in ("", "_grid") for b in ("stored", "reestimated")}
    assert set(figures) == keys | {f"{k}_se" for k in keys}
    assert all(0 <= figures[k] <= 1 and figures[f"{k}_se"] > 0 for k in keys)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    whole_only = toy_probes(inits=1, patch_side=None).figures(net)
    assert set(whole_only) == {k for k in figures if "_grid" not in k}
    assert {k: whole_only[k] for k in whole_only} == {k: figures[k] for k in whole_only}


def test_stored_means_eval_mode_with_the_networks_own_statistics() -> None:
    """The stored protocol's features are the eval-mode network's; re-estimating the statistics changes them."""
    probes, net = toy_probes(inits=1), build()
    for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.fill_(0.3)
    stored = probes.features(probes.frozen(net, "", "stored"), probes.test_images, "")
    with torch.no_grad():
        by_hand = net.eval().forward_features(probes.test_images.float() / 255).mean(dim=(2, 3))
    assert torch.allclose(stored, by_hand)
    reestimated = probes.features(probes.frozen(net, "", "reestimated"), probes.test_images, "")
    assert not torch.allclose(stored, reestimated)
    grid = probes.features(probes.frozen(net, "_grid", "stored"), probes.test_images, "_grid")
    assert grid.shape == (16, 16 * stored.shape[1])  # 16 patches' vectors per image, concatenated


def test_the_baselines_are_random_networks_mean_and_spread_and_the_pixels() -> None:
    probes = toy_probes(inits=3)
    baselines = probes.baselines(build, seed=11, device=torch.device("cpu"))
    each = []
    for init in range(3):  # the same networks by hand
        torch.manual_seed(derive_seed(11, RANDOM_INIT_STREAM, init))
        each.append(probes.figures(build()))
    for key in ("knn_acc_stored", "linear_grid_acc_reestimated"):
        mean, sd = mean_sd([figures[key] for figures in each])
        random = key.replace("_acc_", "_acc_random_")
        assert baselines[random] == round(mean, 5) and baselines[f"{random}_sd"] == round(sd, 5)
    assert baselines["knn_random_inits"] == 3 and baselines["knn_acc_random_stored_sd"] > 0
    assert {k: v for k, v in baselines.items() if "pixels" in k} == probes.pixels()
    state = torch.random.get_rng_state()
    probes.baselines(build, seed=11, device=torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())  # the run's own stream untouched


def test_pixels_need_no_patch_grid_view_both_probes_are_blind_to_the_permutation() -> None:
    probes = toy_probes(inits=1)
    whole = probes.score(probes.train_images.flatten(1).float(), probes.test_images.flatten(1).float())
    cut = [
        patch_grid(images, 8).reshape(len(images), -1).float() for images in (probes.train_images, probes.test_images)
    ]
    assert probes.score(*cut) == whole
    accuracy, se = probes.pixels()["knn_acc_pixels"], probes.pixels()["knn_acc_pixels_se"]
    assert (accuracy, se) == (
        round(whole["knn"][0], 5),
        round((whole["knn"][0] * (1 - whole["knn"][0]) / 16) ** 0.5, 5),
    )


def test_the_linear_probe_separates_what_is_separable() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    features = torch.randn(200, 8, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 8).float()
    accuracy, se = linear_probe(features[:100], labels[:100], features[100:], labels[100:])
    assert accuracy > 0.95 and se < 0.03
    shuffled = linear_probe(
        features[:100], labels[torch.randperm(100, generator=generator)], features[100:], labels[100:]
    )[0]
    assert shuffled < 0.5  # labels it cannot read: no better than a guess
