"""A VeLO-style learned optimizer, scaled down to CPU size: Metz et al., "VeLO: Training Versatile
Learned Optimizers by Scaling Up" (arXiv:2211.09760, 2022), the ``HyperV2`` design of
learned_optimization.

Two levels, as in VeLO:

- A **per-tensor LSTM** (``lstm_hidden`` units, one row per tensor) reads tensor-level statistics:
  the tanh embedding of the training progress (VeLO's "fraction trained" features), the log mean
  square of every per-parameter feature over the tensor, the log size and the rank of the tensor.
  Before the LSTM, VeLO's "mix layer" adds a max over tensors, so each tensor sees the others. From
  its output a linear layer (zero-initialised) emits, per tensor: a log step-size multiplier, a log
  gain per input feature and a bias per hidden unit of the per-parameter MLP.
- A **tiny per-parameter MLP** (one hidden layer of ``hidden`` ReLU units) maps the features of every
  coordinate to a direction ``d`` and a log-magnitude ``s``; the update is::

      update = -step_mult * lr_t * d * exp(exp_mult * s)

  (VeLO's ``direction * exp(magnitude * exp_mult) * step_mult``, times its per-tensor LSTM step
  multiplier ``lr_t``). The hypernetwork is a linear modulation of the MLP's first layer: tensor
  ``t`` uses ``W1 diag(gain_t)`` and the bias ``b1 + bias_t``. Rather than VeLO's mixture over a bank
  of MLPs (whose cost grows with the bank size) this costs nothing per coordinate: the gains fold
  into the per-tensor feature normalisation and the bias is one add. A linear skip path from the
  features to the outputs is initialised to pass the normalised Adam direction ``m / sqrt(v)``
  (momentum 0.9) as ``d``, so the untrained rule is a per-tensor normalised Adam with step
  ``step_mult``: it makes small, sane steps from the start and meta-training refines it.

Per-parameter features (as in ``hyper_v2`` / ``adafac_mlp_lopt``, without the factored Adafactor
accumulators): the parameter, the gradient, the gradient clipped to ±0.1, momenta at ``momenta``
timescales, the second moment ``v`` (decay ``rms_beta``), ``m * rsqrt(v)`` for each momentum,
``rsqrt(v)`` and ``g * rsqrt(v)``. Each feature is divided by its root mean square over its tensor
(VeLO's second-moment normaliser), so the MLP sees every tensor at the same scale.

All per-coordinate work is one batched computation over the flat vector of a parameter group, in a
feature-major ``[F, numel]`` layout (the MLP is two small matrix products). The per-tensor
reductions and broadcasts run over views of the tensors' contiguous segments with ``torch._foreach``
ops: one call per operation whatever the number of tensors, as in ``torch.optim``'s foreach Adam,
and an order of magnitude faster on CPU than ``index_add_`` / ``segment_reduce`` over segment ids.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import LEARNED_RULES
from .base import Layout, LearnedRule

#: Progress timescales of VeLO's fractional tanh embedding.
PROGRESS_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
MAX_RANK = 4  # tensors of rank >= 4 share the last one-hot slot


def progress_features(progress: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[9]``: VeLO's tanh embedding of the fraction of training done."""
    return torch.tanh((progress - torch.tensor(PROGRESS_TIMESCALES, dtype=dtype)) * 10)


