"""The four-block convolutional backbone of the few-shot literature.

Each block is 3x3 convolution (64 filters), BatchNorm, ReLU and 2x2 max-pooling (Vinyals et al.
2016; Snell et al. 2017; Finn et al. 2017). On 28x28 Omniglot it maps an image to a 64-d vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._vmap import under_vmap
from ..errors import ConfigError
from ..precision import decide_memory_format
from ..registry import BACKBONES
from . import grouped
from .fused import affine_relu_pool, bn_relu_pool, can_fuse


def conv_block(in_channels: int, out_channels: int, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@BACKBONES.register("conv4")
class Conv4(nn.Module):
    """Conv-4 embedding network: ``[B, C, H, W] -> [B, out_features]``.

    Inside :func:`fastadapt.models.fused.fused_blocks` (training passes whose gradient is taken
    once), each block's BatchNorm, ReLU and max-pooling run as one fused operation on the CPU;
    elsewhere the layers run one by one. Both compute the same function (see that module)."""

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_channels: int = 64, image_size: int = 28,
                 channels_last: bool = False) -> None:
        super().__init__()
        # channels_last: NHWC convolutions, BatchNorm and pooling, faster on GPUs and with oneDNN
        # on the CPU, but less exact there (see fastadapt.precision.decide_memory_format).
        self.channels_last = channels_last
        self.encoder = nn.Sequential(
            conv_block(in_channels, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, out_channels),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ConfigError(f"conv4 needs images of at least 16x16, got {image_size}x{image_size}; raise --image-size")
        self.out_features = out_channels * side * side
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and not under_vmap(x):  # vmap cannot query memory formats
            x = x.contiguous(memory_format=torch.channels_last)
        for block in self.encoder:
            conv, *rest = block
            x = conv(x)
            if len(rest) == 3 and can_fuse(x, *rest):  # inside fastadapt.models.fused.fused_blocks only
                x = bn_relu_pool(x, rest[0])
            else:
                for layer in rest:
                    x = layer(x)
        return x.flatten(1)

    def grouped_forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """:meth:`forward` for ``T`` tasks at once (``x [T, N, C, H, W] -> [T, N, out_features]``),
        each with its own parameters (see :mod:`fastadapt.models.grouped`)."""
        tasks = x.shape[0]
        z = grouped.to_channels(x)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(self.encoder):
            conv, *rest = block
            own = grouped.sub_params(params, f"encoder.{i}")
            z = grouped.conv2d(conv, grouped.sub_params(own, "0"), z, tasks)
            if len(rest) == 3 and can_fuse(z, *rest):
                gamma, beta = grouped.affine_params(rest[0], grouped.sub_params(own, "1"), tasks)
                z = affine_relu_pool(z, gamma, beta, rest[0].eps)[0]
                continue
            z = grouped.batch_norm(rest[0], grouped.sub_params(own, "1"), z, tasks)
            for layer in rest[1:]:
                z = layer(z)
        return grouped.from_channels(z, tasks)


def build_backbone(name: str, in_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """A registered backbone for inputs of shape ``in_shape = (C, H, W)``."""
    cls = BACKBONES.get(name)
    return cls(in_channels=in_shape[0], image_size=in_shape[-1], **kwargs)


def use_memory_format(module: nn.Module, memory_format: str) -> None:
    """Put every Conv-4 inside ``module`` in ``memory_format`` (``channels_last`` or ``nchw``), in
    place; the weights keep their values (and checkpoints their names)."""
    for m in module.modules():
        if isinstance(m, Conv4):
            m.channels_last = memory_format == "channels_last"
            m.to(memory_format=torch.channels_last if m.channels_last else torch.contiguous_format)


def apply_memory_format(module: nn.Module, memory_format: str, device: torch.device | str) -> str:
    """Decide ``memory_format`` for ``device`` and the learner ``module`` (``auto``: see
    :func:`fastadapt.precision.decide_memory_format`, told the learner's ``fused_training``), put
    ``module``'s Conv-4s in it and return the decision (``channels_last`` or ``nchw``), as
    ``fastadapt train`` records it."""
    decided = decide_memory_format(memory_format, device, getattr(module, "fused_training", False))
    use_memory_format(module, decided)
    return decided
