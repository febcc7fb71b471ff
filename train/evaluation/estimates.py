"""Standard errors of the monitors' figures, so a difference can be told from noise."""

from __future__ import annotations

import math
from collections.abc import Sequence


def binomial_se(accuracy: float, count: int) -> float:
    """Standard error of an accuracy measured on `count` independent items."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(count, 1))


def weighted_mean_se(values: Sequence[float], weights: Sequence[float]) -> tuple[float, float | None]:
    """(weighted mean, its standard error) of per-group values, the groups independent (the ratio
    estimator's error over groups of any size; with equal weights, sd / sqrt(groups)). The error is None
    with fewer than two groups: one group cannot show its own spread."""
    total = sum(weights)
    mean = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    groups = len(values)
    if groups < 2:
        return mean, None
    spread = sum((w / total) ** 2 * (v - mean) ** 2 for v, w in zip(values, weights, strict=True))
    return mean, math.sqrt(spread * groups / (groups - 1))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
