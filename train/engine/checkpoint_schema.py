"""What a checkpoint of this trainer holds, field by field: a file whose fields are missing or of the wrong
type (tampered, or written by something else) is one line naming the file and the field, not a traceback
wherever the field is first used. And its weights are finite: a run never saves non-finite ones, so a file
holding them was damaged, and nothing should start from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_rng(value: Any) -> bool:
    numpy_state = value.get("numpy") if isinstance(value, dict) else None
    return (
        isinstance(numpy_state, dict)
        and isinstance(numpy_state.get("keys"), torch.Tensor)
        and isinstance(value.get("python"), tuple)
        and isinstance(value.get("torch"), torch.Tensor)
    )


# field -> (check, what it must be); every checkpoint has these.
FIELDS = {
    "format": (_is_int, "an integer"),
    "kind": (lambda v: isinstance(v, str), "a string (the stage: <method>_pretrain, finetune)"),
    "step": (lambda v: _is_int(v) and v >= 0, "a step number >= 0"),
    "images": (lambda v: _is_int(v) and v > 0, "a number of images > 0"),
    "world_size": (lambda v: _is_int(v) and v > 0, "a number of processes > 0"),
    "model": (_is_tensor_dict, "a dict of tensors by name"),
    "optimizer": (lambda v: isinstance(v, dict) and {"state", "param_groups"} <= v.keys(), "an optimizer state dict"),
    "scheduler": (lambda v: isinstance(v, dict), "a scheduler state dict"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a loss scaler state dict or None"),
    "rng": (lambda v: isinstance(v, list) and len(v) > 0 and all(map(_is_rng, v)), "a list of RNG states per rank"),
    "config": (lambda v: isinstance(v, dict), "the run's config as a dict"),
    "config.model": (lambda v: isinstance(v, dict), "the model section as a dict"),
    "config.model.width": (lambda v: _is_number(v) and v > 0, "a positive width multiplier"),
    "config.model.stem": (lambda v: isinstance(v, str), "a stem name"),
}
# Present in some checkpoints only: what a pretraining method or a tracker added.
OPTIONAL_FIELDS = {
    "config.model.backbone": (lambda v: isinstance(v, str), "a backbone name"),
    "encoder_prefix": (lambda v: isinstance(v, str), "a string"),
    "pool_prefix": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "tracker_run_id": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "seed": (_is_int, "an integer"),
}
FINETUNE_FIELDS = {
    "config.finetune": (lambda v: isinstance(v, dict), "the finetune section as a dict"),
    "config.finetune.arch": (lambda v: isinstance(v, str), "an architecture name"),
    "config.finetune.init": (lambda v: isinstance(v, str), "what the run started from, a string"),
}
MISSING = object()


def describe(value: Any) -> str:
    if value is None:
        return "None"
    shown = f" {value!r}"[:40] if isinstance(value, str | int | float) else ""
    return f"a {type(value).__name__}{shown}"


def field(state: dict[str, Any], dotted: str) -> Any:
    value: Any = state
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def check_schema(path: Path, state: Any, expected_format: int) -> None:
    """Refuse a checkpoint whose fields are not what this trainer writes, naming the first bad field."""
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: holds a {type(state).__name__}; expected a checkpoint dict of this trainer")
    if state.get("format") != expected_format:
        raise ConfigError(
            f"{path}: field format is {state.get('format')!r}; expected {expected_format} (not a checkpoint "
            "written by this trainer)"
        )
    fields = [(FIELDS, True), (OPTIONAL_FIELDS, False)]
    if state.get("kind") == "finetune":
        fields.append((FINETUNE_FIELDS, True))
    for table, required in fields:
        for dotted, (ok, expected) in table.items():
            value = field(state, dotted)
            if value is MISSING and not required:
                continue
            if value is MISSING or not ok(value):
                got = "missing" if value is MISSING else describe(value)
                raise ConfigError(f"{path}: field {dotted} is {got}; expected {expected}")
    if len(state["rng"]) != state["world_size"]:
        raise ConfigError(
            f"{path}: field rng holds {len(state['rng'])} states for world_size {state['world_size']}; "
            "expected one per rank"
        )


def check_finite_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor and how many values are bad."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ConfigError(
                    f"{path}: tensor {name} holds {bad} non-finite values (NaN or infinity); a run never saves "
                    "such weights, so the file was damaged: start from another checkpoint"
                )
