"""Several tasks' copies of one network evaluated as one network: MAML's ``--batching grouped``.

The optimization-based meta-learners adapt a copy of the weights per task. Evaluating ``T``
tasks at once (``x`` of shape ``[T, N, ...]``, every parameter stacked to ``[T, ...]``) needs each
layer in a form that keeps the tasks apart:

* a convolution becomes one grouped convolution over the tasks' channels stacked side by side
  (``[N, T*C, H, W]`` with ``groups=T``);
* BatchNorm with batch statistics, on that layout, normalises each (task, channel) pair over its
  own ``N x H x W`` values: exactly the per-task statistics (and PyTorch's batch-norm kernel,
  whose second derivative is right outside ``torch.func.vmap``);
* ReLU and max-pooling act per channel, so they need nothing; inside
  :func:`fastadapt.models.fused.fused_blocks` a block's BatchNorm, ReLU and pooling still run as
  one fused operation;
* a linear layer becomes a batched matrix product (``[T, N, in] @ [T, in, out]``).

This is what ``torch.func.vmap`` does to the same layers through its batching rules, written
directly: the per-task Python loop, vmap and this differ in speed and memory, and in results only
by float rounding (``tests/test_maml.py`` checks the meta-gradients against the loop in float64). A module takes part either
by being one of the layers above (or an ``nn.Sequential`` of them) or by defining
``grouped_forward(params, x)``, as :class:`~fastadapt.models.conv4.Conv4` and
:class:`~fastadapt.models.mlp.MLP` do.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .norm import BatchStatNorm


def sub_params(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix.``, with the prefix removed."""
    cut = prefix + "."
    return {k[len(cut):]: v for k, v in params.items() if k.startswith(cut)}


def stacked(module: nn.Module, params: Mapping[str, Tensor], name: str, tasks: int) -> Tensor | None:
    """Parameter ``name`` of ``module`` for ``tasks`` tasks: ``params[name]`` (``[T, ...]``) when
    given, else the module's own (shared, not adapted) parameter broadcast to ``[T, ...]``."""
    if name in params:
        return params[name]
    own = getattr(module, name, None)
    return None if own is None else own.expand(tasks, *own.shape)


#: Layers without children that :func:`grouped_call` runs (with the checks of :func:`check_grouped`).
LEAVES = (nn.Linear, nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Conv2d, BatchStatNorm,
          nn.BatchNorm2d)


def check_grouped(module: nn.Module) -> None:
    """Raise a ConfigError naming the first part of ``module`` that :func:`grouped_call` cannot run:
    every module must define ``grouped_forward``, be an ``nn.Sequential`` or be one of
    :data:`LEAVES`; modules with ``grouped_forward`` are checked through their children."""
    if getattr(module, "grouped_forward", None) is not None or isinstance(module, nn.Sequential):
        for child in module.children():
            check_grouped(child)
        return
    if not isinstance(module, LEAVES):
        raise _unsupported(type(module).__name__)
    if isinstance(module, nn.Conv2d):
        _check_conv(module)
    if isinstance(module, nn.Flatten) and not (module.start_dim == 1 and module.end_dim == -1):
        raise _unsupported("Flatten other than flatten(1)")
    if isinstance(module, (BatchStatNorm, nn.BatchNorm2d)):
        _check_norm(module)


def _unsupported(what: str) -> ConfigError:
    return ConfigError(f"--batching grouped has no grouped form of {what}; use --batching loop or vmap for this model")


def grouped_call(module: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``module`` applied to each task's inputs with that task's parameters: ``x`` is
    ``[T, N, ...]``, ``params`` maps (some of) ``module``'s parameter names to ``[T, ...]``
    tensors (the others are shared by all tasks); returns ``[T, N, ...]``."""
    custom = getattr(module, "grouped_forward", None)
    if custom is not None:
        return custom(params, x)
    tasks = x.shape[0]
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            x = grouped_call(child, sub_params(params, name), x)
        return x
    if isinstance(module, nn.Linear):
        if x.dim() != 3:
            raise _unsupported(f"a linear layer on inputs of shape {tuple(x.shape[2:])} (one feature dimension only)")
        weight = stacked(module, params, "weight", tasks)
        bias = stacked(module, params, "bias", tasks)
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    if isinstance(module, (nn.ReLU, nn.Identity)):
        return module(x)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):  # per image and channel
        out = module(x.flatten(0, 1))
        return out.view(*x.shape[:2], *out.shape[1:])
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return x.flatten(2)
    if isinstance(module, (nn.Conv2d, BatchStatNorm, nn.BatchNorm2d)):
        if x.dim() != 5:
            raise _unsupported(f"{type(module).__name__} on inputs of shape {tuple(x.shape[2:])} (images only)")
        # One layer on its own (a Conv-4 runs all its blocks in the channel layout instead).
        layer = conv2d if isinstance(module, nn.Conv2d) else batch_norm
        out = layer(module, params, to_channels(x), tasks)
        return out.view(out.shape[0], tasks, -1, *out.shape[2:]).transpose(0, 1)
    raise _unsupported(type(module).__name__)


def to_channels(x: Tensor) -> Tensor:
    """``[T, N, C, H, W] -> [N, T*C, H, W]``: the tasks' channels side by side (a copy)."""
    tasks, n, c = x.shape[:3]
    return x.transpose(0, 1).reshape(n, tasks * c, *x.shape[3:])


def from_channels(z: Tensor, tasks: int) -> Tensor:
    """``[N, T*C, H, W] -> [T, N, C*H*W]``: each task's features, flattened as ``flatten(1)``
    flattens one task's ``[N, C, H, W]``."""
    return z.reshape(z.shape[0], tasks, -1).transpose(0, 1)


def conv2d(conv: nn.Conv2d, params: Mapping[str, Tensor], z: Tensor, tasks: int) -> Tensor:
    """``conv`` on the channel-stacked ``z`` (``[N, T*C, H, W]``), one weight per task."""
    _check_conv(conv)
    weight = stacked(conv, params, "weight", tasks)
    bias = stacked(conv, params, "bias", tasks)
    weight = weight.reshape(-1, *weight.shape[2:])
    return F.conv2d(z, weight, None if bias is None else bias.reshape(-1), conv.stride, conv.padding,
                    conv.dilation, groups=tasks)


def _check_conv(conv: nn.Conv2d) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ConfigError("--batching grouped supports plain convolutions (groups=1, zero padding given as "
                          "numbers); use --batching loop or vmap for this model")


def _check_norm(norm: nn.Module) -> None:
    if not isinstance(norm, BatchStatNorm) and not (isinstance(norm, nn.BatchNorm2d) and norm.running_mean is None):
        raise ConfigError(f"--batching grouped normalises with batch statistics only, not with {norm!r}; "
                          "use --batching loop")


def batch_norm(norm: nn.Module, params: Mapping[str, Tensor], z: Tensor, tasks: int) -> Tensor:
    """Batch-statistics normalisation of the channel-stacked ``z``: per task and channel."""
    _check_norm(norm)
    weight, bias = (affine_params(norm, params, tasks) if norm.affine else (None, None))
    return F.batch_norm(z, None, None, weight, bias, True, 0.0, norm.eps)


def affine_params(norm: nn.Module, params: Mapping[str, Tensor], tasks: int) -> tuple[Tensor, Tensor]:
    """A normalisation layer's ``weight`` and ``bias`` for ``tasks`` tasks, as ``[T*C]`` vectors."""
    return (stacked(norm, params, "weight", tasks).reshape(-1), stacked(norm, params, "bias", tasks).reshape(-1))
