"""Rotation pretext tasks on one backbone call: RotNet, Patch RotNet, Patch RelNet (Pham et al. 2021).

The views come from `pipeline.rotations.rotation_views` (view-major: views[v * B + b], label v):

  rotnet        4 views (image turned 0/90/180/270 degrees) -> backbone -> average pool -> linear, 4-way
  patch_rotnet  8 views (the 4 turned images, then the upright image with a turned, shrunk copy pasted
                on it) -> backbone -> pool -> linear, 8-way (labels 0-7)
  patch_relnet  the same 8 views -> backbone -> pool; pair k = concat(f(view k), f(view 4 + k)), i.e.
                (image turned k, image with a patch turned k) of the same image -> relation head, 4-way

Every view of the batch goes through the backbone in one call; the cross-entropy is taken in fp32
whatever the autocast state. `backbone` state-dict names are what fine-tuning loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import build_backbone
from pipeline.rotations import NUM_ROTATIONS


class RotationMethod(NamedTuple):
    num_views: int  # views per image that `rotation_views` makes
    num_classes: int  # ways of the pretext classification
    relation: bool  # classify concatenated (turned image, patched image) pairs instead of single views


ROTATION_METHODS = {
    "rotnet": RotationMethod(NUM_ROTATIONS, NUM_ROTATIONS, False),
    "patch_rotnet": RotationMethod(2 * NUM_ROTATIONS, 2 * NUM_ROTATIONS, False),
    "patch_relnet": RotationMethod(2 * NUM_ROTATIONS, NUM_ROTATIONS, True),
}


class RotationOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean cross-entropy over the batch's views (or pairs)
    accuracy: torch.Tensor  # scalar, fraction of views (or pairs) classified right
    logits: torch.Tensor  # (V * B, classes) fp32, or (4 * B, 4) for pairs
    targets: torch.Tensor  # (V * B,) or (4 * B,) int64, the class of each row of logits


def relation_pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (8 * B, D) and labels (8 * B,) of view-major views -> pairs (4 * B, 2 * D) and their targets
    (4 * B,): row k * B + b is concat(turned image k of image b, patched image k of image b), target k."""
    half = features.shape[0] // 2
    pairs = torch.cat([features[:half], features[half:]], dim=1)
    return pairs, labels[:half]


class RotationPretext(nn.Module):
    def __init__(self, backbone: nn.Module, method: str) -> None:
        super().__init__()
        if method not in ROTATION_METHODS:
            raise ValueError(f"rotation method must be one of {', '.join(ROTATION_METHODS)}, got {method!r}")
        self.method = method
        self.spec = ROTATION_METHODS[method]
        self.backbone = backbone
        dim = backbone.num_features * (2 if self.spec.relation else 1)
        self.head = nn.Linear(dim, self.spec.num_classes)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, D): the backbone, then spatial average pooling."""
        return self.backbone.forward_features(views).mean(dim=(2, 3))

    def forward(self, views: torch.Tensor, labels: torch.Tensor) -> RotationOutput:
        features = self.embed(views)
        targets = labels
        if self.spec.relation:
            features, targets = relation_pairs(features, labels)
        logits = self.head(features)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return RotationOutput(loss, accuracy, logits, targets)


def build_rotation(method: str, backbone: str = "resnet8", width: float = 1.0, stem: str = "small") -> RotationPretext:
    return RotationPretext(build_backbone(backbone, width, stem), method)
