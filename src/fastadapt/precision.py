"""Mixed precision: ``--precision bf16`` runs matrix products and convolutions in bfloat16.

The weights stay float32 (the optimiser updates float32 master weights) and so does every
elementwise update: :func:`autocast` only changes the dtype of the operations on PyTorch's
autocast lists (convolutions, matrix products), whose results are cast back where a float32
tensor meets them. Computations that lose too much in bfloat16 are pinned to float32 with
:func:`full_precision`: the expanded squared distance of Prototypical Networks (a difference of
large, nearly equal terms) and normalisation statistics.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16")
#: Memory layouts of convolutional backbones: ``auto`` is decided per device by :func:`decide_memory_format`.
MEMORY_FORMATS = ("auto", "channels_last", "nchw")
F = TypeVar("F", bound=Callable[..., Any])


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(device: torch.device | str, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for ``fp32``). ``cache=False``
    casts the weights anew at each use, as a region recorded in a CUDA graph needs."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)


def full_precision(fn: F) -> F:
    """Run ``fn`` in float32 even inside a bfloat16 autocast region (tensor arguments are cast)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_autocast_enabled(_device_of(args)):
            return fn(*args, **kwargs)
        cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(_device_of(args), enabled=False):
            return fn(*cast, **kwargs)

    return wrapper  # type: ignore[return-value]


def _device_of(args: tuple[Any, ...]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def decide_memory_format(memory_format: str, device: torch.device | str, fused_training: bool = False) -> str:
    """``channels_last`` or ``nchw`` for ``memory_format`` on ``device``.

    ``auto`` is channels-last on a GPU. On the CPU channels-last is faster (oneDNN) but PyTorch's
    CPU BatchNorm sums a channels-last input in plain float32 order, so Conv-4's float32
    meta-gradient is about 1e-2 (relative) away from the float64 one, against about 6e-5 in NCHW
    (``benchmarks/conv4_grad_accuracy.py``): ``auto`` is NCHW there, exactness first, unless the
    learner trains only through Conv-4's fused blocks (``fused_training``, ProtoNet), which
    compute the batch statistics themselves and are as exact in channels-last as in NCHW (and
    fastest there, in float32 and bf16; see :mod:`fastadapt.models.native`).
    """
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"--memory-format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    if memory_format != "auto":
        return memory_format
    if torch.device(device).type == "cuda" or fused_training:
        return "channels_last"
    return "nchw"
