"""Metrics of a run: per-step values averaged over a logging window and over ranks, and the rank-0
log.jsonl they are written to."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from pipeline.atomic import open_for_append


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run stops before a checkpoint could record the broken state."""


class JsonlLogger:
    """Appends one JSON object per line to `path`, on the main process only, and hands each record to
    `sink` (an experiment tracker, train/engine/tracking.py) when there is one."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.sink: Any = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open_for_append(self.path) as f:  # never through a link planted as log.jsonl
            f.write((json.dumps(record) + "\n").encode())
        if self.sink is not None:
            self.sink.record(record)


class MetricWindow:
    """Per-step metrics averaged over a logging window and over ranks, written as one log.jsonl record.

    Metrics stay on the device between records, so logging costs one reduction per window, not a
    host sync per step. `flush` is a collective: every rank must call it at the same step.
    """

    def __init__(self, accelerator: Accelerator, logger: JsonlLogger, images_per_step: int, state_hint: str) -> None:
        self.accelerator = accelerator
        self.logger = logger
        self.images_per_step = images_per_step
        self.state_hint = state_hint  # where the last good state is, for the divergence message
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.skipped: list[str] = []
        self.skipped_total = 0
        self.start = time.perf_counter()

    def add(self, skipped: tuple[str, ...] = (), **metrics: torch.Tensor) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1
        self.skipped.extend(f"rank {self.accelerator.process_index}: {entry}" for entry in skipped)

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (a test evaluation) out of images/s."""
        self.start += seconds

    def _log_skipped(self, step: int) -> None:
        """Every rank's unreadable files reach the rank-0 log."""
        skipped = gather_object(self.skipped) if self.accelerator.num_processes > 1 else self.skipped
        for entry in skipped:
            self.skipped_total += 1
            self.logger.write(
                {"event": "skipped_image", "step": step, "image": entry, "skipped_total": self.skipped_total}
            )

    def flush(self, step: int, **fields: Any) -> dict[str, Any]:
        """Write {"step", <metric means>, **fields, "images_per_s", "time"}; raise on a non-finite mean."""
        names = list(self.sums)
        means = self.accelerator.reduce(torch.stack([self.sums[n] for n in names]) / self.steps, "mean")
        values = dict(zip(names, means.tolist(), strict=True))
        if not torch.isfinite(means).all():
            raise NonFiniteLoss(f"non-finite {names[0]} at step {step} ({values}); {self.state_hint}")
        self._log_skipped(step)
        elapsed = time.perf_counter() - self.start
        record = {
            "step": step,
            **{name: round(value, 5) for name, value in values.items()},
            **fields,
            "images_per_s": round(self.steps * self.images_per_step / elapsed, 2),
            "time": round(time.time(), 3),
        }
        self.logger.write(record)
        self.sums, self.steps, self.skipped = {}, 0, []
        self.start = time.perf_counter()
        return record
