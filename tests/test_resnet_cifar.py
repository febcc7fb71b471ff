import pytest
import torch
from torch import nn

from model.backbones import BACKBONES, build_backbone
from model.resnet_cifar import MODELS


@pytest.mark.parametrize(("name", "blocks"), [("resnet8", 1), ("resnet32", 5)])
def test_depth_is_6n_plus_2_weighted_layers(name: str, blocks: int) -> None:
    model = MODELS[name](num_classes=10)
    # The stem, two 3x3 convolutions per block and the classifier; projection shortcuts are not counted.
    convs_3x3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs_3x3) + len(linears) == 6 * blocks + 2 == int(name.removeprefix("resnet"))


def test_resnet32_has_the_published_size_and_a_64_d_feature() -> None:
    # He et al. 2016, Table 6: ResNet-32 has 0.46M parameters.
    assert sum(p.numel() for p in MODELS["resnet32"](num_classes=10).parameters()) == pytest.approx(0.46e6, rel=0.02)
    assert MODELS["resnet8"]().num_features == MODELS["resnet32"]().num_features == 64


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize(("stem", "size"), [("small", 32), ("imagenet", 64)])
def test_every_backbone_maps_images_to_a_feature_map(name: str, stem: str, size: int) -> None:
    model = build_backbone(name, width=0.25, stem=stem).eval()
    features = model.forward_features(torch.randn(2, 3, size, size))
    assert features.shape[:2] == (2, model.num_features) and features.dim() == 4


def test_unknown_backbone_and_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="backbone must be one of resnet36, resnet50, resnet8, resnet32"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="stem must be one of"):
        build_backbone("resnet8", stem="tiny")
    with pytest.raises(ValueError, match="width multiplier must be > 0"):
        build_backbone("resnet32", width=0)
