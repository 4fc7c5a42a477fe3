"""Conv-4's ``BatchNorm -> ReLU -> 2x2 max-pool`` in one pass-saving operation, for the CPU.

A Conv-4 block spends more time in these three memory-bound layers than in its convolution at
the first block's full resolution (28x28x64 per image): PyTorch's NCHW max-pooling on the CPU
alone is about 7x slower than a pairwise ``maximum`` of strided views, and each layer reads and
writes the full-resolution tensor again in the forward and the backward pass. This module
computes the same function with fewer full-resolution passes:

* batch statistics of the convolution output ``z`` (mean, then the centred variance);
* the 2x2 maximum of ``z - mean`` itself. Batch normalisation is then a per-channel affine map
  ``a * (z - mean) + beta`` with ``a = gamma / sqrt(var + eps)``; for ``a >= 0`` it is monotone,
  so pooling before it picks the same element (channels with ``gamma < 0`` are negated first),
  and ReLU commutes with max-pooling. Affine map and ReLU then run at a quarter of the size;
* in the backward pass, BatchNorm's input gradient ``a * (dy - mean(dy) - xhat * mean(dy * xhat))``
  with ``dy`` non-zero only at each window's maximum: the two channel means come from the
  pooled tensors, and the full-resolution work is one multiply-add plus the scatter of the
  pooled gradient to the maxima (the first maximum of a window on ties, as ``max_pool2d``).

For float32 tensors (NCHW or channels-last) and bfloat16 channels-last ones (what convolutions
return under bf16 autocast) the same arithmetic runs in native kernels where they can be built
(:mod:`fastadapt.models.native`): two passes over ``z`` forward (statistics; normalise, rectify and
pool) and one backward (the input gradient written once), against several full-resolution
passes of the PyTorch operations each way; bfloat16 is read and written as such, with all
arithmetic in float32. Otherwise (float64, no C compiler) the PyTorch operations below run; a
bfloat16 block without the native kernels runs PyTorch's layers.

The result equals ``max_pool2d(relu(batch_norm(z, training=True)), 2)`` and its gradients up to
float rounding (``tests/test_fused.py`` and ``tests/test_native.py`` check both against float64).
The backward pass is written by hand and is not itself differentiable, so the operation is only
used inside :func:`fused_blocks`, which callers enter where nothing differentiates the gradient
again (MAML's query pass, ProtoNet's episode loss); elsewhere Conv-4 runs its layers one by one.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import native
from .norm import BatchStatNorm

#: Set to False to run every Conv-4 layer on its own, even inside :func:`fused_blocks` (to compare
#: the two paths, as ``benchmarks/maml_speed.py`` does).
ENABLED = True

_STATE = threading.local()


@contextlib.contextmanager
def fused_blocks(enabled: bool = True) -> Iterator[None]:
    """Within this block, Conv-4 forward passes that qualify (see :func:`can_fuse`) use
    :func:`bn_relu_pool`. Enter it only where the result is differentiated at most once."""
    old = getattr(_STATE, "enabled", False)
    _STATE.enabled = enabled
    try:
        yield
    finally:
        _STATE.enabled = old


def fusion_enabled() -> bool:
    """True inside :func:`fused_blocks` (when :data:`ENABLED`)."""
    return ENABLED and getattr(_STATE, "enabled", False)


def _in_functorch_transform() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def can_fuse(z: Tensor, bn: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether :func:`bn_relu_pool` computes ``pool(relu(bn(z)))`` here: inside
    :func:`fused_blocks`, outside ``torch.func`` transforms and ``torch.compile``, on an NCHW or
    channels-last float32/float64 CPU tensor, or one the native kernels take (under autocast, and
    for bfloat16: see :func:`fastadapt.models.native.layout`), for a BatchNorm that normalises with
    batch statistics (training mode, or no running statistics), a plain ReLU and a 2x2 max-pool
    of stride 2."""
    if torch.compiler.is_compiling():  # first: compiled graphs fuse the plain layers themselves
        return False
    if not fusion_enabled() or _in_functorch_transform():
        return False
    if z.device.type != "cpu" or z.dim() != 4:
        return False
    if not (z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last)):
        return False
    if z.shape[0] == 0 or z.shape[-2] < 2 or z.shape[-1] < 2:  # PyTorch's layers say what is wrong
        return False
    if z.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return False
    if isinstance(bn, BatchStatNorm):
        ok_bn = bn.affine
    elif isinstance(bn, nn.BatchNorm2d):
        ok_bn = bn.affine and (bn.training or bn.running_mean is None)
    else:
        ok_bn = False
    ok_pool = (
        type(pool) is nn.MaxPool2d
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
    )
    if not (ok_bn and ok_pool and type(relu) is nn.ReLU):
        return False
    # bfloat16 (what autocast's convolutions return) only in the native kernels, which compute in
    # float32; PyTorch operations in bfloat16 would round every intermediate
    if z.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"):
        return native.usable(z)
    return True


def bn_relu_pool(z: Tensor, bn: nn.Module) -> Tensor:
    """``max_pool2d(relu(bn(z)), 2)`` for a BatchNorm ``bn`` that uses batch statistics (see
    :func:`can_fuse`); updates ``bn``'s running statistics as ``nn.BatchNorm2d`` does."""
    out, mean, var = affine_relu_pool(z, bn.weight, bn.bias, bn.eps)
    if bn.training and getattr(bn, "running_mean", None) is not None:
        with torch.no_grad():
            n = z.numel() // z.shape[1]
            bn.num_batches_tracked.add_(1)
            # momentum None: the cumulative average, as nn.BatchNorm2d
            m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean, alpha=m)
            bn.running_var.mul_(1 - m).add_(var * (n / max(n - 1, 1)), alpha=m)
    return out


