"""Backbones. Importing this package registers them."""

from .conv4 import Conv4, build_backbone

__all__ = ["Conv4", "build_backbone"]
