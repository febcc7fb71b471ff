"""The kNN monitor: can the backbone's features of whole images tell the classes apart, better than a
randomly initialised network's and better than the raw pixels?

The backbone's pooled features (what fine-tuning reuses), on a copy whose batch-norm statistics are first
recalibrated on the fit images, go into a weighted cosine kNN (k neighbours, votes exp(similarity / T), as
solo-learn and DINO do) fitted on labelled training images and scored on held-out ones. Features are
centred on the fit set's mean first: pooled ReLU features share a large common component (mean pairwise
cosine 0.92-0.96 measured), which otherwise dominates every cosine. Both sets are stratified (as many
images of every class, spread over each class). Every accuracy comes with its standard error; the floor
(random initialisations) with its spread over several of them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import RANDOM_INIT_STREAM, derive_seed
from train.evaluation.batch_norm import chunks, recalibrate_batch_norm
from train.evaluation.estimates import binomial_se, mean_sd


def stratified_indices(labels: np.ndarray, count: int) -> tuple[int, ...]:
    """About `count` indices with the same number per class (at least one; fewer where a class has fewer
    images), each class's picks spread evenly over its images."""
    classes = np.unique(labels)
    per_class = max(1, count // max(len(classes), 1))
    picks: list[int] = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        take = min(per_class, len(members))
        picks += members[np.linspace(0, len(members) - 1, take).round().astype(int)].tolist()
    return tuple(sorted(picks))


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    temperature: float,
    centre: bool = False,
) -> torch.Tensor:
    """Labels of `test_features` by their k nearest training features (cosine), each neighbour voting
    exp(similarity / temperature). `centre`: both sets first shifted by the training features' mean."""
    train, test = train_features.float(), test_features.float()
    if centre:
        mean = train.mean(dim=0, keepdim=True)
        train, test = train - mean, test - mean
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes = int(train_labels.max()) + 1
    similarity, neighbours = (test @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), classes, device=test.device)
    votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
    return votes.argmax(dim=1)


@dataclass(frozen=True)
class KnnBaselines:
    """What a pretrained network's kNN accuracy is judged against, measured once at a run's start."""

    random_mean: float  # kNN accuracy of freshly initialised networks of the run's kind, over `inits`
    random_sd: float  # their spread (sample standard deviation)
    inits: int
    pixels: float  # kNN accuracy of the raw pixels (centred, cosine)
    pixels_se: float

    def record(self) -> dict[str, float]:
        return {
            "knn_acc_random": round(self.random_mean, 5),
            "knn_acc_random_sd": round(self.random_sd, 5),
            "knn_random_inits": self.inits,
            "knn_acc_pixels": round(self.pixels, 5),
            "knn_acc_pixels_se": round(self.pixels_se, 5),
        }


class KnnMonitor:
    """kNN accuracy of a network's backbone features (see the module docstring)."""

    def __init__(
        self, backbone_of: Callable, prepare: Callable, train: tuple, test: tuple, settings, accelerator
    ) -> None:
        self.backbone_of, self.prepare = backbone_of, prepare
        (self.train_images, self.train_labels), (self.test_images, self.test_labels) = train, test
        self.settings, self.accelerator = settings, accelerator

    @torch.no_grad()
    def features(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            parts = [
                backbone.forward_features(self.prepare(x)).mean(dim=(2, 3)).float()
                for x in chunks(images, self.settings.batch)
            ]
        return torch.cat(parts)

    def score(self, train: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
        """(accuracy, its standard error) of the kNN fitted on `train` features, scored on `test`'s."""
        s = self.settings
        predicted = knn_predict(train, self.train_labels, test, s.knn_k, s.knn_temperature, centre=True)
        accuracy = float((predicted == self.test_labels).float().mean())
        return accuracy, binomial_se(accuracy, len(self.test_labels))

    def accuracy(self, net: nn.Module) -> tuple[float, float]:
        """(kNN test accuracy, standard error) of `net`'s backbone, on a recalibrated copy (the training
        model is untouched)."""
        backbone = copy.deepcopy(self.backbone_of(net))
        recalibrate_batch_norm(backbone, self.train_images, self.settings.batch, self.prepare)
        return self.score(self.features(backbone, self.train_images), self.features(backbone, self.test_images))

    def pixels(self) -> tuple[float, float]:
        """(kNN accuracy, standard error) on the raw pixels of the same images."""
        return self.score(self.train_images.flatten(1).float(), self.test_images.flatten(1).float())

    def baselines(self, build: Callable[[], nn.Module], seed: int, device: torch.device) -> KnnBaselines:
        """The random floor over `monitor.knn_random_inits` initialisations and the raw-pixel kNN. Each
        network is built under its own seed inside a forked RNG, so the run's random streams are untouched."""
        devices = [device] if device.type == "cuda" else []
        floors = []
        for init in range(self.settings.knn_random_inits):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed(seed, RANDOM_INIT_STREAM, init))
                random_net = build().to(device)
            floors.append(self.accuracy(random_net)[0])
        mean, sd = mean_sd(floors)
        return KnnBaselines(mean, sd, len(floors), *self.pixels())