def affine_relu_pool(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``max_pool2d(relu(batch_norm(z, None, None, gamma, beta, training=True, eps=eps)), 2)`` with
    per-channel tensors ``gamma`` and ``beta`` (any sign), and the batch mean and biased variance
    of ``z`` per channel (no gradient). The caller checks :func:`can_fuse` first."""
    if bool((gamma == 0).any()):
        # Every element of a window ties after the affine map: max_pool2d's rule (the first one)
        # decides which one the weight's gradient sees, so the layers run as they are.
        var, mean = torch.var_mean(z.detach().float() if z.dtype == torch.bfloat16 else z.detach(), (0, 2, 3),
                                   correction=0)
        out = F.max_pool2d(F.relu(F.batch_norm(z, None, None, gamma, beta, True, 0.0, eps)), 2)
        return out, mean, var
    if native.usable(z):
        return _BNReLUPool.apply(z, gamma, beta, eps, _NativeKernels)
    negative = gamma < 0
    if not bool(negative.any()):
        return _BNReLUPool.apply(z, gamma, beta, eps, _TorchKernels)
    # pool the negated channels: for them the affine map is decreasing
    sign = 1.0 - 2.0 * negative.to(z.dtype)
    out, mean, var = _BNReLUPool.apply(z * sign.view(1, -1, 1, 1), gamma * sign, beta, eps, _TorchKernels)
    return out, mean * sign, var


def _mask(condition: Tensor, dtype: torch.dtype) -> Tensor:
    return condition.view(torch.uint8).to(dtype)


class _BNReLUPool(torch.autograd.Function):
    """The fused block: the output and the batch mean and (biased) variance, which carry no
    gradient, computed by ``kernels`` (:class:`_TorchKernels` or :class:`_NativeKernels`), which
    also say what the backward pass keeps."""

    @staticmethod
    def forward(ctx, z: Tensor, gamma: Tensor, beta: Tensor, eps: float,
                kernels: type) -> tuple[Tensor, Tensor, Tensor]:
        out, mean, var, saved = kernels.forward(z, gamma, beta, eps)
        ctx.kernels = kernels
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _gm: Tensor, _gv: Tensor) -> tuple[Tensor | None, ...]:
        return (*ctx.kernels.backward(grad_out, *ctx.saved_tensors), None, None)


class _TorchKernels:
    """The block from PyTorch operations, for ``gamma >= 0`` (the caller negates the other
    channels)."""

    @staticmethod
    def forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, tuple]:
        n, c, h, w = z.shape
        count = n * h * w
        view = (1, c, 1, 1)
        mean = z.sum((0, 2, 3)) / count
        # Everything below works on z - mean, as batch norm does: the backward pass's affine
        # term then has no large, nearly cancelling parts.
        centred = z - mean.view(view)
        var = (centred * centred).sum((0, 2, 3)) / count
        invstd = torch.rsqrt(var + eps)
        scale = gamma * invstd
        # max_pool2d drops a last odd row or column; so do the windows here.
        cc = centred[..., : h // 2 * 2, : w // 2 * 2]
        left, right = cc[..., 0::2], cc[..., 1::2]
        cols = torch.maximum(left, right)
        # Which element of each window is its maximum, as 0/1 masks in z's dtype (CPU kernels
        # that mix bool and float tensors are not vectorised: converting once is cheaper).
        # Ties go to the first element, as in max_pool2d.
        left_wins = _mask(left >= right, z.dtype)
        top, bottom = cols[..., 0::2, :], cols[..., 1::2, :]
        pooled = torch.maximum(top, bottom)
        top_wins = _mask(top >= bottom, z.dtype)
        del cols
        out = torch.addcmul(beta.view(view), pooled, scale.view(view)).clamp_min_(0)
        return out, mean, var, (centred, pooled, out, left_wins, top_wins, invstd, scale)

    @staticmethod
    def backward(grad_out: Tensor, centred: Tensor, pooled: Tensor, out: Tensor, left_wins: Tensor,
                 top_wins: Tensor, invstd: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, c, h, w = centred.shape
        count = n * h * w
        view = (1, c, 1, 1)
        g = torch.ops.aten.threshold_backward(grad_out, out, 0)  # ReLU's backward kernel
        grad_beta = g.sum((0, 2, 3))
        grad_gamma = (g * pooled).sum((0, 2, 3)) * invstd
        # d z = a * (dy - mean(dy) - xhat * mean(dy * xhat)); the two means are over all of z,
        # where dy is zero off the window maxima.
        grad_z = torch.addcmul((-scale * grad_beta / count).view(view), centred,
                               (-scale * invstd * grad_gamma / count).view(view))
        g = g * scale.view(view)
        g_top = g * top_wins
        rows = torch.empty_like(left_wins)  # the gradient of the column maxima, in z's layout
        rows[..., 0::2, :] = g_top
        torch.sub(g, g_top, out=rows[..., 1::2, :])
        g_left = rows * left_wins
        gz = grad_z[..., : h // 2 * 2, : w // 2 * 2]
        gz[..., 0::2] += g_left
        gz[..., 1::2].add_(rows).sub_(g_left)
        return grad_z, grad_gamma, grad_beta


class _NativeKernels:
    """The block in :mod:`fastadapt.models.native`'s kernels (any sign of ``gamma``); keeps ``z``
    itself, the pooled values and each window's chosen position (one byte) for the backward pass."""

    @staticmethod
    def forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, tuple]:
        out, pooled, idx, mean, var, invstd = native.forward(z, gamma, beta, eps)
        return out, mean, var, (z, out, pooled, idx, mean, invstd, gamma)

    @staticmethod
    def backward(grad_out: Tensor, *saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return native.backward(grad_out, *saved)
