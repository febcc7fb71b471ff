"""The strided 1x1 convolution of a ResNet's projection shortcut, kept off oneDNN's faulty kernel.

A 1x1 convolution with stride s reads only every s-th pixel, so it equals the stride-1 convolution of `x[...,
::s, ::s]`: the same products and sums. On the CPU the shortcut is computed that way, because oneDNN 3.12
(PyTorch 2.13.0 and 2.14.1 bundle the same commit) writes past a heap buffer in its AVX2 backward-weights
kernel of a strided 1x1 convolution (`jit_avx2_1x1_convolution_bwd_weights_t`, its path that copies the
strided input to unit stride) when the input is channels-last with 2 to 7 channels, fewer than the kernel's
8-float block (seen at stride 2; valgrind names the kernel). CPUs without AVX-512 run that kernel; a tiny-
width ResNet reaches it whenever its convolutions are channels-last: `--speed.channels_last`, or
`--speed.compile`, whose inductor turns convolutions channels-last. Such runs died of heap corruption (issue
21). CUDA has no such kernel and keeps the strided convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StridedPointwiseConv(nn.Conv2d):
    """`nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)`: the same parameter, state-dict name and
    output; on the CPU, subsampling then a stride-1 convolution (see the module docstring)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step_h, step_w = self.stride
        if x.device.type != "cpu" or step_h == step_w == 1:
            return super().forward(x)
        return F.conv2d(x[:, :, ::step_h, ::step_w], self.weight)
