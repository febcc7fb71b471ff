import pytest
import torch

from model.resnet_v2 import MODELS, ResNetV2, resnet36_v2, resnet50_v2


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("stem,size", [("imagenet", 64), ("small", 16)])
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_shapes_of_every_variant(name: str, stem: str, size: int, width: float) -> None:
    model = MODELS[name](width=width, stem=stem, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    features = model.forward_features(x)
    stages = 4 if name == "resnet50_v2" else 3
    stride = (4 if stem == "imagenet" else 1) * 2 ** (stages - 1)
    assert features.shape == (2, model.num_features, size // stride, size // stride)
    assert model.num_features == round(64 * width * 2 ** (stages - 1)) * 4
    assert model(x).shape == (2, 7)


def test_full_width_sizes_match_resnet50_v2() -> None:
    # ResNet-50 (v1 and v2 alike) has 23.5M parameters without its classifier; P emits 1024-d vectors.
    assert sum(p.numel() for p in resnet50_v2().parameters()) == pytest.approx(23.5e6, rel=0.01)
    assert resnet36_v2().num_features == 1024
    assert resnet50_v2().num_features == 2048


def test_resnet36_is_the_first_three_stages_of_resnet50() -> None:
    p_names = set(resnet36_v2(width=0.25).state_dict())
    r50_names = set(resnet50_v2(width=0.25).state_dict())
    stage_names = {n for n in p_names if n.startswith(("stem.", "stages."))}
    assert stage_names <= r50_names
    assert not any(n.startswith("stages.3.") for n in p_names)


@pytest.mark.parametrize("stage,index", [(1, 0), (1, 1)])
def test_blocks_are_pre_activation(stage: int, index: int) -> None:
    block = resnet50_v2(width=0.25).stages[stage][index].eval()
    for module in block.modules():  # non-trivial norms, so a misplaced one changes the result
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    relu = torch.nn.functional.relu
    pre = relu(block.preact[0](x))
    out = block.conv1(pre)
    out = block.conv2(relu(block.norm_act1[0](out)))
    out = block.conv3(relu(block.norm_act2[0](out)))
    shortcut = x if block.shortcut is None else block.shortcut(pre)  # v2: the projection reads the pre-activation
    torch.testing.assert_close(block(x), out + shortcut)
    assert (block.shortcut is not None) == (index == 0) and block.conv2.stride == ((2, 2) if index == 0 else (1, 1))


def test_norm_and_activation_are_injected() -> None:
    model = ResNetV2((1, 1), width=0.25, stem="small", norm=lambda c: torch.nn.GroupNorm(4, c), act=torch.nn.GELU)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.ReLU) for m in model.modules())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="stem"):
        resnet36_v2(stem="tiny")
    with pytest.raises(ValueError, match="width"):
        resnet36_v2(width=0)
