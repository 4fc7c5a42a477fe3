"""Backbones. Importing this package registers them."""

from .conv4 import Conv4, build_backbone
from .resnet_cifar import ResNetCifar

__all__ = ["Conv4", "ResNetCifar", "build_backbone"]
