"""Labelled subsets for fine-tuning: stratified per class, exact in size, deterministic given the seed.

Each class's images are ordered by one permutation that depends only on (seed, class), and a subset takes
the first n_c of each. So the subset depends on the seed and the labels alone (never on the
initialisation being compared), and for one seed a smaller fraction's subset is contained in a larger one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data import HOLDOUT_STREAM, SUBSET_STREAM, DataError, Source, derive_seed


def class_quotas(class_counts: np.ndarray, fraction: float) -> np.ndarray:
    """Images per class for `fraction` of the whole: round(fraction * total) in all, each class
    proportional to its size (largest remainder; ties go to the lower class index)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    total = int(round(fraction * int(class_counts.sum())))
    exact = class_counts * fraction
    quotas = np.floor(exact).astype(np.int64)
    remainders = exact - quotas
    order = np.lexsort((np.arange(len(class_counts)), -remainders))  # largest remainder first
    quotas[order[: total - int(quotas.sum())]] += 1
    return quotas


def pick_per_class(labels: np.ndarray, quotas: np.ndarray, *stream: int) -> np.ndarray:
    """Sorted int64 indices into `labels`: the first `quotas[c]` of class c's images in a permutation
    seeded by (`*stream`, c), so the pick depends on the stream and the labels alone."""
    picked = []
    for label in range(len(quotas)):
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng(derive_seed(*stream, label)).permutation(len(members))
        picked.append(members[order[: quotas[label]]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def select_labeled_subset(
    labels: np.ndarray, seed: int, fraction: float = 1.0, per_class: int = 0, class_names: list[str] | None = None
) -> np.ndarray:
    """Sorted int64 indices into `labels` of the labelled subset.

    `per_class > 0` takes exactly that many images of every class; otherwise `fraction` of the images,
    stratified (see `class_quotas`). A class too small for its quota is an error that names it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=num_classes)
    if per_class < 0:
        raise ValueError(f"per-class count must be >= 0, got {per_class}")
    quotas = np.full(num_classes, per_class, dtype=np.int64) if per_class > 0 else class_quotas(counts, fraction)
    for label in np.flatnonzero(quotas > counts):
        name = class_names[label] if class_names else str(label)
        raise DataError(f"class {name!r} has {counts[label]} training images, fewer than --per-class {per_class}")
    return pick_per_class(labels, quotas, seed, SUBSET_STREAM)


def holdout_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(pool, held out): sorted indices into `labels`, `fraction` of every class held out (stratified,
    exact in total) as a validation split. Fixed whatever the run's seed, so every seed and every learning
    rate compared on it sees the same split."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    held_out = pick_per_class(labels, class_quotas(counts, fraction), HOLDOUT_STREAM)
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def validation_quotas(class_counts: np.ndarray, fraction: float) -> np.ndarray:
    """Validation images per class carved from a labelled subset of `class_counts`: `fraction` of it,
    stratified (`class_quotas`), but at least one of every class and at least one left to train on. Every
    class needs 2 images; `carve_validation`'s caller checks that first, to name the flag."""
    counts = np.asarray(class_counts, dtype=np.int64)
    if len(counts) and counts.min() < 2:
        raise ValueError(f"every class needs 2 images to carve a validation set, got {counts.min()}")
    return np.clip(class_quotas(counts, fraction), 1, counts - 1)


def carve_validation(labels: np.ndarray, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): sorted indices into `labels` (one seed's labelled subset), the validation part
    `validation_quotas` of every class. It depends on the seed and the labels alone, so every lr compared
    for one seed is scored on the same images, and they lie inside the subset the test run trains on."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    validation = pick_per_class(labels, validation_quotas(counts, fraction), seed, HOLDOUT_STREAM)
    return np.setdiff1d(np.arange(len(labels)), validation), validation


class SubsetSource:
    """A view of `source` restricted to `indices`; index i of the view is `indices[i]` of the source."""

    def __init__(self, source: Source, indices: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = source.labels[self.indices]
        self.classes = source.classes
        self.root = source.root

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))
