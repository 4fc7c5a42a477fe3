"""Pre-activation ResNets for 32x32 images, with an optional rotation-prediction branch.

This is the architecture of Test-Time Training (Sun et al., ICML 2020, "Test-Time Training with
Self-Supervision for Generalization under Distribution Shifts"), which TENT (Wang et al.,
ICLR 2021) reuses for CIFAR-10-C: a 3x3 stem and three groups of pre-activation basic blocks
(He et al. 2016) at widths ``16w, 32w, 64w``, ``(depth - 2) / 6`` blocks per group (ResNet-26:
four). Shortcuts that change shape are average-pooling plus zero channels, as in the TTT code.

With ``rotation_head=True`` the network is Y-shaped, as in Sun et al.: the stem and the first two
groups form a shared ``trunk``; the main ``head`` (third group, norm, pooling, linear) predicts the
class, and a second head of the same shape predicts which of four rotations was applied.
Normalisation is BatchNorm (``norm="bn"``) or GroupNorm with 8 groups (``norm="gn"``, which TTT
prefers because adaptation works on batches of one image's copies). Inputs are images scaled to
``[0, 1]``; the per-channel CIFAR-10 normalisation is part of the model, so a model wrapped by
:class:`fastadapt.tta.Tent` is used exactly like any classifier.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import BACKBONES

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(8, channels), channels)
    raise ConfigError(f"norm must be 'bn' or 'gn', got '{kind}'")


class _Downsample(nn.Module):
    """Shortcut for a change of shape: average pooling, then zero-filled extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        return torch.cat([x, x.new_zeros(x.shape[0], self.extra, *x.shape[2:])], 1) if self.extra else x


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.bn1 = _norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (
            _Downsample(in_channels, out_channels, stride) if stride != 1 or in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


def _group(in_channels: int, out_channels: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
    layers = [PreActBlock(in_channels, out_channels, stride, norm)]
    layers += [PreActBlock(out_channels, out_channels, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class _Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _check_depth(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 26, ...), got {depth}")
    return (depth - 2) // 6


class ResNetCifar(nn.Module):
    """Pre-activation CIFAR ResNet of Sun et al. (2020); see the module docstring.

    ``forward(x [B, 3, 32, 32] in [0, 1]) -> logits [B, num_classes]``;
    ``forward_rotation(x) -> [B, 4]`` rotation logits (needs ``rotation_head=True``).
    """

    def __init__(
        self,
        depth: int = 26,
        width: int = 1,
        num_classes: int = 10,
        norm: str = "bn",
        rotation_head: bool = False,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        blocks = _check_depth(depth)
        if width < 1:
            raise ConfigError(f"ResNet width must be at least 1, got {width}")
        self.config = dict(depth=depth, width=width, num_classes=num_classes, norm=norm, rotation_head=rotation_head)
        c1, c2, c3 = 16 * width, 32 * width, 64 * width
        norm_in = _Normalize(CIFAR_MEAN, CIFAR_STD) if in_channels == 3 else _Normalize((0.5,) * in_channels,
                                                                                          (0.5,) * in_channels)
        self.trunk = nn.Sequential(
            norm_in,
            nn.Conv2d(in_channels, c1, 3, 1, 1, bias=False),
            _group(c1, c1, blocks, 1, norm),
            _group(c1, c2, blocks, 2, norm),
        )
        self.head = self._make_head(c2, c3, blocks, norm, num_classes)
        self.rot_head = self._make_head(c2, c3, blocks, norm, 4) if rotation_head else None
        self.out_features = c3

    @staticmethod
    def _make_head(c_in: int, c_out: int, blocks: int, norm: str, outputs: int) -> nn.Sequential:
        layers = [_group(c_in, c_out, blocks, 2, norm), _norm(norm, c_out), nn.ReLU(inplace=True),
                  nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if outputs:  # 0: an embedding network (the pooled features), as the few-shot methods use it
            layers.append(nn.Linear(c_out, outputs))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))

    def _rotation_head(self) -> nn.Module:
        if self.rot_head is None:
            raise ConfigError("this model has no rotation head; train it with --rotation-head for TTT")
        return self.rot_head

    def forward_rotation(self, x: Tensor) -> Tensor:
        return self._rotation_head()(self.trunk(x))

    def forward_both(self, x: Tensor, x_rot: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits of ``x`` and rotation logits of ``x_rot``, in two separate trunk passes.

        Separate, not one pass over the concatenation: in train mode BatchNorm then normalises the
        clean batch with its own statistics and the rotated batch with its own, as in the joint
        training loop of Sun et al. (``net(inputs)`` and ``ssh(rotated inputs)``)."""
        head = self._rotation_head()
        return self.head(self.trunk(x)), head(self.trunk(x_rot))


@BACKBONES.register("resnet26")
def resnet26(num_classes: int = 0, **kwargs) -> ResNetCifar:
    """ResNet-26 of the TTT and TENT CIFAR-10-C experiments (four blocks per group).

    As a registered backbone it is an embedding network (``num_classes=0``: 64w-d features)."""
    return ResNetCifar(depth=26, num_classes=num_classes, **kwargs)


@BACKBONES.register("resnet8")
def resnet8(num_classes: int = 0, **kwargs) -> ResNetCifar:
    """ResNet-8 (one block per group): the same design at a size that trains on a few CPU cores."""
    return ResNetCifar(depth=8, num_classes=num_classes, **kwargs)


def build_resnet_cifar(arch: str, num_classes: int = 10, **kwargs) -> ResNetCifar:
    """A CIFAR classifier (``num_classes`` logits) of architecture ``resnet26`` or ``resnet8``."""
    if arch not in ("resnet26", "resnet8"):
        raise ConfigError(f"unknown CIFAR ResNet '{arch}'; choose resnet26 or resnet8")
    return BACKBONES.get(arch)(num_classes=num_classes, **kwargs)
