"""Backbones. Importing this package registers them."""

from .conv4 import Conv4, build_backbone
from .mlp import MLP
from .resnet_cifar import ResNetCifar

__all__ = ["Conv4", "MLP", "ResNetCifar", "build_backbone"]
