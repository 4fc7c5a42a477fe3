"""The coordinatewise LSTM optimizer of Andrychowicz et al., "Learning to learn by gradient
descent by gradient descent" (NeurIPS 2016).

One small two-layer LSTM (20 hidden units) is shared by every coordinate of every tensor: each
coordinate is a row of one batched LSTM step, with a hidden state of its own, so the rule handles
parameter sets of any shape and size. Its input is the gradient, preprocessed as in the paper's
Appendix A (log-magnitude and sign, ``p = 10``)::

    (log|g| / p, sign(g))   if |g| >= exp(-p)
    (-1, exp(p) g)          otherwise

written as ``(max(log|g| / p, -1), clamp(exp(p) g, -1, 1))``, which is the same map. A linear
layer reads the top hidden state and its output, times ``output_scale``, is the update added to
the coordinate. (The authors' reference code uses the equivalent clamped form with ``k = 5`` and a
scale of 0.01 on MNIST; both are options here.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..registry import LEARNED_RULES
from .base import Layout, LearnedRule


def preprocess_gradient(grad: Tensor, p: float = 10.0) -> Tensor:
    """``[..., 2]``: the log-magnitude and sign features of Andrychowicz et al. (Appendix A)."""
    tiny = torch.finfo(grad.dtype).tiny  # log(0) would give -inf and a NaN derivative
    log = (grad.abs().clamp_min(tiny).log() / p).clamp_min(-1.0)
    sign = (grad * math.exp(p)).clamp(-1.0, 1.0)
    return torch.stack([log, sign], dim=-1)


@LEARNED_RULES.register("lstm")
class LSTMRule(LearnedRule):
    """Coordinatewise LSTM optimizer (Andrychowicz et al., NeurIPS 2016)."""

    name = "lstm"

    def __init__(self, hidden: int = 20, layers: int = 2, preprocess_p: float = 10.0,
                 output_scale: float = 0.1) -> None:
        super().__init__(hidden=hidden, layers=layers, preprocess_p=preprocess_p, output_scale=output_scale)
        self.hidden, self.layers = hidden, layers
        self.p, self.output_scale = preprocess_p, output_scale
        self.cells = nn.ModuleList(nn.LSTMCell(2 if i == 0 else hidden, hidden) for i in range(layers))
        self.out = nn.Linear(hidden, 1)

    def init_state(self, params: Tensor, layout: Layout) -> dict[str, Tensor]:
        zeros = params.new_zeros(self.layers, params.numel(), self.hidden)
        return {"h": zeros, "c": zeros.clone()}

    def forward(self, grad: Tensor, params: Tensor, state: dict[str, Tensor], layout: Layout,
                progress: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        x = preprocess_gradient(grad, self.p)
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            h, c = cell(x, (state["h"][i], state["c"][i]))
            hs.append(h)
            cs.append(c)
            x = h
        update = self.out(x).squeeze(-1) * self.output_scale
        return update, {"h": torch.stack(hs), "c": torch.stack(cs)}
