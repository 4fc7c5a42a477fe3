"""Backbones. Importing this package registers them."""

from .conv4 import Conv4, build_backbone
from .mlp import MLP
from .resnet_cifar import ResNetCifar
from .resnet12 import ResNet12

__all__ = ["Conv4", "MLP", "ResNetCifar", "ResNet12", "build_backbone"]
