"""Implicit neural representations (INRs): a coordinate MLP with a Fourier positional encoding.

An image is represented as a function ``f(x) -> pixel values`` from coordinates ``x`` in
``[-1, 1]^2`` (pixel centres). The network is the one of Chen & Wang's Trans-INR code (their
``hypo_mlp``): the coordinates are encoded as ``cos(pi * w_k * x), sin(pi * w_k * x)`` with
frequencies ``w_k`` spaced logarithmically from 1 to ``pe_sigma`` (``pe_dim / 2`` of them per
coordinate), followed by ``depth`` linear layers (``depth - 1`` hidden layers of ``width`` units
with ReLU, then a linear output of ``out_dim`` values plus a constant ``out_bias``, 0.5, the middle
of the pixel range).

Parameters live in a flat dict ``{"w0": [in, width], "b0": [width], ..., "w{d-1}": [width, out],
"b{d-1}": [out]}``; weights are stored input-major (``x @ w + b``) so that a column of ``w`` is
one output unit, as Trans-INR modulates them. :func:`inr_apply` evaluates the network for one
parameter dict or for a batch of them (a leading dimension on every tensor), so the same code
runs the Trans-INR prediction (one network per image of a batch) and the functional inner loop
of Learned Init (``torch.func.functional_call`` on :class:`INR`).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def fourier_frequencies(pe_dim: int, pe_sigma: float, device: torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``pe_dim // 2`` frequencies ``exp(linspace(0, log(pe_sigma)))`` of the encoding."""
    return torch.exp(torch.linspace(0.0, math.log(pe_sigma), pe_dim // 2, device=device, dtype=dtype))


def fourier_encode(x: Tensor, freqs: Tensor) -> Tensor:
    """``x [..., in_dim] -> [..., in_dim * 2 * len(freqs)]``: all cosines, then all sines, of
    ``pi * x_i * w_k`` (ordered coordinate-major, as the reference code)."""
    z = (x.unsqueeze(-1) * freqs).flatten(-2)
    return torch.cat([torch.cos(math.pi * z), torch.sin(math.pi * z)], dim=-1)


def inr_param_shapes(depth: int, width: int, out_dim: int, in_dim: int = 2,
                     pe_dim: int = 128) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters of an INR, in layer order (``w{i}`` input-major, ``b{i}``)."""
    check_inr_sizes(depth, width, pe_dim)
    shapes: dict[str, tuple[int, ...]] = {}
    last = in_dim * pe_dim
    for i in range(depth):
        cur = width if i < depth - 1 else out_dim
        shapes[f"w{i}"] = (last, cur)
        shapes[f"b{i}"] = (cur,)
        last = cur
    return shapes


def check_inr_sizes(depth: int, width: int, pe_dim: int) -> None:
    if not (isinstance(depth, int) and depth >= 1):
        raise ConfigError(f"--inr-depth must be a whole number >= 1 (linear layers), got {depth!r}")
    if not (isinstance(width, int) and width >= 1):
        raise ConfigError(f"--inr-width must be a whole number >= 1, got {width!r}")
    if not (isinstance(pe_dim, int) and pe_dim >= 2 and pe_dim % 2 == 0):
        raise ConfigError(f"--pe-dim must be an even whole number >= 2 (a cosine and a sine per frequency), "
                          f"got {pe_dim!r}")


def inr_apply(params: Mapping[str, Tensor], x: Tensor, freqs: Tensor, out_bias: float = 0.5) -> Tensor:
    """Evaluate the INR with ``params`` at coordinates ``x``.

    Unbatched: ``x [N, in_dim]``, ``w{i} [a, b]``, ``b{i} [b]`` -> ``[N, out_dim]``.
    Batched: ``x [B, N, in_dim]``, ``w{i} [B, a, b]``, ``b{i} [B, b]`` -> ``[B, N, out_dim]``.
    """
    h = fourier_encode(x, freqs)
    depth = sum(1 for k in params if k.startswith("w"))
    for i in range(depth):
        h = torch.matmul(h, params[f"w{i}"]) + params[f"b{i}"].unsqueeze(-2)
        if i < depth - 1:
            h = torch.relu(h)
    return h + out_bias


class INR(nn.Module):
    """The coordinate MLP as a module holding one set of parameters (an initialisation).

    ``INR(depth=5, width=256, out_dim=3, pe_dim=128, pe_sigma=1024)`` is the network of the
    paper's image experiments. Parameters are initialised as ``nn.Linear``'s (Kaiming-uniform
    weights, uniform biases of bound ``1/sqrt(fan_in)``), as both reference implementations do.
    ``forward(x)``: ``[..., N, 2] -> [..., N, out_dim]``.
    """

    def __init__(self, depth: int = 4, width: int = 64, out_dim: int = 3, in_dim: int = 2, pe_dim: int = 32,
                 pe_sigma: float = 16.0, out_bias: float = 0.5) -> None:
        super().__init__()
        if not (pe_sigma >= 1 and math.isfinite(pe_sigma)):
            raise ConfigError(f"--pe-sigma must be a number >= 1 (the highest frequency), got {pe_sigma!r}")
        self.depth, self.width, self.out_dim, self.in_dim = depth, width, out_dim, in_dim
        self.pe_dim, self.pe_sigma, self.out_bias = pe_dim, float(pe_sigma), float(out_bias)
        self.shapes = inr_param_shapes(depth, width, out_dim, in_dim, pe_dim)
        for name, shape in self.shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.register_buffer("freqs", fourier_frequencies(pe_dim, pe_sigma), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i in range(self.depth):
            w, b = init_linear(*self.shapes[f"w{i}"])
            with torch.no_grad():
                getattr(self, f"w{i}").copy_(w)
                getattr(self, f"b{i}").copy_(b)

    def forward(self, x: Tensor) -> Tensor:
        # getattr, not named_parameters(): under torch.func.functional_call the attributes are
        # the tensors being called with.
        params = {k: getattr(self, k) for k in self.shapes}
        return inr_apply(params, x, self.freqs.to(x.dtype), self.out_bias)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, width={self.width}, out_dim={self.out_dim}, pe_dim={self.pe_dim}, "
                f"pe_sigma={self.pe_sigma:g}, out_bias={self.out_bias:g}")


def init_linear(fan_in: int, fan_out: int) -> tuple[Tensor, Tensor]:
    """``nn.Linear``'s default initialisation, returned input-major: ``w [fan_in, fan_out]``, ``b [fan_out]``."""
    w = torch.empty(fan_out, fan_in)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(fan_in)
    b = torch.empty(fan_out).uniform_(-bound, bound)
    return w.t().contiguous(), b


#: The INR options shared by every image-function method (flag names ``--inr-depth`` etc.), with the
#: CPU-sized defaults; the paper's network is ``inr_depth=5, inr_width=256, pe_dim=128, pe_sigma=1024``
#: (``configs/trans_inr_paper.yaml``).
INR_OPTIONS: dict[str, object] = {
    "inr_depth": 4,
    "inr_width": 64,
    "pe_dim": 32,
    "pe_sigma": 16.0,
    "out_bias": 0.5,
}

#: One line of help per INR option, for the methods that fit or predict this network.
INR_OPTION_HELP: dict[str, str] = {
    "inr_depth": "layers of the coordinate MLP",
    "inr_width": "hidden width of the coordinate MLP",
    "pe_dim": "Fourier features of the positional encoding",
    "pe_sigma": "scale of the positional encoding's frequencies",
    "out_bias": "constant added to the network's output (pixel values in [0, 1])",
    "support_fraction": "fraction of pixels observed in the support set (1: all)",
}


def build_inr(opts: Mapping[str, object], in_shape: tuple[int, ...]) -> INR:
    """The INR of ``opts`` (keys of :data:`INR_OPTIONS`) for images of shape ``in_shape = (C, H, W)``."""
    o = {**INR_OPTIONS, **opts}
    return INR(depth=int(o["inr_depth"]), width=int(o["inr_width"]), out_dim=int(in_shape[0]),
               pe_dim=int(o["pe_dim"]), pe_sigma=float(o["pe_sigma"]), out_bias=float(o["out_bias"]))
