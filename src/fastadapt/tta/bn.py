"""Test-time BatchNorm adaptation: normalise with the statistics of the test batch.

Schneider, Rusak, Eck, Bringmann, Brendel and Bethge, "Improving robustness against common
corruptions by covariate shift adaptation", NeurIPS 2020 (the "BN" baseline of TENT, Wang et al.
2021, and of Nado et al. 2020). Nothing is trained: every BatchNorm layer replaces the source
running mean and variance by the mean and variance of the current test batch, so the prediction
for an image depends on the batch it arrives in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .tent import use_batch_statistics


class BNAdapt(nn.Module):
    """Wrap ``model`` (in place) so that its BatchNorm layers use test-batch statistics.

    The rest of the model stays in eval mode (dropout off). Nothing is learned, so there is
    nothing to reset between batches.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model.eval()
        self.model = use_batch_statistics(model)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