def segment_views(rows: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """The ``R * T`` contiguous pieces of ``rows [R, numel]``: row by row, tensor by tensor."""
    return rows.reshape(-1).split(list(sizes) * rows.shape[0])


def segment_mean_square(rows: Tensor, sizes: Sequence[int]) -> Tensor:
    """``[R, T]``: the mean of ``rows[r] ** 2`` over the coordinates of each tensor ``t``.

    One ``_foreach_norm`` over views of the segments (no Python loop over tensors).
    """
    norms = torch.stack(torch._foreach_norm(segment_views(rows, sizes))).view(rows.shape[0], len(sizes))
    return norms.square() / torch.tensor(sizes, dtype=rows.dtype, device=rows.device)


def segment_apply(op: str, rows: Tensor, values: Tensor, sizes: Sequence[int]) -> Tensor:
    """``rows [R, numel]`` ``op`` (``"mul"`` or ``"add"``) ``values [R, T]`` broadcast over each tensor's
    coordinates. In place when nothing needs a gradient, else out of place."""
    scalars = values.reshape(-1, 1).unbind(0)
    views = segment_views(rows, sizes)
    if not (torch.is_grad_enabled() and (rows.requires_grad or values.requires_grad)):
        getattr(torch, f"_foreach_{op}_")(views, scalars)
        return rows
    return torch.cat(getattr(torch, f"_foreach_{op}")(views, scalars)).view_as(rows)


@LEARNED_RULES.register("velo")
class VeLORule(LearnedRule):
    """VeLO-style hypernetwork optimizer (Metz et al. 2022), CPU-sized.

    ``state``: ``m [K, numel]`` (momenta), ``v [numel]`` (second moment), ``h``, ``c [T, lstm_hidden]``
    (the per-tensor LSTM).
    """

    name = "velo"

    def __init__(self, hidden: int = 8, lstm_hidden: int = 32, momenta: Sequence[float] = (0.5, 0.9, 0.99),
                 rms_beta: float = 0.999, step_mult: float = 1e-2, exp_mult: float = 1.0) -> None:
        momenta = tuple(float(b) for b in momenta)
        super().__init__(hidden=hidden, lstm_hidden=lstm_hidden, momenta=list(momenta), rms_beta=rms_beta,
                         step_mult=step_mult, exp_mult=exp_mult)
        self.hidden, self.lstm_hidden = hidden, lstm_hidden
        self.momenta, self.rms_beta = momenta, float(rms_beta)
        self.step_mult, self.exp_mult = float(step_mult), float(exp_mult)
        k = len(momenta)
        self.num_features = nf = 6 + 2 * k
        self.register_buffer("betas", torch.tensor(momenta), persistent=False)
        # Per-parameter MLP, feature-major: first layer [hidden + 2, F] (the last two rows are the
        # linear skip path to the outputs), output layer [2, hidden].
        self.w1 = nn.Parameter(torch.randn(hidden + 2, nf) / math.sqrt(nf))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(2, hidden) * (0.01 / math.sqrt(hidden)))
        self.b2 = nn.Parameter(torch.zeros(2))
        with torch.no_grad():  # the skip path starts as the normalised Adam direction m_0.9 / sqrt(v)
            self.w1[hidden:].zero_()
            self.w1[hidden, self.adam_feature].fill_(1.0)
        # Per-tensor LSTM.
        self.num_tensor_features = nt = len(PROGRESS_TIMESCALES) + nf + 1 + MAX_RANK + 1
        self.mix_in = nn.Linear(nt, lstm_hidden)
        self.mix_max = nn.Linear(nt, lstm_hidden)
        self.lstm = nn.LSTMCell(lstm_hidden, lstm_hidden)
        self.controls = nn.Linear(lstm_hidden, 1 + nf + hidden)
        nn.init.zeros_(self.controls.weight)
        nn.init.zeros_(self.controls.bias)
        self._scratch: dict[str, Tensor] = {}

    @property
    def adam_feature(self) -> int:
        """Row of ``m * rsqrt(v)`` for the momentum closest to 0.9 in the feature matrix."""
        k = min(range(len(self.momenta)), key=lambda i: abs(self.momenta[i] - 0.9))
        return 4 + len(self.momenta) + k

    def init_state(self, params: Tensor, layout: Layout) -> dict[str, Tensor]:
        zeros = params.new_zeros(layout.num_tensors, self.lstm_hidden)
        return {"m": params.new_zeros(len(self.momenta), params.numel()), "v": params.new_zeros(params.numel()),
                "h": zeros, "c": zeros.clone()}

    # --- pieces --------------------------------------------------------------------------------

    def features(self, grad: Tensor, params: Tensor, m: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
        """``[F, numel]`` raw per-parameter features (rows: p, g, clip(g), m_k, v, m_k / sqrt(v),
        1 / sqrt(v), g / sqrt(v)); written in place into ``out`` when given (no gradient)."""
        if out is None:
            rsqrt = (v + 1e-12).rsqrt()
            return torch.cat([params[None], grad[None], grad.clamp(-0.1, 0.1)[None], m, v[None], m * rsqrt,
                              rsqrt[None], (grad * rsqrt)[None]])
        k = len(self.momenta)
        out[0].copy_(params)
        out[1].copy_(grad)
        torch.clamp(grad, -0.1, 0.1, out=out[2])
        out[3:3 + k].copy_(m)
        out[3 + k].copy_(v)
        rsqrt = torch.add(v, 1e-12, out=out[4 + 2 * k]).rsqrt_()
        torch.mul(m, rsqrt, out=out[4 + k:4 + 2 * k])
        torch.mul(grad, rsqrt, out=out[5 + 2 * k])
        return out

    def tensor_features(self, mean_sq: Tensor, layout: Layout, progress: float) -> Tensor:
        """``[T, nt]`` inputs of the per-tensor LSTM from the features' per-tensor mean squares ``[F, T]``."""
        t = layout.num_tensors
        dev, dt = mean_sq.device, mean_sq.dtype
        log_ms = (0.1 * torch.log(mean_sq.t() + 1e-30)).clamp(-5.0, 5.0)
        sizes = torch.tensor(layout.sizes, dtype=dt, device=dev)
        ranks = torch.tensor([min(len(s), MAX_RANK) for s in layout.shapes], device=dev)
        return torch.cat([progress_features(progress, dt).to(dev).expand(t, -1), log_ms,
                          (0.1 * sizes.log())[:, None], F.one_hot(ranks, MAX_RANK + 1).to(dt)], dim=1)

    def tensor_controls(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-tensor LSTM step: log lr ``[T]``, log feature gains ``[T, F]``, hidden biases ``[T, H]``."""
        x = self.mix_in(x) + torch.relu(self.mix_max(x)).max(0, keepdim=True).values
        h, c = self.lstm(x, (h, c))
        out = self.controls(h)
        nf = self.num_features
        return out[:, 0], out[:, 1:1 + nf], out[:, 1 + nf:], h, c

    # --- the update ----------------------------------------------------------------------------

    def _work(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A scratch tensor kept between steps (no-grad use): the ``[F, numel]`` blocks of a large group
        are bigger than what the C allocator recycles, and allocating them afresh at every step costs
        more than the step's arithmetic."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch[name] = like.new_empty(shape)
        return buf

    def forward(self, grad: Tensor, params: Tensor, state: dict[str, Tensor], layout: Layout,
                progress: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        sizes, hdim, n = layout.sizes, self.hidden, grad.numel()
        fast = not torch.is_grad_enabled()  # use (no meta-gradient): scratch blocks and in-place ops
        grad = grad.clamp(-1000.0, 1000.0)
        betas = self.betas.to(grad.dtype)[:, None]
        m = torch.lerp(state["m"], grad.expand_as(state["m"]), 1 - betas)
        v = torch.lerp(state["v"], grad * grad, 1 - self.rms_beta)
        x = self.features(grad, params, m, v, self._work("x", (self.num_features, n), grad) if fast else None)
        mean_sq = segment_mean_square(x, sizes)  # [F, T]
        lr_log, gain_log, bias, h, c = self.tensor_controls(self.tensor_features(mean_sq, layout, progress),
                                                           state["h"], state["c"])
        # second-moment normalisation and the per-tensor feature gains, folded into one scale
        x = segment_apply("mul", x, (mean_sq + 1e-12).rsqrt() * gain_log.t().exp(), sizes)
        a = torch.mm(self.w1, x, out=self._work("a", (hdim + 2, n), grad)) if fast else self.w1 @ x
        hid = segment_apply("add", a[:hdim], self.b1[:, None] + bias.t(), sizes)
        hid = hid.relu_() if fast else hid.relu()
        out = torch.addmm(a[hdim:], self.w2, hid).add_(self.b2[:, None])  # [2, numel]: direction, log-magnitude
        scale = segment_apply("mul", torch.exp(self.exp_mult * out[1:]), -self.step_mult * lr_log[None].exp(), sizes)
        update = out[0] * scale[0]
        return update, {"m": m, "v": v, "h": h, "c": c}


__all__ = ["VeLORule", "progress_features", "segment_apply", "segment_mean_square", "segment_views"]
