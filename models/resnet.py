"""CIFAR ResNets: ResNet-20/32/56 (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, section 4.2) and the CIFAR variant of ResNet-18 (3x3 stem,
no max-pool, 1x1-conv shortcuts, as in the widely used kuangliu/pytorch-cifar).

Every model takes ``(N, 3, 32, 32)`` normalised images and returns ``(N, num_classes)``
logits. Activations are ``nn.ReLU`` (or ``nn.Hardtanh(0, c)`` with ``clip_value=c``),
never in place, so that pre-quantization activations captured for A-BR stay intact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _activation(clip_value: float | None) -> nn.Module:
    return nn.ReLU() if clip_value is None else nn.Hardtanh(0.0, clip_value)


class _ShortcutA(nn.Module):
    """He et al. 2016 option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, fig. 2)."""

    #: (activation, layer) attribute pairs where the activation's output feeds that layer and
    #: nothing else, so the activation can be fused into the layer's input quantizer
    #: (``quant.convert.quantize_model``). ``act2`` also feeds the next block's shortcut.
    exclusive_activations = (("act1", "conv2"),)

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str, clip_value: float | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = _activation(clip_value)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = _activation(clip_value)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _ShortcutA(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem, stages of ``BasicBlock``, global average pool, linear.

    Args:
        blocks_per_stage: blocks in each stage; ``widths``: channels of each stage.
        shortcut: ``"A"`` (zero-pad identity) or ``"B"`` (1x1 conv) where shapes change.
        num_classes: output logits. clip_value: clip activations to ``[0, c]`` if set.
    """

    def __init__(self, blocks_per_stage, widths, shortcut: str, num_classes: int = 10,
                 clip_value: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = _activation(clip_value)
        stages, in_planes = [], widths[0]
        for i, (blocks, planes) in enumerate(zip(blocks_per_stage, widths)):
            layers = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut, clip_value))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        for stage in self.layers:
            out = stage(out)
        return self.linear(torch.flatten(self.pool(out), 1))


ARCHITECTURES = {
    # name: (blocks per stage, widths, shortcut)
    "resnet20": ((3, 3, 3), (16, 32, 64), "A"),
    "resnet32": ((5, 5, 5), (16, 32, 64), "A"),
    "resnet56": ((9, 9, 9), (16, 32, 64), "A"),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), "B"),
}


def build_model(arch: str, num_classes: int = 10, clip_value: float | None = None) -> CifarResNet:
    """Build a float CIFAR ResNet by name (``ARCHITECTURES``).

    Raises:
        ValueError: unknown ``arch`` (lists the known ones).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    blocks, widths, shortcut = ARCHITECTURES[arch]
    return CifarResNet(blocks, widths, shortcut, num_classes, clip_value)
