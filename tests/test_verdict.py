"""train/evaluation/verdict.py: the final lines judge a difference only when it exceeds twice its standard error."""

from __future__ import annotations

from train.evaluation.verdict import floor_of, verdict_lines

FLOOR = {"knn_acc_random": 0.40, "knn_acc_random_sd": 0.02, "knn_random_inits": 3, "knn_acc_pixels": 0.7}


def last(clean: float | None = 0.60, knn: float | None = 0.55) -> dict:
    record = {"step": 200, "loss": 1.1, "patch_acc": 0.62}
    if clean is not None:
        record |= {"clean_patch_acc": clean, "clean_patch_acc_se": 0.01}
    if knn is not None:
        record |= {"knn_acc": knn, "knn_acc_se": 0.015}
    return record


def test_a_learned_pretext_and_a_clear_kNN_gain() -> None:
    pretext, features, verdict = verdict_lines(last(), FLOOR, "patch_acc", 0.25)
    assert "clean patch_acc 60.0 ± 1.0 % vs chance 25.0 % (+35.0 points, above chance)" in pretext
    assert "kNN 55.0 ± 1.5 % vs random networks 40.0 ± 2.0 % (sd over 3); raw pixels 70.0 %" in features
    assert features.endswith("+15.0 points (± 2.5)")
    assert verdict == "verdict: the features beat a random network's by 15.0 points"


def test_a_gain_inside_the_floors_spread_is_no_gain() -> None:
    _, _, verdict = verdict_lines(last(knn=0.44), FLOOR, "patch_acc", 0.25)  # +4 points, error 2.5: < 2 errors
    assert verdict == "verdict: no measurable gain over a random network's features"
    _, _, worse = verdict_lines(last(knn=0.30), FLOOR, "patch_acc", 0.25)
    assert worse == "verdict: the features are worse than a random network's by 10.0 points"


def test_chance_level_pretext_and_missing_figures_are_said() -> None:
    pretext, _, verdict = verdict_lines(last(clean=0.26), FLOOR, "patch_acc", 0.25)
    assert "not clearly above chance" in pretext and verdict.endswith("(and the pretext task is not clearly learned)")
    pretext, features, verdict = verdict_lines(last(clean=None, knn=None), {}, "patch_acc", 0.25)
    assert "no clean figure" in pretext and "no kNN figure" in features
    assert verdict == "verdict: pretext task not measured on clean images; the features' worth is not measured"
    _, _, verdict = verdict_lines(last(clean=0.26, knn=None), FLOOR, "patch_acc", 0.25)
    assert verdict == "verdict: pretext task not learned beyond chance; the features' worth is not measured"


def test_the_floor_is_read_from_the_log_a_resumed_run_continues() -> None:
    records = [{"step": 0, **FLOOR}, {"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9}]
    assert floor_of(records) == FLOOR and floor_of(records[1:]) == {}
