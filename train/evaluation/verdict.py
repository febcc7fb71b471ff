"""What a finished pretraining run showed, in words, for its last lines: is the pretext learned (clean
accuracy against chance), are the features better than the strongest simple baseline, and a verdict.

Every probe of the features (kNN and linear, on whole images and, for a patch network, on its patch grid:
train/evaluation/probes.py) is judged against the strongest of three baselines under the same probe and
view: the raw pixels, random networks with their batch norm as stored, random networks with it
re-estimated. The features are above, level with or below it; a difference counts only when it is larger
than twice its standard error: the features' own and the baseline's together (sqrt(se^2 + e^2), e the
pixels' standard error or the random networks' spread over initialisations). The clean accuracy is judged
against chance by its own error. Without those figures (monitors off, or not yet measured) the lines say
what is missing instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from train.evaluation.probes import BN_PROTOCOLS, GRID, PROTOCOL_NAMES, VIEW_NAMES, acc_key, pixels_key, random_key

SIGNIFICANT = 2.0  # a difference counts when it exceeds this many of its standard errors
PROBE_NAMES = {"knn": "kNN", "linear": "linear probe"}
HOW = {"": "", GRID: " (each patch embedded as in pretraining, the vectors concatenated in grid order)"}


def floor_of(records: Iterable[dict]) -> dict:
    """The newest step-0 baseline record of a log (a resumed run measured it in its first invocation)."""
    found: dict = {}
    for record in records:
        if "knn_random_inits" in record:
            found = {key: value for key, value in record.items() if key != "step"}
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


def baselines(floor: dict, probe: str, view: str) -> list[tuple[str, float, float]]:
    """(name, accuracy, its error) of every baseline `floor` holds for `probe` on `view`, the pixels first."""
    found = []
    if pixels_key(probe) in floor:
        found.append(("raw pixels", floor[pixels_key(probe)], floor.get(f"{pixels_key(probe)}_se") or 0.0))
    for protocol in BN_PROTOCOLS:
        key = random_key(probe, view, protocol)
        if key in floor:
            found.append((f"random networks ({PROTOCOL_NAMES[protocol]})", floor[key], floor.get(f"{key}_sd") or 0.0))
    return found


@dataclass(frozen=True)
class Judgement:
    """One probe of the features against its strongest baseline."""

    probe: str
    view: str
    baseline: str  # the strongest baseline's name
    gain: float  # the features' accuracy minus the baseline's
    error: float  # the difference's standard error

    @property
    def standing(self) -> str:
        if abs(self.gain) <= SIGNIFICANT * self.error:
            return "level with"
        return "above" if self.gain > 0 else "below"

    def words(self) -> str:
        return (
            f"{self.standing} {self.baseline} ({self.gain * 100:+.1f} points ± {points(self.error)}, "
            f"{PROBE_NAMES[self.probe]})"
        )


def features_line(last: dict, floor: dict, probe: str, view: str, protocol: str) -> tuple[str, Judgement] | None:
    """(the line, its judgement) of `probe` on `view` under `protocol`; None when a figure is missing."""
    key, candidates = acc_key(probe, view, protocol), baselines(floor, probe, view)
    if key not in last or not candidates:
        return None
    value, se = last[key], last.get(f"{key}_se") or 0.0
    name, best, best_error = max(candidates, key=lambda candidate: candidate[1])  # ties: the pixels
    error = math.sqrt(se**2 + best_error**2)
    judgement = Judgement(probe, view, name, value - best, error)
    beside = {other: acc_key(probe, view, other) for other in BN_PROTOCOLS if other != protocol}
    other = "".join(f"; {PROTOCOL_NAMES[p]} {points(last[k])} %" for p, k in beside.items() if k in last)
    listed = ", ".join(f"{n} {points(v)} ± {points(e)} %" for n, v, e in candidates)
    line = (
        f"features, {PROBE_NAMES[probe]} on the {VIEW_NAMES[view]}{HOW[view]}: {points(value)} ± {points(se)} % "
        f"({PROTOCOL_NAMES[protocol]}{other}) vs {listed}: {judgement.words()}"
    )
    return line, judgement


def headline(judgements: list[Judgement], view: str) -> Judgement | None:
    """The judgement a view's verdict names: its linear probe's, else its kNN's."""
    mine = {j.probe: j for j in judgements if j.view == view}
    return mine.get("linear") or mine.get("knn")


def judged_lines(last: dict, floor: dict, protocol: str) -> tuple[list[str], str | None]:
    """(a features line per probe and view measured, what the verdict says of them; None when nothing is
    measured): the features part of the verdict, which train.evaluate prints too."""
    found = [features_line(last, floor, probe, view, protocol) for view in ("", GRID) for probe in ("knn", "linear")]
    lines, judgements = [f[0] for f in found if f], [f[1] for f in found if f]
    if not judgements:
        return ["features: no probe figures and baselines to judge them by (monitor.knn off, or unlabelled data)"], None
    parts = [
        f"on the {VIEW_NAMES[view]} the features are {judgement.words()}"
        for view in ("", GRID)
        if (judgement := headline(judgements, view)) is not None
    ]
    return lines, "; ".join(parts)


def verdict_lines(last: dict, floor: dict, metric: str, chance: float, protocol: str = BN_PROTOCOLS[0]) -> list[str]:
    """The pretext line, a features line per probe and view measured, and the verdict (see the module
    docstring); `protocol` is the batch-norm protocol the features are judged under (monitor.bn)."""
    pretext, learned = pretext_line(last, metric, chance)
    lines, verdict = judged_lines(last, floor, protocol)
    if verdict is None:
        verdict = {True: "pretext task learned", False: "pretext task not learned beyond chance"}.get(
            learned, "pretext task not measured on clean images"
        )
        verdict += "; the features' worth is not measured"
    elif learned is False:
        verdict += " (and the pretext task is not clearly learned)"
    return [pretext, *lines, f"verdict: {verdict}"]
