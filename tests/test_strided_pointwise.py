import pytest
import torch
import torch.nn.functional as F

from model.strided_pointwise import StridedPointwiseConv
from tests.conftest import ROOT, run_script

# A ResNet-8 shortcut at width 0.125 (4 -> 8 channels, stride 2), channels-last, trained a few steps on
# oneDNN's AVX2 kernels: before issue 21's fix this corrupted the heap (exit -6 or -11). The ISA is read
# when oneDNN first runs, so it is set for a fresh process.
AVX2_SHORTCUT = """
import torch
from model.resnet_cifar import BasicBlock
torch.set_num_threads(1)
block = BasicBlock(4, 8, 2, torch.nn.BatchNorm2d, torch.nn.ReLU).to(memory_format=torch.channels_last)
x = torch.randn(32, 4, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
for _ in range(50):
    block(x).square().sum().backward()
print("ok")
"""


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_it_computes_the_strided_convolution(memory_format: torch.memory_format, stride: int) -> None:
    conv = StridedPointwiseConv(4, 8, stride)
    x = torch.randn(5, 4, 11, 9).contiguous(memory_format=memory_format).requires_grad_()
    reference_x = x.detach().clone().requires_grad_()
    out = conv(x)
    reference = F.conv2d(reference_x, conv.weight.detach().clone().requires_grad_(), stride=stride)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, reference_x.grad)
    assert list(conv.state_dict()) == ["weight"] and conv.weight.shape == (8, 4, 1, 1)


def test_a_narrow_shortcut_trains_channels_last_on_onednn_avx2_kernels() -> None:
    result = run_script(["-c", AVX2_SHORTCUT], ROOT, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])
