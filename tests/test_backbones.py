"""The backbones' shared options (model/backbones.py)."""

import torch

from model.backbones import build_backbone, zero_init_residual
from model.resnet_cifar import BasicBlock
from model.resnet_v2 import PreActBottleneck


def test_zero_init_residual_makes_every_block_its_shortcut() -> None:
    x = torch.randn(2, 3, 16, 16)
    for name, block_type in (("resnet36", PreActBottleneck), ("resnet8", BasicBlock)):
        torch.manual_seed(0)
        net = zero_init_residual(build_backbone(name, width=0.25)).eval()
        blocks = [m for m in net.modules() if isinstance(m, block_type)]
        assert blocks
        for block in blocks:
            inputs = torch.randn(2, block.conv1.in_channels, 8, 8)
            with torch.no_grad():
                if block_type is PreActBottleneck:
                    identity = inputs if block.shortcut is None else block.shortcut(block.preact(inputs))
                else:
                    identity = block.act(block.shortcut(inputs))
                torch.testing.assert_close(block(inputs), identity)
        torch.manual_seed(0)
        plain = build_backbone(name, width=0.25).eval()
        with torch.no_grad():
            assert not torch.allclose(plain.forward_features(x), net.forward_features(x))
