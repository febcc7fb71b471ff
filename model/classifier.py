"""Classifiers fine-tuned from a pretrained backbone (Selfie §2.3, §4.2; Patch RotNet §4), or trained from scratch.

  resnet50       ResNet-50 v2 on the full image. From a resnet36 backbone (Selfie's P) its stem and stages
                 1-3 are loaded and stage 4, the final norm and the head start fresh (Selfie Figure 5, left);
                 from a resnet50 backbone, all of it.
  resnet36_attn  P on the full image; the pretrained attention pooling A reads the final feature map's
                 H' x W' positions (u0's output is the image vector) (Selfie Figure 5, right). No position
                 embeddings: the pretrained ones index the patch grid, not the feature map.
  resnet36, resnet8, resnet32
                 the pretrained backbone itself, global average pooling, then the head.

The head is `linear` (one layer) or `mlp` (two fully connected layers with batch norm and ReLU between:
the rotation paper's evaluation head). A linear probe (`frozen=True`) freezes everything but the head,
keeps the backbone's batch norm in eval mode, and puts a parameter-free batch norm before the head (as
MAE's linear probe does) so the head sees standardised features whatever their pretrained scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention_pool import PAPER_POOL, AttentionPooling, PoolShape
from model.backbones import build_backbone

# The backbone (model/backbones.py) under each classifier.
ARCH_BACKBONES = {
    "resnet50": "resnet50",
    "resnet36_attn": "resnet36",
    "resnet36": "resnet36",
    "resnet8": "resnet8",
    "resnet32": "resnet32",
}
ARCHS = tuple(ARCH_BACKBONES)
POOLED_ARCHS = ("resnet36_attn",)  # the archs that reuse a pretrained attention pooling A
HEADS = ("linear", "mlp")
# The parts of ResNet-50 v2 that ResNet-36 v2 provides; its final norm has P's width, not ResNet-50's.
RESNET50_FROM_P = ("stem.", "stages.0.", "stages.1.", "stages.2.")


@dataclass(frozen=True)
class HeadShape:
    """The head on the pooled features: one linear layer, or two fully connected layers."""

    kind: str = "linear"  # linear | mlp (HEADS)
    hidden: int = 512  # the mlp's hidden units


LINEAR_HEAD = HeadShape()


def pretrained_backbones(arch: str) -> tuple[str, ...]:
    """The pretraining backbones that can initialise `arch`: its own, and resnet36 for resnet50."""
    own = ARCH_BACKBONES[arch]
    return (own, "resnet36") if arch == "resnet50" else (own,)


def build_head(dim: int, num_classes: int, kind: str = "linear", hidden: int = 512) -> nn.Module:
    """`linear`: one layer; `mlp`: two fully connected layers. The last layer starts at zero."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
    last = nn.Linear(dim if kind == "linear" else hidden, num_classes)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    if kind == "linear":
        return last
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), last)


class Classifier(nn.Module):
    """Images (B, 3, S, S) -> `forward_features` (B, D) -> `forward_head` (B, num_classes)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool: AttentionPooling | None = None,
        frozen: bool = False,
        head: str = "linear",
        head_hidden: int = 512,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.frozen = frozen
        dim = backbone.num_features
        self.head_norm = nn.BatchNorm1d(dim, affine=False) if frozen else nn.Identity()
        self.head = build_head(dim, num_classes, head, head_hidden)
        if frozen:
            backbone.requires_grad_(False)
            if pool is not None:
                pool.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its pretrained batch-norm statistics and no dropout
            self.backbone.eval()
            if self.pool is not None:
                self.pool.eval()
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        feature_map = self.backbone.forward_features(images)
        if self.pool is None:
            return feature_map.mean(dim=(2, 3))
        return self.pool(feature_map.flatten(2).transpose(1, 2))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.forward_features(images)
        return self.forward_head(features)


def build_classifier(
    arch: str,
    num_classes: int,
    width: float = 1.0,
    stem: str = "small",
    pool: PoolShape = PAPER_POOL,
    frozen: bool = False,
    head: HeadShape = LINEAR_HEAD,
) -> Classifier:
    """`arch` (ARCHS) with `num_classes` outputs; `pool` sizes the attention pooling of the archs that
    have one (POOLED_ARCHS), `frozen` makes it a linear probe."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    backbone = build_backbone(ARCH_BACKBONES[arch], width=width, stem=stem)
    attention = pool.build(backbone.num_features) if arch in POOLED_ARCHS else None
    return Classifier(backbone, num_classes, attention, frozen=frozen, head=head.kind, head_hidden=head.hidden)


def pretrained_parts(
    arch: str,
    state: dict[str, torch.Tensor],
    encoder_prefix: str = "patch_net.",
    backbone: str = "resnet36",
    pool_prefix: str | None = "pool.",
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a pretext model's state dict that initialise `arch`, per submodule:
    {"backbone": ..., "pool": ...}. `encoder_prefix` names its backbone ("patch_net." in Selfie,
    "backbone." in the rotation methods), `backbone` that backbone's kind, `pool_prefix` its attention
    pooling A (None: it has none)."""
    if backbone not in pretrained_backbones(arch):
        raise ValueError(
            f"a {backbone} backbone cannot initialise --arch {arch}; expected one pretrained as "
            f"{' or '.join(pretrained_backbones(arch))}"
        )
    encoder = {k.removeprefix(encoder_prefix): v for k, v in state.items() if k.startswith(encoder_prefix)}
    if arch == "resnet50" and backbone == "resnet36":
        encoder = {k: v for k, v in encoder.items() if k.startswith(RESNET50_FROM_P)}
    parts = {"backbone": encoder}
    if arch in POOLED_ARCHS:
        if pool_prefix is None:
            raise ValueError(f"--arch {arch} reuses a pretrained attention pooling A, and this model has none")
        parts["pool"] = {k.removeprefix(pool_prefix): v for k, v in state.items() if k.startswith(pool_prefix)}
    return parts


def load_pretrained(
    classifier: Classifier,
    arch: str,
    state: dict[str, torch.Tensor],
    encoder_prefix: str = "patch_net.",
    backbone: str = "resnet36",
    pool_prefix: str | None = "pool.",
) -> list[str]:
    """Copy the pretrained backbone (and A for resnet36_attn) from a pretext model's state dict into
    `classifier` (see `pretrained_parts` for the arguments).

    Every tensor the arch needs must be present with the right shape, or ValueError says which is not.
    Returns the names loaded, as `classifier.state_dict()` names them.
    """
    loaded = []
    for part, tensors in pretrained_parts(arch, state, encoder_prefix, backbone, pool_prefix).items():
        module = getattr(classifier, part)
        target = module.state_dict()
        wanted = (
            [k for k in target if k.startswith(RESNET50_FROM_P)]
            if arch == "resnet50" and part == "backbone" and backbone == "resnet36"
            else target
        )
        _check_fits(part, arch, tensors, target, wanted)
        module.load_state_dict(tensors, strict=False)
        loaded.extend(f"{part}.{key}" for key in tensors)
    return loaded


def _check_fits(part: str, arch: str, tensors: dict, target: dict, wanted: list[str]) -> None:
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors of {part}, e.g. {missing[0]}")
    for key, value in tensors.items():
        if key not in target:
            raise ValueError(f"the checkpoint's {part} tensor {key} has no place in {arch}")
        if value.shape != target[key].shape:
            raise ValueError(
                f"{part}.{key} is {tuple(value.shape)} in the checkpoint but {tuple(target[key].shape)} in "
                f"{arch} (a different width or stem)"
            )
