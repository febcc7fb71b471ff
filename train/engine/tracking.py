"""Experiment trackers through Accelerate (`log.tracker`): TensorBoard, Weights & Biases, MLflow.

Every log.jsonl record's numbers also go to the tracker at the record's step, the pictures drawn at each
checkpoint too, and the resolved config as the run's hyperparameters. The tracker's run id is kept in the
run folder (trackers.json) and in every checkpoint, so a resumed run continues the same tracker run
(TensorBoard: the same event folder, run folder/trackers/; W&B and MLflow: the same run id). A tracker
that is not installed is a clear error before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from pipeline.atomic import write_atomic
from train.config import ConfigError, LogSection

INSTALLED = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
INSTALL = {
    "tensorboard": "pip install -e '.[tensorboard]'",
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
}


def check_tracker(log: LogSection) -> None:
    """The configured tracker's package is installed on this machine."""
    if log.tracker != "none" and not INSTALLED[log.tracker]():
        raise ConfigError(f"log.tracker={log.tracker}: {log.tracker} is not installed ({INSTALL[log.tracker]})")


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists and None as text (what trackers take as hparams)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


def start_trackers(accelerator: Accelerator, log: LogSection, resume: bool, folder: Path, config: dict) -> str | None:
    """Start the configured tracker, continuing the run's tracker run when it has one (folder/trackers.json,
    also copied into every checkpoint); returns the tracker's run id, or None without a tracker."""
    if log.tracker == "none":
        return None
    record = folder / "trackers.json"
    saved = json.loads(record.read_text()) if resume and record.is_file() else {}
    run_id = saved.get("run_id") if saved.get("log_with") == log.tracker else None
    accelerator.project_configuration.logging_dir = str(folder / "trackers")
    kwargs = {
        "wandb": {"id": run_id, "resume": "allow"} if run_id else {},
        "mlflow": {"run_id": run_id} if run_id else {},
    }
    accelerator.init_trackers(log.tracker_project, None, kwargs)
    store_hyperparameters(accelerator, log.tracker, flat(config), resumed=run_id is not None)
    run_id = tracker_run_id(accelerator, log.tracker, folder)
    if accelerator.is_main_process:  # "log_with": the name trackers.json has always had
        write_atomic(record, json.dumps({"log_with": log.tracker, "run_id": run_id}).encode())
    return run_id


def store_hyperparameters(accelerator: Accelerator, name: str, values: dict[str, Any], resumed: bool) -> None:
    """The resolved config as the tracker run's hyperparameters. TensorBoard's are written into the run's
    own event folder (Accelerate's default puts them in a new timestamped folder, which TensorBoard lists as
    a second run), once: a resume continues the run whose hyperparameters are already there."""
    if not accelerator.is_main_process:
        return
    tracker = accelerator.get_tracker(name, unwrap=True)
    if name != "tensorboard":
        accelerator.get_tracker(name).store_init_configuration(values)
    elif not resumed:
        tracker.add_hparams(values, metric_dict={}, run_name=".")
        tracker.flush()


def tracker_run_id(accelerator: Accelerator, name: str, folder: Path) -> str | None:
    if not accelerator.is_main_process:
        return None
    tracker = accelerator.get_tracker(name, unwrap=True)
    if name == "wandb":
        return tracker.id
    if name == "mlflow":
        return tracker.info.run_id
    return str(folder / "trackers")  # TensorBoard: the event folder a resume appends to


UNTRACKED = {"step", "time"}  # the x axis, and a wall-clock timestamp (not a curve)
SPEED_KEYS = {"images_per_s"}
MONITOR_PREFIXES = ("clean_", "knn_", "test_", "val_")  # measured on held-out images or a fixed probe


def tag_of(key: str) -> str:
    """A log key's tracker tag, grouped as TensorBoard shows sections: train/, monitor/, speed/."""
    if key in SPEED_KEYS:
        return f"speed/{key}"
    if key.startswith(MONITOR_PREFIXES):
        return f"monitor/{key}"
    return f"train/{key}"


class TrackerSink:
    """Sends log records and pictures to the started tracker (rank 0; a no-op object without one)."""

    def __init__(self, accelerator: Accelerator, name: str, prefix: str = "") -> None:
        self.accelerator, self.name, self.prefix = accelerator, name, prefix

    def record(self, record: dict[str, Any]) -> None:
        if "step" not in record or "event" in record:
            return
        values = {
            f"{self.prefix}{tag_of(key)}": value
            for key, value in record.items()
            if key not in UNTRACKED and isinstance(value, int | float)
        }
        self.accelerator.log(values, step=int(record["step"]))

    def picture(self, tag: str, picture: np.ndarray, step: int) -> None:
        tracker = self.accelerator.get_tracker(self.name, unwrap=True)
        tag = f"{self.prefix}{tag}"
        if self.name == "tensorboard":
            tracker.add_image(tag, picture, step, dataformats="HWC")
        elif self.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(picture)}, step=step)
        else:
            import mlflow

            mlflow.log_image(picture, f"{tag}_step_{step:08d}.png")
