"""This project's ResNet v2 state-dict names in timm's: the pre-activation `resnetv2_50` family
(timm/models/resnetv2.py: `stem.conv`, `stages.S.blocks.B.{norm1,conv1,norm2,conv2,norm3,conv3}`, the
projection `downsample.conv`, the final `norm`).

Ours: `stem.0` (the 7x7 convolution of the imagenet stem), `stages.S.B.{preact.0, conv1, norm_act1.0,
conv2, norm_act2.0, conv3, shortcut}`, `final_norm.0`. The blocks compute the same function in the same
order (pre-activation, the stride on the 3x3 convolution, a 1x1 projection of the pre-activated input),
so the tensors move over unchanged. ResNet-36 (Selfie's P) is ResNet-50 v2 without stage 4: its stem and
stages 0-2 map, its final norm (1,024 channels, after stage 3) has no place in timm's ResNet-50, whose
`norm` follows stage 4.
"""

from __future__ import annotations

import re

import torch

TIMM_MODEL = "resnetv2_50"
_RENAMES = (  # (our pattern, timm's replacement), applied in order
    (r"^stem\.0\.", "stem.conv."),
    (r"^stages\.(\d+)\.(\d+)\.preact\.0\.", r"stages.\1.blocks.\2.norm1."),
    (r"^stages\.(\d+)\.(\d+)\.norm_act1\.0\.", r"stages.\1.blocks.\2.norm2."),
    (r"^stages\.(\d+)\.(\d+)\.norm_act2\.0\.", r"stages.\1.blocks.\2.norm3."),
    (r"^stages\.(\d+)\.(\d+)\.shortcut\.", r"stages.\1.blocks.\2.downsample.conv."),
    (r"^stages\.(\d+)\.(\d+)\.(conv\d)\.", r"stages.\1.blocks.\2.\3."),
    (r"^final_norm\.0\.", "norm."),
)


def timm_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    raise ValueError(f"{name}: no place in timm's {TIMM_MODEL}")


def to_timm(state: dict[str, torch.Tensor], stages: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A ResNet v2 backbone's state dict (imagenet stem, width 1) in timm's names, and the names of
    timm's model it cannot fill (for ResNet-36: stage 3 and the final norm)."""
    keep_final_norm = stages == 4
    renamed = {timm_name(k): v for k, v in state.items() if keep_final_norm or not k.startswith("final_norm.")}
    missing = [] if keep_final_norm else ["stages.3.*", "norm.*"]
    return renamed, missing


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's names back to ours (the inverse of `to_timm`, for loading an export into this project)."""
    inverse = (
        (r"^stem\.conv\.", "stem.0."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.norm1\.", r"stages.\1.\2.preact.0."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.norm2\.", r"stages.\1.\2.norm_act1.0."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.norm3\.", r"stages.\1.\2.norm_act2.0."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.", r"stages.\1.\2.shortcut."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.(conv\d)\.", r"stages.\1.\2.\3."),
        (r"^norm\.", "final_norm.0."),
    )
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in inverse:
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                out[renamed] = tensor
                break
        else:
            raise ValueError(f"{name}: not a name of timm's {TIMM_MODEL} backbone")
    return out
