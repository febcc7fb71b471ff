"""The kNN of the standard probe (train/evaluation/knn.py): kNN on known answers and the stratified sets (the probe
itself: tests/test_probes.py)."""

from __future__ import annotations

import numpy as np
import torch

from train.evaluation.knn import knn_predict, stratified_indices


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


def test_stratified_indices_take_as_many_of_every_class_spread_over_it() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
    picks = stratified_indices(labels, 30)
    assert np.bincount(labels[list(picks)]).tolist() == [10, 10, 5]  # class 2 has only 5
    assert len(set(picks)) == len(picks) and picks[0] == 0 and 49 in picks  # spread to both ends of class 0
    assert len(stratified_indices(labels, 2)) == 3  # at least one of each class
