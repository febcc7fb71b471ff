"""What a finished pretraining run showed, in words, for its last lines: is the pretext learned (clean
accuracy against chance), do the features beat a random network's (kNN against the floor), and a verdict.

A difference counts only when it is larger than twice its standard error: the clean accuracy's own error
against chance; for the kNN gain, the kNN figure's error and the floor's spread over initialisations
together (sqrt(se^2 + sd^2)). Without those figures (monitors off, or not yet measured) the lines say what
is missing instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SIGNIFICANT = 2.0  # a difference counts when it exceeds this many of its standard errors
FLOOR_KEYS = ("knn_acc_random", "knn_acc_random_sd", "knn_random_inits", "knn_acc_pixels", "knn_acc_pixels_se")


def floor_of(records: Iterable[dict]) -> dict:
    """The newest step-0 baseline record of a log (a resumed run measured it in its first invocation)."""
    found: dict = {}
    for record in records:
        if "knn_acc_random" in record:
            found = {key: record[key] for key in FLOOR_KEYS if key in record}
    return found


def points(value: float) -> str:
    return f"{100 * value:.1f}"


def pretext_line(last: dict, metric: str, chance: float) -> tuple[str, bool | None]:
    """(the line, whether the pretext is learned; None when the clean figure is missing)."""
    clean, se = last.get(f"clean_{metric}"), last.get(f"clean_{metric}_se")
    if clean is None:
        return (
            f"pretext: training {metric} {points(last[metric])} % vs chance {points(chance)} % (no clean figure)",
            None,
        )
    margin = clean - chance
    learned = se is not None and margin > SIGNIFICANT * se
    error = f" ± {points(se)}" if se is not None else ""
    judged = "above chance" if learned else "not clearly above chance"
    return (
        f"pretext: clean {metric} {points(clean)}{error} % vs chance {points(chance)} % "
        f"({margin * 100:+.1f} points, {judged})",
        learned,
    )


def features_line(last: dict, floor: dict) -> tuple[str, float | None]:
    """(the line, the kNN gain over the random floor when it is significant either way, else 0; None when
    the figures are missing)."""
    knn, se = last.get("knn_acc"), last.get("knn_acc_se")
    if knn is None or "knn_acc_random" not in floor:
        return "features: no kNN figure and floor to judge them by (monitor.knn off, or unlabelled data)", None
    mean, sd = floor["knn_acc_random"], floor.get("knn_acc_random_sd") or 0.0
    gain = knn - mean
    error = math.sqrt((se or 0.0) ** 2 + sd**2)
    pixels = floor.get("knn_acc_pixels")
    raw = f"; raw pixels {points(pixels)} %" if pixels is not None else ""
    line = (
        f"features: kNN {points(knn)} ± {points(se or 0.0)} % vs random networks {points(mean)} ± {points(sd)} % "
        f"(sd over {floor.get('knn_random_inits', '?')}){raw}: {gain * 100:+.1f} points (± {points(error)})"
    )
    return line, gain if abs(gain) > SIGNIFICANT * error else 0.0


def verdict_lines(last: dict, floor: dict, metric: str, chance: float) -> list[str]:
    """The pretext line, the features line and the verdict (see the module docstring)."""
    pretext, learned = pretext_line(last, metric, chance)
    features, gain = features_line(last, floor)
    if gain is None:
        verdict = {True: "pretext task learned", False: "pretext task not learned beyond chance"}.get(
            learned, "pretext task not measured on clean images"
        )
        verdict += "; the features' worth is not measured"
    elif gain > 0:
        verdict = f"the features beat a random network's by {gain * 100:.1f} points"
    elif gain < 0:
        verdict = f"the features are worse than a random network's by {-gain * 100:.1f} points"
    else:
        verdict = "no measurable gain over a random network's features"
    if gain is not None and learned is False:
        verdict += " (and the pretext task is not clearly learned)"
    return [pretext, features, f"verdict: {verdict}"]
