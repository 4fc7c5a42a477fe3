"""Batch normalisation with the statistics of the current batch only, for the inner loops of
the optimization-based meta-learners (see :mod:`fastadapt.methods.inner`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._vmap import under_vmap


class BatchStatNorm(nn.Module):
    """Batch normalisation with the statistics of the current batch only (no running stats).

    Under ``torch.func.vmap`` it is written with plain tensor ops, which vmap batches (with
    their second derivatives) exactly; outside vmap it calls PyTorch's batch-norm kernel, which is exact
    there and faster. Parameter names (``weight``, ``bias``) match ``nn.BatchNorm*``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not under_vmap(x):
            w, b = (self.weight, self.bias) if self.affine else (None, None)
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        centred = x - mean
        # Biased variance, as batch norm normalises; the centred tensor is normalised (rather than
        # folding mean and scale into one multiply-add). In float32 the second-order gradients of
        # this path are less exact than the fused kernel's (benchmarks/maml_grad_accuracy.py).
        var = (centred * centred).mean(dims, keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, statistics=batch"
