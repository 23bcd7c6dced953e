"""CIFAR ResNets."""

from models.resnet import ARCHITECTURES, CifarResNet, build_model

__all__ = ["ARCHITECTURES", "CifarResNet", "build_model"]
