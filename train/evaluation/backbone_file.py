"""The backbone a checkpoint holds: which file a run folder means, the backbone's tensors in this project's
names, and what is known of them (architecture, method, step, the preprocessing it was trained with).
`python -m train.export` writes them out; `python -m train.evaluate` scores them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from model.backbones import build_backbone
from model.classifier import ARCH_BACKBONES
from pipeline.data import EVAL_CROP_FRACTION
from train.config import ConfigError
from train.engine.checkpoint import Checkpoints, load_checkpoint
from train.evaluation.pretrained import KIND_SUFFIX, checkpoint_of, read_pretrained
from train.methods import METHODS


def find_checkpoint(path: Path, seed: int | None) -> Path:
    """The checkpoint RUN_OR_CKPT names: a file, a fine-tuning run's seed, or a pretraining run's newest."""
    seeds = sorted(path.glob("seed_*/checkpoints")) if path.is_dir() else []
    if not seeds:
        if seed is not None:
            raise ConfigError(f"--seed {seed}: {path} is not a fine-tuning run folder")
        return checkpoint_of(str(path))
    folder = path / f"seed_{seed}" / "checkpoints" if seed is not None else seeds[0]
    latest = Checkpoints(folder).latest()
    if latest is None:
        raise ConfigError(f"{path}: no checkpoint in {folder}; expected one of {', '.join(str(s) for s in seeds)}")
    return latest


def backbone_of(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the backbone's tensors in this project's names, what the sidecar says of it)."""
    state = load_checkpoint(checkpoint)  # fields checked, weights finite
    config, kind = state["config"], state["kind"]
    model = config["model"]
    if kind.endswith(KIND_SUFFIX):
        pretrained = read_pretrained(checkpoint)
        prefix, name, method = pretrained.encoder_prefix, pretrained.backbone, pretrained.method
    elif kind == "finetune":
        arch = config["finetune"]["arch"]
        if arch not in ARCH_BACKBONES:
            raise ConfigError(
                f"{checkpoint}: field config.finetune.arch is {arch!r}; expected one of {', '.join(ARCH_BACKBONES)}"
            )
        prefix, name, method = (
            "backbone.",
            ARCH_BACKBONES[arch],
            f"fine-tuned {arch} (init {config['finetune']['init']})",
        )
    else:
        raise ConfigError(f"{checkpoint}: a {kind!r} checkpoint; expected a pretraining or fine-tuning one")
    tensors = {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}
    data = config.get("data")
    if not isinstance(data, dict) or not {"image_size", "mean", "std"} <= data.keys():
        raise ConfigError(
            f"{checkpoint}: field config.data lacks image_size, mean or std; expected the run's data section"
        )
    trained_on = METHODS[method].backbone_input(config) if method in METHODS else None
    info = {
        "backbone": name,
        "width": model["width"],
        "stem": model["stem"],
        "method": method,
        "kind": kind,
        "step": int(state["step"]),
        "source": str(checkpoint.resolve()),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "preprocessing": preprocessing(data, trained_on),
    }
    check_loads(checkpoint, name, model, tensors)
    return tensors, info


def preprocessing(data: dict, trained_on: tuple[str, int] | None) -> dict:
    """What the backbone's input was: whole images or a method's patches, their side, the normalisation.
    Another tool that feeds it differently (timm's resnetv2_50 defaults to mean = std = 0.5) gets wrong
    features without any error."""
    kind, side = trained_on or ("images", int(data["image_size"]))
    record = {
        "input": kind,
        "input_size": [3, side, side],
        "image_size": int(data["image_size"]),
        "pixels": "RGB, scaled to 0..1, then (x - mean) / std per channel",
        "mean": list(data["mean"]),
        "std": list(data["std"]),
    }
    if kind == "images":
        record["eval_resize"] = (
            f"an image of another size: shorter side to {side} / {EVAL_CROP_FRACTION}, bilinear, then the "
            f"center {side} x {side}"
        )
    else:
        record["patch_size"] = side
        record["eval_resize"] = f"the image at {data['image_size']} px, cut into {side} x {side} patches"
    return record


def timm_pretrained_cfg(record: dict) -> dict:
    """The preprocessing as timm's pretrained_cfg fields: `timm.create_model(..., pretrained_cfg_overlay=cfg)`
    makes `timm.data.resolve_data_config` return them."""
    return {
        "input_size": record["input_size"],
        "mean": record["mean"],
        "std": record["std"],
        "interpolation": "bilinear",
        "crop_pct": EVAL_CROP_FRACTION if record["input"] == "images" else 1.0,
        "num_classes": 0,
    }


def check_loads(checkpoint: Path, name: str, model: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the backbone present, in its place, and no other; said in one line."""
    try:
        backbone = build_backbone(name, model["width"], model["stem"])
        missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError, KeyError) as error:  # a shape mismatch, a stem or width that does not build
        first = " ".join(str(error).split())[:300]
        raise ConfigError(f"{checkpoint}: its {name} backbone does not load ({first})") from error
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ConfigError(
            f"{checkpoint}: its {name} backbone does not load: tensors {', '.join(parts)}; expected the "
            "backbone's tensors under the method's prefix"
        )
