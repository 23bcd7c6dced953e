"""MobileNetV2 for CIFAR-10 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018, table 2), with the two stride changes of the usual CIFAR ports
(e.g. kuangliu/pytorch-cifar): the 3x3 stem conv has stride 1 instead of 2, and so has the
first block of the 24-channel stage. A 32x32 image is then downsampled three times, to 4x4,
before the 1x1 conv to 1280 channels, the global average pool and the linear classifier.

Blocks follow the paper (and torchvision's ``mobilenet_v2``): 1x1 expansion conv (t times the
input channels; none when t = 1), 3x3 depthwise conv (carrying the stride), 1x1 projection
conv, each followed by BatchNorm; ReLU6 after the expansion and the depthwise conv, none after
the projection (the linear bottleneck); a residual add where the stride is 1 and the channels
do not change. There are no shortcut convs and no dropout. With ``CIFAR_SETTINGS`` the
network has 2,236,682 parameters, as torchvision's ``mobilenet_v2(num_classes=10)`` (the
strides do not change the count).

Signed inputs. The projection output (the linear bottleneck, plus the residual where there is
one) is a BatchNorm output with no activation after it, so it can be negative; it is the
input of the next block's first conv (its expansion conv, or its depthwise conv when t = 1)
and, after the last block, of the 1x1 conv to 1280 channels. Those layers name themselves in
``signed_input_layers`` and ``quant.convert.quantize_model`` gives them a signed input
quantizer. Every other conv input comes straight from a ReLU6 (the stem's, the expansion's,
the depthwise's) and is unsigned; so is the classifier's (the average pool of ReLU6 outputs).
The image input of the stem is signed as in every network (``quantize_model``).

With ``--act-quant-at relu-output`` every ReLU6 output gets its own (unsigned) quantizer, and so does
each block's output, after the residual add, on a signed grid (``InvertedResidual.block_output``,
a placeholder ``nn.Identity`` in the float network): a linear bottleneck has no activation to quantize
after, yet what flows between blocks (and what the residual adds) is then on the activation grid,
as between the ResNets' blocks, whose output is a ReLU's.

Every model takes ``(N, 3, 32, 32)`` normalised images and returns ``(N, num_classes)``
logits. Activations are ``nn.ReLU6``, or ``nn.Hardtanh(0, c)`` with ``clip_value=c`` (ReLU6
is ``Hardtanh(0, 6)``), never in place, so that pre-quantization activations captured for
A-BR stay intact. Neither is ``nn.ReLU``, so none is fused into a quantizer
(``quant.convert.fuse_relus``).
"""

from __future__ import annotations

import torch
from torch import nn

#: Table 2 of Sandler et al. 2018 as (expansion t, output channels c, blocks n, stride s of the
#: first block), with the second stage's stride 2 -> 1 for 32x32 inputs.
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1))


def _activation(clip_value: float | None) -> nn.Module:
    return nn.ReLU6() if clip_value is None else nn.Hardtanh(0.0, clip_value)


class InvertedResidual(nn.Module):
    """Expansion 1x1 conv (absent for ``expansion == 1``), depthwise 3x3 conv, linear 1x1
    projection, each with BatchNorm; ReLU6 after the first two; a residual add where
    ``stride == 1`` and ``in_planes == out_planes`` (Sandler et al. 2018, fig. 4 and table 1).

    Input ``(N, in_planes, H, W)``, output ``(N, out_planes, H/stride, W/stride)``; the output
    has no activation after it and can be negative.

    Args:
        in_planes, out_planes: channels. expansion: t (hidden channels = t·in_planes).
        stride: 1 or 2, of the depthwise conv. clip_value: as ``MobileNetV2``.
        input_signed: whether the block's input can be negative (every block's but the first,
            whose input is the stem's ReLU6 output); the block's first conv is then listed in
            ``signed_input_layers``.
    """

    #: placeholders (``nn.Identity``) whose output ``--act-quant-at relu-output`` quantizes
    #: (``quant.convert.activation_outputs``)
    quantized_outputs = ("block_output",)

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, clip_value: float | None,
                 input_signed: bool):
        super().__init__()
        hidden = in_planes * expansion
        self.expand_conv = self.expand_bn = self.expand_act = None
        if expansion != 1:
            self.expand_conv = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
            self.expand_act = _activation(clip_value)
        self.dw_conv = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.dw_act = _activation(clip_value)
        self.project_conv = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_planes)
        self.use_residual = stride == 1 and in_planes == out_planes
        first = "dw_conv" if self.expand_conv is None else "expand_conv"
        #: the layers whose input can be negative (for ``quant.convert.quantize_model``)
        self.signed_input_layers = (first,) if input_signed else ()
        #: the block's output (after the residual add), a placeholder that ``--act-quant-at relu-output``
        #: quantizes on a signed grid (``quantized_outputs``): no activation follows a linear bottleneck
        self.block_output = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = self.expand_act(self.expand_bn(self.expand_conv(out)))
        out = self.dw_act(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(out))
        return self.block_output(out + x if self.use_residual else out)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: 3x3 stem conv (stride 1), inverted residual blocks, 1x1
    conv to ``last_width`` channels, global average pool, linear (see the module docstring).

    Args:
        settings: ``(t, c, n, s)`` per stage (``CIFAR_SETTINGS``; smaller ones for tests).
        stem_width: channels of the stem conv [32]. last_width: channels of the last 1x1 conv [1280].
        num_classes: output logits. clip_value: ``Hardtanh(0, c)`` instead of ReLU6 if set.
    """

    #: the 1x1 conv after the last block takes its linear-bottleneck output (can be negative)
    signed_input_layers = ("conv2",)

    def __init__(self, settings=CIFAR_SETTINGS, stem_width: int = 32, last_width: int = 1280,
                 num_classes: int = 10, clip_value: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = _activation(clip_value)
        blocks, in_planes = [], stem_width
        for expansion, out_planes, n, stride in settings:
            for b in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if b == 0 else 1,
                                               clip_value, input_signed=bool(blocks)))
                in_planes = out_planes
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, last_width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_width)
        self.act2 = _activation(clip_value)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(last_width, num_classes)
        for m in self.modules():  # torchvision's mobilenet_v2 initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = self.act2(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(self.pool(out), 1))
