"""Classifying views of images on one backbone call: the model of the rotation pretext tasks.

The views come from `pipeline.rotation_views.rotation_views` (view-major: views[v * B + b], label v).
`ViewClassifier` runs the backbone on every view of the batch in one call, average-pools, and classifies:

  single views   backbone -> average pool -> linear, one class per label (4 turns; 8 with patched views)
  relation pairs the 8 views -> backbone -> pool; pair k = concat(f(view k), f(view 4 + k)), i.e.
                 (image turned k, image with a patch turned k) of the same image -> linear, 4-way

The cross-entropy is taken in fp32 whatever the autocast state. `backbone` state-dict names are what
fine-tuning loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import build_backbone


class ViewOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean cross-entropy over the batch's views (or pairs)
    accuracy: torch.Tensor  # scalar, fraction of views (or pairs) classified right
    logits: torch.Tensor  # (V * B, classes) fp32, or (V / 2 * B, classes) for pairs
    targets: torch.Tensor  # (V * B,) or (V / 2 * B,) int64, the class of each row of logits


def relation_pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (2K * B, D) and labels (2K * B,) of view-major views -> pairs (K * B, 2 * D) and their
    targets (K * B,): row k * B + b is concat(view k of image b, view K + k of image b), target label k."""
    half = features.shape[0] // 2
    pairs = torch.cat([features[:half], features[half:]], dim=1)
    return pairs, labels[:half]


class ViewClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, relation: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a view classifier needs at least 2 classes, got {num_classes}")
        self.relation = relation
        self.backbone = backbone
        dim = backbone.num_features * (2 if relation else 1)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, views: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, D): the backbone, then spatial average pooling."""
        return self.backbone.forward_features(views).mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor, labels: torch.Tensor) -> ViewOutput:
        targets = labels
        if self.relation:
            features, targets = relation_pairs(features, labels)
        logits = self.head(features)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return ViewOutput(loss, accuracy, logits, targets)

    def forward(self, views: torch.Tensor, labels: torch.Tensor) -> ViewOutput:
        return self.forward_head(self.forward_features(views), labels)


def build_view_classifier(
    num_classes: int, relation: bool = False, backbone: str = "resnet8", width: float = 1.0, stem: str = "small"
) -> ViewClassifier:
    return ViewClassifier(build_backbone(backbone, width, stem), num_classes, relation)
