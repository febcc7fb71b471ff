"""CIFAR-style ResNet (He et al. 2016, §4.2): the 6n+2-layer networks the rotation papers use.

A 3x3 convolution with 16 channels, three stages of n basic blocks (16, 32, 64 channels; stride 1, 2,
2), global average pooling and a linear layer: ResNet-8 has n = 1, ResNet-32 n = 5. Blocks are the
original post-activation ones (conv-norm-act-conv-norm, add, act); a block that changes shape projects
its shortcut with a strided 1x1 convolution and a norm. At width 1 the pooled feature is 64-d, the
"64-dimension vector" of Patch RotNet §3. The interface matches `ResNetV2`: `forward_features` gives the
final feature map, `num_features` its channels, so either family plugs into every pretext method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.resnet_v2 import ActLayer, NormLayer, _relu, check_stem_and_width, init_resnet
from model.strided_pointwise import StridedPointwiseConv

CIFAR_STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: NormLayer, act: ActLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm_act1 = nn.Sequential(norm(out_ch), act())
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = norm(out_ch)
        self.shortcut = (
            nn.Sequential(StridedPointwiseConv(in_ch, out_ch, stride), norm(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.norm_act1(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Input (N, 3, H, W) -> `forward_features` (N, C, H', W') -> `forward_head` (N, num_classes), or
    (N, C) pooled features when `num_classes == 0`. H' = H / 4 with the small stem."""

    def __init__(
        self,
        blocks_per_stage: int,
        width: float = 1.0,
        stem: str = "small",
        num_classes: int = 0,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = _relu,
    ) -> None:
        super().__init__()
        check_stem_and_width(stem, width)
        if blocks_per_stage < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {blocks_per_stage}")
        widths = [max(4, round(w * width)) for w in CIFAR_STAGE_WIDTHS]
        # The "imagenet" stem adds ResNet's 7x7 stride-2 convolution and max-pool for large inputs.
        first = nn.Conv2d(3, widths[0], *((7, 2, 3) if stem == "imagenet" else (3, 1, 1)), bias=False)
        layers = [first, norm(widths[0]), act()]
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*layers)
        stages = []
        in_ch = widths[0]
        for index, out_ch in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if index > 0 and block == 0 else 1, norm, act))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.head = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        init_resnet(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet8(width: float = 1.0, stem: str = "small", num_classes: int = 0, **kwargs) -> CifarResNet:
    """ResNet-8: one basic block per stage (7 convolutions and the linear layer); Patch RotNet Table 1."""
    return CifarResNet(1, width=width, stem=stem, num_classes=num_classes, **kwargs)


def resnet32(width: float = 1.0, stem: str = "small", num_classes: int = 0, **kwargs) -> CifarResNet:
    """ResNet-32: five basic blocks per stage; Patch RotNet Table 2."""
    return CifarResNet(5, width=width, stem=stem, num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., CifarResNet]] = {"resnet8": resnet8, "resnet32": resnet32}
