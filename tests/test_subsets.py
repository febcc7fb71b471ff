import numpy as np
import pytest

from pipeline.data import DataError
from pipeline.subsets import SubsetSource, class_quotas, select_labeled_subset

BALANCED = np.repeat(np.arange(10), 500)  # 10 classes x 500, like a small CIFAR-10
UNBALANCED = np.repeat(np.arange(4), [7, 13, 29, 51])


def test_quotas_are_exact_and_proportional() -> None:
    assert class_quotas(np.full(10, 5000), 0.08).tolist() == [400] * 10  # the paper's CIFAR-10 4,000
    quotas = class_quotas(np.array([7, 13, 29, 51]), 0.25)  # exact shares 1.75, 3.25, 7.25, 12.75
    assert quotas.sum() == 25 and quotas.tolist() == [2, 3, 7, 13]
    assert class_quotas(np.array([7, 13, 29, 51]), 1.0).tolist() == [7, 13, 29, 51]
    for fraction in (0.01, 0.05, 0.1, 0.2, 0.37):
        assert class_quotas(np.array([7, 13, 29, 51]), fraction).sum() == round(fraction * 100)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        select_labeled_subset(BALANCED, seed=0, fraction=fraction)


@pytest.mark.parametrize("labels", [BALANCED, UNBALANCED], ids=["balanced", "unbalanced"])
def test_subsets_are_stratified_exact_and_deterministic(labels: np.ndarray) -> None:
    counts = np.bincount(labels)
    for fraction in (0.05, 0.1, 0.2, 1.0):
        subset = select_labeled_subset(labels, seed=3, fraction=fraction)
        assert len(subset) == round(fraction * len(labels)) and len(np.unique(subset)) == len(subset)
        assert np.bincount(labels[subset], minlength=len(counts)).tolist() == class_quotas(counts, fraction).tolist()
        assert np.array_equal(subset, select_labeled_subset(labels.copy(), seed=3, fraction=fraction))
    assert not np.array_equal(
        select_labeled_subset(labels, seed=3, fraction=0.2), select_labeled_subset(labels, seed=4, fraction=0.2)
    )


def test_smaller_subsets_of_one_seed_are_nested() -> None:
    small, large = (set(select_labeled_subset(BALANCED, seed=1, fraction=f).tolist()) for f in (0.05, 0.2))
    assert small < large


def test_per_class_takes_exactly_that_many_and_names_a_short_class() -> None:
    subset = select_labeled_subset(BALANCED, seed=0, per_class=60)
    assert np.bincount(BALANCED[subset]).tolist() == [60] * 10
    with pytest.raises(DataError, match="class 'c0' has 7 training images, fewer than --per-class 8"):
        select_labeled_subset(UNBALANCED, seed=0, per_class=8, class_names=["c0", "c1", "c2", "c3"])


def test_subset_source_maps_indices_labels_and_names() -> None:
    class Fake:
        labels = UNBALANCED
        classes = ["a", "b", "c", "d"]
        root = "fake"

        def name(self, index: int) -> str:
            return f"file{index}"

        def load(self, index: int) -> int:
            return index

    indices = np.array([3, 50, 99])
    view = SubsetSource(Fake(), indices)
    assert len(view) == 3 and view.labels.tolist() == UNBALANCED[indices].tolist()
    assert view.name(1) == "file50" and view.load(2) == 99 and view.classes == Fake.classes


def test_the_holdout_split_is_stratified_exact_disjoint_and_fixed() -> None:
    from pipeline.subsets import holdout_split

    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    pool, held = holdout_split(labels, 0.1)
    assert len(held) == 20 and np.bincount(labels[held]).tolist() == [5, 3, 2, 10]
    assert not set(pool) & set(held) and len(pool) + len(held) == len(labels)
    again_pool, again_held = holdout_split(labels, 0.1)
    assert np.array_equal(held, again_held) and np.array_equal(pool, again_pool)  # whatever the run's seed


def test_the_validation_carve_is_stratified_inside_the_subset_and_leaves_every_class_to_train() -> None:
    from pipeline.subsets import carve_validation, validation_quotas

    labels = np.repeat(np.arange(4), [500, 300, 200, 1000])
    subset = select_labeled_subset(labels, seed=2, fraction=0.05)  # 100 images: 25, 15, 10, 50
    kept, held = carve_validation(labels[subset], seed=2, fraction=0.1)
    train, validation = subset[kept], subset[held]
    # 10 % stratified: 2.5, 1.5, 1, 5 by largest remainder, a tie to the lower class
    assert np.bincount(labels[validation]).tolist() == [3, 1, 1, 5]
    assert not set(train) & set(validation) and set(train) | set(validation) == set(subset)  # a split of the subset
    assert np.bincount(labels[train]).min() >= 1
    again = carve_validation(labels[subset], seed=2, fraction=0.1)
    assert np.array_equal(again[1], held) and not np.array_equal(carve_validation(labels[subset], 3, 0.1)[1], held)
    # a class too small for 10 % still gives one image to validation and keeps one to train on
    assert validation_quotas(np.array([2, 3, 40]), 0.1).tolist() == [1, 1, 4]
    with pytest.raises(ValueError, match="needs 2 images"):
        validation_quotas(np.array([1, 30]), 0.1)
