"""ResNet-12, the residual backbone of MetaOptNet (Lee et al., CVPR 2019) and FEAT (Ye et al.,
CVPR 2020).

Four residual blocks of 64, 160, 320 and 640 channels. Each block is three 3x3 convolutions,
each followed by BatchNorm and LeakyReLU(0.1) (the last activation after the residual sum), a
1x1 convolution + BatchNorm on the shortcut, and 2x2 max-pooling; DropBlock (Ghiasi et al.,
NeurIPS 2018) optionally regularises the last two blocks, as in MetaOptNet. The output is the
global average of the last feature map (640-d, as FEAT), or with ``avg_pool=False`` the flattened
map (MetaOptNet: 640 x 5 x 5 on 84x84 images).

Registered as ``resnet12`` (no DropBlock) and ``resnet12-dropblock`` (rate 0.1, block size 5: the
MetaOptNet setting), so ``--backbone resnet12`` works for every method.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._vmap import under_vmap
from ..errors import ConfigError
from ..registry import BACKBONES


class DropBlock(nn.Module):
    """DropBlock (Ghiasi, Lin & Le, NeurIPS 2018): in training, zero ``block_size`` x
    ``block_size`` squares of a feature map so that about ``drop_rate`` of it is dropped, and
    rescale the rest; the identity in eval mode or with ``drop_rate = 0``. The block size is cut
    to the feature map's side. Masks come from the global torch generator (checkpointed by the
    trainer, so a resumed run draws the same masks)."""

    def __init__(self, drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"DropBlock rate must be in [0, 1), got {drop_rate}")
        if block_size < 1:
            raise ConfigError(f"DropBlock block size must be at least 1, got {block_size}")
        self.drop_rate, self.block_size = float(drop_rate), int(block_size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        if under_vmap(x):
            raise ConfigError("DropBlock draws random masks, which torch.func.vmap refuses; use --batching loop "
                              "or the resnet12 backbone without DropBlock")
        n, c, h, w = x.shape
        bs = min(self.block_size, h, w)
        # Block corners are drawn where a whole block fits, at the rate that drops drop_rate of the map.
        gamma = self.drop_rate / (bs * bs) * (h * w) / ((h - bs + 1) * (w - bs + 1))
        corners = (torch.rand(n, c, h - bs + 1, w - bs + 1, device=x.device) < gamma).to(x.dtype)
        # A corner at (i, j) drops rows i..i+bs-1 and columns j..j+bs-1: a max over a bs x bs window.
        dropped = F.max_pool2d(F.pad(corners, (bs - 1, bs - 1, bs - 1, bs - 1)), bs, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ResBlock12(nn.Module):
    """One ResNet-12 block: ``pool(lrelu(bn3(conv3(lrelu(bn2(conv2(lrelu(bn1(conv1(x)))))))) +
    shortcut(x)))``, then DropBlock."""

    def __init__(self, cin: int, cout: int, drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.1)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_rate, block_size)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.drop(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12 embedding network: ``[B, C, H, W] -> [B, out_features]`` (see the module docstring).

    ``drop_rate`` and ``block_size`` set DropBlock in the last two blocks (0: none). Inputs of at
    least 16x16 pixels; 28x28 maps to a 1x1x640 map, 84x84 to 5x5x640.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 84, channels: Sequence[int] = (64, 160, 320, 640),
                 drop_rate: float = 0.0, block_size: int = 5, avg_pool: bool = True) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ConfigError(f"ResNet-12 has four blocks; got {len(channels)} channel widths")
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ConfigError(f"ResNet-12 needs images of at least 16x16, got {image_size}x{image_size}")
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*(
            ResBlock12(widths[i], widths[i + 1], drop_rate if i >= 2 else 0.0, block_size) for i in range(4)
        ))
        self.avg_pool = avg_pool
        self.out_features = channels[-1] if avg_pool else channels[-1] * side * side

    def forward(self, x: Tensor) -> Tensor:
        z = self.blocks(x)
        return z.mean((-2, -1)) if self.avg_pool else z.flatten(1)


@BACKBONES.register("resnet12")
def resnet12(in_channels: int = 3, image_size: int = 84, **kwargs) -> ResNet12:
    """ResNet-12 (64-160-320-640), global average pooled to 640-d, no DropBlock."""
    return ResNet12(in_channels, image_size, **kwargs)


@BACKBONES.register("resnet12-dropblock")
def resnet12_dropblock(in_channels: int = 3, image_size: int = 84, **kwargs) -> ResNet12:
    """ResNet-12 with DropBlock (rate 0.1, block size 5) in its last two blocks, as MetaOptNet."""
    kwargs = {"drop_rate": 0.1, "block_size": 5, **kwargs}
    return ResNet12(in_channels, image_size, **kwargs)


__all__ = ["ResNet12", "ResBlock12", "DropBlock", "resnet12", "resnet12_dropblock"]
