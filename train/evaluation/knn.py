"""The kNN classifier of the standard probe (train/evaluation/probes.py): a weighted cosine kNN (k
neighbours, votes exp(similarity / T), as solo-learn and DINO do), and the stratified choice of the
labelled images it is fitted on and scored on (as many images of every class, spread over each class).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """Labels of `test_features` by their k nearest training features (cosine), each neighbour voting
    exp(similarity / temperature)."""
    train, test = F.normalize(train_features.float(), dim=1), F.normalize(test_features.float(), dim=1)
    classes = int(train_labels.max()) + 1
    similarity, neighbours = (test @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), classes, device=test.device)
    votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
    return votes.argmax(dim=1)
