"""Backbones. Importing this package registers them."""

from .conv4 import Conv4, build_backbone
from .mlp import MLP

__all__ = ["Conv4", "MLP", "build_backbone"]
