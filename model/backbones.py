"""The encoders every pretext method and classifier can use, by the name `model.backbone` gives.

Each maps an image (or patch) batch (N, 3, H, W) to a feature map with `forward_features` and exposes
`num_features`; methods pool it themselves.

  resnet36   the first three stages of ResNet-50 v2: Selfie's patch network P (1024-d at width 1)
  resnet50   ResNet-50 v2 (2048-d)
  resnet8    CIFAR-style ResNet-8 (64-d): the rotation papers' shallow backbone
  resnet32   CIFAR-style ResNet-32 (64-d): their deeper one
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.resnet_cifar import BasicBlock, resnet8, resnet32
from model.resnet_v2 import PreActBottleneck, resnet36_v2, resnet50_v2

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet36": resnet36_v2,
    "resnet50": resnet50_v2,
    "resnet8": resnet8,
    "resnet32": resnet32,
}


def build_backbone(name: str, width: float = 1.0, stem: str = "small") -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    return BACKBONES[name](width=width, stem=stem)


def zero_init_residual(net: nn.Module) -> nn.Module:
    """Every residual branch of `net` starts at zero, so every block starts as its shortcut (Goyal et al.
    2017): a post-activation block (CIFAR ResNets) by its last batch norm's scale; a pre-activation
    bottleneck (ResNet v2) by its last convolution, since its last norm feeds a ReLU whose gradient at 0
    is 0, which would keep a zero scale at zero for good. Returns `net`."""
    for module in net.modules():
        if isinstance(module, BasicBlock):
            nn.init.zeros_(module.norm2.weight)
        elif isinstance(module, PreActBottleneck):
            nn.init.zeros_(module.conv3.weight)
    return net
