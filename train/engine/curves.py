"""Training curves of a run from its log.jsonl.

    python train/engine/curves.py RUN_DIR        # (re)draw RUN_DIR/curves.png from RUN_DIR/log.jsonl

The loop draws curves.png at every checkpoint. Each panel draws whatever keys the log holds of its kind,
so a method's own metrics (its `metric`, and any other `*_acc` or `*_loss` key) appear without being
named here. The pictures of what a model does are the methods' own (train/methods/, train/methods/pictures.py).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

from pipeline.atomic import write_atomic

CHANCE_KEY = "chance_acc"  # drawn dashed: the level a metric reaches by guessing
LOSS_HEADROOM = 3.0  # the loss panel spans the training loss's range widened by this factor each way
# Baselines measured once (knn_acc_random, knn_acc_pixels): drawn as dotted lines across the panel.
FLOOR_SUFFIXES = ("_random", "_pixels")
# A key's standard error (key + "_se") is drawn as a band around it; a floor's spread ("_sd") too.
ERROR_SUFFIXES = ("_se", "_sd")
# Panels of the curves figure: title and which log keys it draws.
CURVE_PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda key: key == "loss" or key.endswith("_loss")),
    ("accuracy", lambda key: key.endswith("_acc") or key.endswith(tuple("_acc" + s for s in FLOOR_SUFFIXES))),
    ("learning rate", lambda key: key == "lr"),
    ("images/s", lambda key: key == "images_per_s"),
)


def pyplot():
    """matplotlib's pyplot on its file-only backend, imported when a figure is first drawn: the import is
    0.7 s of every command's start-up, which a run refused at parse time should not wait for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> list[dict]:
    """The step records of a log.jsonl (events such as skipped images left out)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else {}
        except ValueError:  # a line cut short by a kill: the resume drops it; here it is skipped
            continue
        if "event" not in record and "step" in record:
            records.append(record)
    return records


def loss_limits(records: list[dict], keys: list[str]) -> tuple[float, float] | None:
    """The loss panel's y range (log scale): everything the training loss does, with headroom, and the other
    losses as far as they fit. An early monitor loss of thousands (eval-mode batch norm after a few steps)
    would otherwise flatten the training loss into the bottom pixel row."""
    values = [r[key] for r in records for key in keys if key in r and math.isfinite(r[key]) and r[key] > 0]
    training = [r["loss"] for r in records if "loss" in r and math.isfinite(r["loss"]) and r["loss"] > 0]
    if not values:
        return None
    top = max(training) * LOSS_HEADROOM if training else max(values)
    return min(values) / LOSS_HEADROOM, min(max(values) * LOSS_HEADROOM, top)


def _error_of(record: dict, key: str) -> float | None:
    return next((record[key + s] for s in ERROR_SUFFIXES if record.get(key + s) is not None), None)


def _draw(ax, records: list[dict], keys: list[str], name: str) -> None:
    limits = loss_limits(records, keys) if name == "loss" else None
    clipped = False
    for key in keys:
        points = [(r["step"], r[key], _error_of(r, key)) for r in records if r.get(key) is not None]
        if not points:
            continue
        if key.endswith(FLOOR_SUFFIXES):
            _, level, error = points[-1]
            line = ax.axhline(level, linestyle=":", color="black" if key.endswith("_random") else "brown", label=key)
            if error:
                ax.axhspan(level - error, level + error, color=line.get_color(), alpha=0.1)
            continue
        style = {"linestyle": "--", "color": "grey"} if key == CHANCE_KEY else {}
        marker = "o" if key.startswith(("test_", "knn_")) else None  # evaluated rarely: a point may stand alone
        steps, values, errors = zip(*points, strict=True)
        if limits:  # points above the range sit on its top edge, drawn as up-triangles
            values = tuple(min(value, limits[1]) for value in values)
            off = [(step, value) for step, value in zip(steps, values, strict=True) if value >= limits[1]]
            clipped |= bool(off)
            if off:
                ax.plot(*zip(*off, strict=True), linestyle="none", marker="^", color="black", markersize=5)
        (line,) = ax.plot(steps, values, label=key, marker=marker, markersize=3, **style)
        if all(e is not None for e in errors):
            floor = limits[0] if limits else -math.inf  # a band below zero has no place on a log scale
            low = [max(v - e, floor) for v, e in zip(values, errors, strict=True)]
            high = [v + e for v, e in zip(values, errors, strict=True)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    if limits:
        ax.set_yscale("log")
        ax.set_ylim(*limits)
        name += " (log scale; ▲ above it)" if clipped else " (log scale)"
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=8)


def matplotlib_missing() -> bool:
    """Whether matplotlib cannot be imported here (a GPU machine may lack it): the curves are then skipped,
    said once per process, and the run goes on."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        if not _SKIP_SAID:
            print(f"note: no curves.png ({error}): matplotlib is needed to draw them", flush=True)
            _SKIP_SAID.append(True)
        return True
    return False


_SKIP_SAID: list[bool] = []  # the skip was said in this process


def plot_curves(log_path: Path, png_path: Path, title: str = "") -> None:
    """Draw every panel of `CURVE_PANELS` that the log has data for, against the step; atomic write.
    Nothing (and one line, once) where matplotlib is missing."""
    if matplotlib_missing():
        return
    figure = curves_figure(read_log(log_path), title)
    if figure is None:
        return
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(png_path, buffer.getvalue())


def curves_figure(records: list[dict], title: str = ""):
    """The curves figure of these log records (None when they hold nothing to draw)."""
    present = list(dict.fromkeys(key for r in records for key in r if key != "step"))
    panels = [(name, [k for k in present if wanted(k)]) for name, wanted in CURVE_PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    figure, axes = pyplot().subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        _draw(ax, records, keys, name)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
