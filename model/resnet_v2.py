"""Pre-activation ResNet (ResNet v2, He et al. 2016b) with the ResNet-50 layout and a width multiplier.

Each bottleneck starts with norm + activation (the "pre-activation"), so a stage's output is the raw
residual stream; `final_norm` normalises it once after the last stage that the network keeps.
ResNet-36 is ResNet-50 v2 cut after its third stage: it is the Selfie patch network P, and its weights
map one-to-one onto the first three stages of ResNet-50 (same module names) for fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from model.strided_pointwise import StridedPointwiseConv

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

RESNET50_DEPTHS = (3, 4, 6, 3)
RESNET50_MID_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
STEMS = ("imagenet", "small")


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class PreActBottleneck(nn.Module):
    """norm-act -> 1x1 -> norm-act -> 3x3 (stride) -> norm-act -> 1x1, plus the shortcut.

    The projection shortcut (when shape changes) reads the pre-activated input, as in ResNet v2.
    """

    def __init__(self, in_ch: int, mid_ch: int, stride: int, norm: NormLayer, act: ActLayer) -> None:
        super().__init__()
        out_ch = mid_ch * BOTTLENECK_EXPANSION
        self.preact = nn.Sequential(norm(in_ch), act())
        self.shortcut = StridedPointwiseConv(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.norm_act1 = nn.Sequential(norm(mid_ch), act())
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=1, bias=False)
        self.norm_act2 = nn.Sequential(norm(mid_ch), act())
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preact(x)
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.norm_act1(out))
        out = self.conv3(self.norm_act2(out))
        return out + identity


def check_stem_and_width(stem: str, width: float) -> None:
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")


def init_resnet(model: nn.Module) -> None:
    """He et al. initialisation of every convolution (as the reference ResNets), unit norms, zero head."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


class ResNetV2(nn.Module):
    """Pre-activation bottleneck ResNet.

    Input (N, 3, H, W) -> `forward_features` (N, C, H', W') -> `forward_head` (N, num_classes), or
    (N, C) pooled features when `num_classes == 0`. `num_features` is C.
    """

    def __init__(
        self,
        depths: Sequence[int] = RESNET50_DEPTHS,
        width: float = 1.0,
        stem: str = "imagenet",
        num_classes: int = 0,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = _relu,
    ) -> None:
        super().__init__()
        check_stem_and_width(stem, width)
        if not 0 < len(depths) <= len(RESNET50_DEPTHS):
            raise ValueError(f"depths must list 1 to 4 stages, got {list(depths)}")
        stem_ch = max(8, round(64 * width))
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_ch, 7, stride=2, padding=3, bias=False),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, stem_ch, 3, stride=1, padding=1, bias=False))
        stages = []
        in_ch = stem_ch
        for index, depth in enumerate(depths):
            mid_ch = max(8, round(RESNET50_MID_WIDTHS[index] * width))
            blocks = []
            for block in range(depth):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(PreActBottleneck(in_ch, mid_ch, stride, norm, act))
                in_ch = mid_ch * BOTTLENECK_EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.final_norm = nn.Sequential(norm(in_ch), act())
        self.head = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        init_resnet(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.stages(self.stem(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet50_v2(width: float = 1.0, stem: str = "imagenet", num_classes: int = 0, **kwargs) -> ResNetV2:
    return ResNetV2(RESNET50_DEPTHS, width=width, stem=stem, num_classes=num_classes, **kwargs)


def resnet36_v2(width: float = 1.0, stem: str = "imagenet", num_classes: int = 0, **kwargs) -> ResNetV2:
    """The first three stages of ResNet-50 v2: the Selfie patch network P (1024-d at width 1)."""
    return ResNetV2(RESNET50_DEPTHS[:3], width=width, stem=stem, num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., ResNetV2]] = {"resnet50_v2": resnet50_v2, "resnet36_v2": resnet36_v2}
