"""A fully connected backbone: the 1-40-40-1 regression network of MAML's sinusoid experiments
(Finn et al. 2017) without its output layer, and a small baseline for flat inputs."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..registry import BACKBONES
from . import grouped


@BACKBONES.register("mlp")
class MLP(nn.Module):
    """``[B, *in_shape] -> [B, hidden[-1]]``: Linear + ReLU layers on the flattened input.

    ``in_features`` defaults to ``in_channels * image_size**2`` so that the backbone builder's
    ``(in_channels, image_size)`` describes both images ``(C, H, H)`` and vectors ``(D,)``
    (``image_size = 1``).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 1, hidden: Sequence[int] = (40, 40),
                 in_features: int | None = None) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer")
        width = in_features if in_features is not None else in_channels * image_size * image_size
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def grouped_forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """:meth:`forward` for ``T`` tasks at once (``x [T, N, ...] -> [T, N, out_features]``), each
        with its own parameters (see :mod:`fastadapt.models.grouped`)."""
        return grouped.grouped_call(self.net, grouped.sub_params(params, "net"), x)
