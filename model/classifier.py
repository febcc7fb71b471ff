"""Classifiers fine-tuned from a Selfie patch network P (paper §2.3, §4.2), or trained from scratch.

  resnet50       ResNet-50 v2 on the full image; stem + stages 1-3 come from P, stage 4, the final norm and
                 the head start fresh; global average pooling, linear head (paper Figure 5, left).
  resnet36_attn  P on the full image; the pretrained attention pooling A reads the final feature map's
                 H' x W' positions (u0's output is the image vector); linear head (paper Figure 5, right).
                 No position embeddings: the pretrained ones index the patch grid, not the feature map.
  resnet36       P on the full image, global average pooling, linear head: P's own features, the natural
                 backbone of a linear probe.

A linear probe (`frozen=True`) freezes everything but the head, keeps the backbone's batch norm in eval
mode, and puts a parameter-free batch norm before the linear layer (as MAE's linear probe does) so the
head sees standardised features whatever their pretrained scale.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention_pool import AttentionPooling
from model.resnet_v2 import ResNetV2, resnet36_v2, resnet50_v2

ARCHS = ("resnet50", "resnet36_attn", "resnet36")
# The parts of ResNet-50 v2 that P (ResNet-36 v2) provides; its final norm has P's width, not ResNet-50's.
RESNET50_FROM_P = ("stem.", "stages.0.", "stages.1.", "stages.2.")


class Classifier(nn.Module):
    """Images (B, 3, S, S) -> `forward_features` (B, D) -> `forward_head` (B, num_classes)."""

    def __init__(
        self, backbone: ResNetV2, num_classes: int, pool: AttentionPooling | None = None, frozen: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.frozen = frozen
        dim = backbone.num_features
        self.head_norm = nn.BatchNorm1d(dim, affine=False) if frozen else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
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
    attn_layers: int = 3,
    attn_intermediate: int = 640,
    attn_heads: int = 32,
    attn_dropout: float = 0.1,
    frozen: bool = False,
) -> Classifier:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "resnet50":
        return Classifier(resnet50_v2(width=width, stem=stem), num_classes, frozen=frozen)
    patch_net = resnet36_v2(width=width, stem=stem)
    pool = None
    if arch == "resnet36_attn":
        pool = AttentionPooling(patch_net.num_features, attn_layers, attn_intermediate, attn_heads, attn_dropout)
    return Classifier(patch_net, num_classes, pool, frozen=frozen)


def pretrained_parts(arch: str, selfie_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a Selfie state dict that initialise `arch`, per submodule: {"backbone": ..., "pool": ...}."""
    patch_net = {k.removeprefix("patch_net."): v for k, v in selfie_state.items() if k.startswith("patch_net.")}
    if arch == "resnet50":
        patch_net = {k: v for k, v in patch_net.items() if k.startswith(RESNET50_FROM_P)}
    parts = {"backbone": patch_net}
    if arch == "resnet36_attn":
        parts["pool"] = {k.removeprefix("pool."): v for k, v in selfie_state.items() if k.startswith("pool.")}
    return parts


def load_pretrained(classifier: Classifier, arch: str, selfie_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy P (and A for resnet36_attn) from a Selfie model's state dict into `classifier`.

    Every tensor the arch needs must be present with the right shape, or ValueError says which is not.
    Returns the names loaded, as `classifier.state_dict()` names them.
    """
    loaded = []
    for part, tensors in pretrained_parts(arch, selfie_state).items():
        module = getattr(classifier, part)
        target = module.state_dict()
        wanted = (
            [k for k in target if k.startswith(RESNET50_FROM_P)]
            if arch == "resnet50" and part == "backbone"
            else target
        )
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
        module.load_state_dict(tensors, strict=False)
        loaded.extend(f"{part}.{key}" for key in tensors)
    return loaded
