"""CIFAR-10 networks: the ResNets of ``models.resnet`` and ``models.mobilenetv2``."""

from __future__ import annotations

from torch import nn

from models import resnet
from models.mobilenetv2 import MobileNetV2
from models.resnet import CifarResNet

#: Every ``--arch`` name.
ARCHITECTURES = (*resnet.ARCHITECTURES, "mobilenetv2")


def build_model(arch: str, num_classes: int = 10, clip_value: float | None = None) -> nn.Module:
    """Build a float CIFAR-10 network by name (``ARCHITECTURES``).

    ``clip_value`` replaces the network's activation (ReLU for the ResNets, ReLU6 for
    MobileNetV2) by ``nn.Hardtanh(0, clip_value)``.

    Raises:
        ValueError: unknown ``arch`` (lists the known ones).
    """
    if arch == "mobilenetv2":
        return MobileNetV2(num_classes=num_classes, clip_value=clip_value)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return resnet.build_model(arch, num_classes, clip_value)


__all__ = ["ARCHITECTURES", "CifarResNet", "MobileNetV2", "build_model"]
