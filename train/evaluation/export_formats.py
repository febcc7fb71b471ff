"""The file formats a backbone is exported in (train/export.py): this project's tensor names as torch or
safetensors, or timm's resnetv2_50 names with its pretrained_cfg."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from model.timm_names import TIMM_MODEL, to_timm
from train.config import ConfigError
from train.evaluation.backbone_file import timm_pretrained_cfg

FORMATS = ("safetensors", "timm", "torch")
TIMM_BACKBONES = {"resnet50": 4, "resnet36": 3}  # backbone -> its stages in timm's resnetv2_50


def in_timm_names(tensors: dict[str, torch.Tensor], info: dict) -> tuple[dict[str, torch.Tensor], dict]:
    name = info["backbone"]
    if name not in TIMM_BACKBONES or info["stem"] != "imagenet" or info["width"] != 1.0:
        raise ConfigError(
            f"--format timm: timm's {TIMM_MODEL} is ResNet v2 at width 1 with the 7x7 imagenet stem; this "
            f"backbone is {name}, width {info['width']:g}, stem {info['stem']} (use --format torch or safetensors)"
        )
    renamed, missing = to_timm(tensors, TIMM_BACKBONES[name])
    cfg = timm_pretrained_cfg(info["preprocessing"])
    return renamed, {"model": TIMM_MODEL, "num_classes": 0, "not_filled": missing, "pretrained_cfg": cfg}


def encoded(tensors: dict[str, torch.Tensor], out: Path, format_name: str) -> bytes:
    if format_name == "safetensors" or (format_name == "timm" and out.suffix == ".safetensors"):
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in tensors.items()})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()
