"""The kNN monitor (train/evaluation/knn.py): kNN on known answers, centring, stratified sets, and the floor of random
initialisations with its spread."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from model.resnet_cifar import resnet8
from pipeline.data import RANDOM_INIT_STREAM, derive_seed
from train.config import MonitorSection
from train.evaluation.estimates import mean_sd
from train.evaluation.knn import KnnMonitor, knn_predict, stratified_indices


def test_knn_on_a_toy_set_with_a_known_answer() -> None:
    """Two classes along two directions: every test point is nearest (by angle) to its own class, whatever
    its length; with k covering both classes, the closer and more similar neighbours outvote the others."""
    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [3.0, -0.1], [0.0, 1.0], [0.1, 5.0], [-0.1, 2.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = torch.tensor([[10.0, 1.0], [0.5, 7.0], [1.0, 0.9], [0.9, 1.0]])
    assert knn_predict(train, labels, test, k=1, temperature=0.07).tolist() == [0, 1, 0, 1]
    assert knn_predict(train, labels, test, k=6, temperature=0.07).tolist() == [0, 1, 0, 1]
    # One far-away neighbour of the other class cannot outvote three near ones of the right class.
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.2]]), k=4, temperature=0.5).tolist() == [0]


def test_centring_removes_a_shared_component_that_hides_the_classes() -> None:
    """Every feature = a large shared offset + a small class direction: uncentred cosines are all near 1 and
    the vote goes to the class with more (or nearer-in-length) members; centred, the directions decide."""
    offset = torch.tensor([100.0, 100.0, 0.0, 0.0])
    train = offset + torch.tensor([[0, 0, 1.0, 0]] * 2 + [[0, 0, 0, 1.0]] * 4) * torch.tensor(
        [[1], [2], [1], [2], [3], [4.0]]
    )
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    test = offset + torch.tensor([[0, 0, 1.5, 0], [0, 0, 0, 1.5]])
    assert knn_predict(train, labels, test, k=6, temperature=1.0).tolist() == [1, 1]
    assert knn_predict(train, labels, test, k=6, temperature=0.1, centre=True).tolist() == [0, 1]


def test_stratified_indices_take_as_many_of_every_class_spread_over_it() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
    picks = stratified_indices(labels, 30)
    assert np.bincount(labels[list(picks)]).tolist() == [10, 10, 5]  # class 2 has only 5
    assert len(set(picks)) == len(picks) and picks[0] == 0 and 49 in picks  # spread to both ends of class 0
    assert len(stratified_indices(labels, 2)) == 3  # at least one of each class


def toy_monitor(inits: int) -> KnnMonitor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 4
    settings = MonitorSection(knn_random_inits=inits, knn_k=5, batch=20)
    fit, scored = (images[:24], labels[:24]), (images[24:], labels[24:])
    return KnnMonitor(lambda net: net, lambda x: x.float() / 255, fit, scored, settings, Accelerator(cpu=True))


def build() -> nn.Module:
    return resnet8(width=0.25)


def test_the_floor_is_the_mean_and_spread_of_several_initialisations() -> None:
    monitor = toy_monitor(inits=3)
    baselines = monitor.baselines(build, seed=11, device=torch.device("cpu"))
    each = []
    for init in range(3):  # the same networks by hand
        torch.manual_seed(derive_seed(11, RANDOM_INIT_STREAM, init))
        each.append(monitor.accuracy(build())[0])
    mean, sd = mean_sd(each)
    assert baselines.inits == 3 and baselines.random_mean == mean and baselines.random_sd == sd
    assert len(set(each)) > 1 and sd > 0  # the initialisations differ: one draw would not show the spread
    record = baselines.record()
    assert set(record) == {
        "knn_acc_random",
        "knn_acc_random_sd",
        "knn_random_inits",
        "knn_acc_pixels",
        "knn_acc_pixels_se",
    }
    state = torch.random.get_rng_state()
    monitor.baselines(build, seed=11, device=torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())  # the run's own stream untouched


def test_the_pixel_baseline_and_standard_errors() -> None:
    monitor = toy_monitor(inits=1)
    accuracy, se = monitor.pixels()
    train, test = monitor.train_images.flatten(1).float(), monitor.test_images.flatten(1).float()
    predicted = knn_predict(train, monitor.train_labels, test, 5, monitor.settings.knn_temperature, centre=True)
    assert accuracy == float((predicted == monitor.test_labels).float().mean())
    assert se == (accuracy * (1 - accuracy) / 16) ** 0.5
