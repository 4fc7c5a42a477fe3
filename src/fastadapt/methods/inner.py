"""The one functional inner loop of the optimization-based meta-learners.

MAML, first-order MAML, ANIL, Meta-SGD, Reptile and iMAML all fit a task by a few gradient
steps on a *dictionary of parameters*, never by mutating a module: the model is evaluated with
``torch.func.functional_call`` and differentiated with ``torch.func.grad_and_value``. Because the
steps are pure functions of (parameters, data), the same code

* keeps the graph for the second-order meta-gradient (MAML, Meta-SGD) or cuts it (FOMAML,
  Reptile, iMAML, and every adaptation at evaluation time),
* runs one task at a time or all tasks of a meta-batch at once under ``torch.func.vmap``
  (:func:`map_tasks`), and
* can recompute each step in the backward pass instead of storing it (gradient checkpointing
  across inner steps), so second-order MAML's memory grows with the parameters, not the
  activations, of each extra step.

BatchNorm policy. Inside the inner loop every normalisation layer uses the statistics of the
batch it is given (the support set while adapting, the query set when predicting): the
transductive setting of Finn et al. (2017) and of the papers that follow it. Running statistics
are neither used nor updated. :func:`convert_batchnorm` swaps ``nn.BatchNorm*`` for
:class:`BatchStatNorm`, which computes that normalisation with plain tensor ops under vmap.
Plain ops matter: under ``torch.func.vmap`` over tasks, the second derivative of PyTorch's fused
batch-norm kernel is wrong (second-order MAML gradients through it differ from a per-task loop
by ~1e-3 relative, in float64 too), whereas mean and variance written out are batched exactly,
so the vmap and loop paths agree to rounding error (``tests/test_maml.py``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import ConfigError, NonFiniteLossError
from ..models.norm import BatchStatNorm

Params = dict[str, Tensor]


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` (in place) by :class:`BatchStatNorm`,
    keeping its affine weights. Returns ``module`` (or the replacement if it is itself a norm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = BatchStatNorm(module.num_features, module.eps, module.affine)
        if module.affine:
            new.to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        return new
    for name, child in module.named_children():
        new_child = convert_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    # ReLU(inplace=True) would overwrite a tensor the second-order graph still needs under
    # functional_call; out-of-place costs one extra buffer per activation.
    for child in module.modules():
        if isinstance(child, (nn.ReLU, nn.LeakyReLU)) and getattr(child, "inplace", False):
            child.inplace = False
    return module


# --------------------------------------------------------------------------------------------
# Inner optimisers: optax-style (init, update) pairs over parameter dicts.


class InnerSGD:
    """Plain gradient descent ``p <- p - lr * g``; ``lr`` is a float or, for Meta-SGD, a dict of
    per-parameter learning-rate tensors (differentiable)."""

    def __init__(self, lr: float | Mapping[str, Tensor]) -> None:
        self.lr = lr

    def init(self, params: Params) -> Any:
        return ()

    def update(self, grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        if isinstance(self.lr, Mapping):
            return {k: p - self.lr[k] * grads[k] for k, p in params.items()}, state
        return {k: p - self.lr * grads[k] for k, p in params.items()}, state


class InnerAdam:
    """Adam (Kingma & Ba, 2015) as a pure function, for Reptile's inner loop."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> None:
        # beta1 = 0 is what Nichol et al. use for Reptile's inner Adam.
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: Params) -> Any:
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        return (zeros, {k: torch.zeros_like(p) for k, p in params.items()}, 0)

    def update(self, grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        m, v, t = state
        b1, b2 = self.betas
        t = t + 1
        m = {k: b1 * m[k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * v[k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = {k: p - self.lr * (m[k] / c1) / (torch.sqrt(v[k] / c2) + self.eps) for k, p in params.items()}
        return new, (m, v, t)


# --------------------------------------------------------------------------------------------
# The inner loop.

Forward = Callable[[Params, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def module_forward(module: nn.Module, fixed: Mapping[str, Tensor] | None = None) -> Forward:
    """``forward(params, x)`` evaluating ``module`` with ``params`` (plus ``fixed`` tensors, e.g.
    parameters that are not adapted) through ``functional_call``."""
    fixed = dict(fixed or {})

    def forward(params: Params, x: Tensor) -> Tensor:
        return functional_call(module, {**fixed, **params} if fixed else params, (x,))

    return forward


def inner_loop(
    forward: Forward,
    loss_fn: LossFn,
    params: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    optimizer: Any,
    *,
    differentiable: bool,
    checkpoint: bool = False,
    regularizer: Callable[[Params], Tensor] | None = None,
    per_task: bool = False,
) -> tuple[Params, Tensor]:
    """Fit ``params`` to ``(x, y)`` with ``steps`` steps of ``optimizer``.

    ``differentiable=True`` keeps the graph through every gradient (second-order MAML);
    ``False`` treats each inner gradient as a constant (first-order MAML; Reptile, iMAML and
    evaluation, whose outputs are detached by the caller when wanted), so the path from
    ``params`` to the result is the identity plus anything the optimiser itself makes
    differentiable (Meta-SGD's learning rates). ``checkpoint=True`` (second order only) stores
    only the parameters between steps and recomputes each step during the backward pass.
    ``regularizer(params)`` is added to the data loss (iMAML's proximal term).

    ``per_task=True``: the parameters are stacked over ``T`` tasks (``--batching grouped``) and
    ``loss_fn`` returns one loss per task (``[T]``); their sum is differentiated, so each task's
    parameters get their own task's gradient, and the inner losses are ``[steps, T]``. (A
    ``regularizer`` must then return per-task terms too.)

    Returns the adapted parameters and the inner losses ``[steps]`` (before each step), which
    the caller checks for NaN/inf once per meta-batch instead of synchronising every step.
    """

    def objective(p: Params) -> tuple[Tensor, Tensor]:
        loss = loss_fn(forward(p, x), y)
        if regularizer is not None:
            loss = loss + regularizer(p)
        if per_task != (loss.dim() == 1):
            raise ValueError(f"inner_loop(per_task={per_task}) needs a loss of {'one value per task' if per_task else 'one value'}, "
                             f"got shape {tuple(loss.shape)}")
        return (loss.sum() if per_task else loss), loss.detach()

    grad_fn = grad_and_value(objective, has_aux=True)
    state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        if differentiable and checkpoint and torch.is_grad_enabled():
            keys = list(params)

            def one_step(*flat: Tensor, _state=state) -> tuple[Tensor, ...]:
                # torch.func transforms refuse the saved-tensor hooks checkpointing relies on;
                # the step's gradient is the same with plain autograd (checkpointing runs as a loop).
                p = dict(zip(keys, flat))
                total, loss = objective(p)
                g = dict(zip(keys, torch.autograd.grad(total, flat, create_graph=True)))
                new, _ = optimizer.update(g, _state, p)
                return (*(new[k] for k in keys), loss)

            *flat, loss = _checkpoint(one_step, *(params[k] for k in keys), use_reentrant=False)
            params = dict(zip(keys, flat))
        else:
            if differentiable:
                g, (_, loss) = grad_fn(params)
            else:
                g, (_, loss) = grad_fn({k: p.detach() for k, p in params.items()})
            params, state = optimizer.update(g, state, params)
        losses.append(loss.detach())
    empty = torch.zeros(0, device=x.device)
    return params, (torch.stack(losses) if losses else empty)


def check_inner_losses(losses: Tensor, where: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the first inner step and task whose loss is NaN
    or infinite. ``losses`` is ``[tasks, steps]`` (one host sync per meta-batch)."""
    if losses.numel() == 0 or bool(torch.isfinite(losses).all()):
        return
    bad = (~torch.isfinite(losses)).nonzero()
    task, step = (int(v) for v in bad[0])
    value = float(losses[task, step])
    raise NonFiniteLossError(
        f"the inner loss became {value} at inner step {step + 1} of task {task} ({where}); "
        "lower --inner-lr or the number of inner steps"
    )


# --------------------------------------------------------------------------------------------
# Mapping a per-task function over a meta-batch.

BATCHING_MODES = ("auto", "vmap", "loop")


def resolve_batching(mode: str, device: torch.device, checkpoint: bool = False,
                     modes: tuple[str, ...] = BATCHING_MODES) -> str:
    """``loop``, ``vmap`` or another of ``modes`` for ``mode``. ``auto`` here depends on the
    device alone (``vmap`` on accelerators, ``loop`` on the CPU); the methods refine it by model
    (``MAML._auto_mode``). Checkpointing always runs as a loop."""
    if mode not in modes:
        raise ConfigError(f"--batching must be one of {', '.join(modes)}, got '{mode}'")
    if checkpoint:
        if mode not in ("auto", "loop"):
            raise ConfigError(f"--grad-checkpoint cannot run with --batching {mode}; use --batching loop (or auto)")
        return "loop"
    if mode == "auto":
        return "loop" if device.type == "cpu" else "vmap"
    return mode


def map_tasks(fn: Callable[..., Any], mode: str, *batched: Tensor) -> Any:
    """Apply the per-task ``fn(*tensors_of_one_task)`` to every task of the leading dimension of
    ``batched`` and stack the (pytree) results, by ``vmap`` or by a Python loop."""
    if mode == "vmap":
        try:
            return torch.func.vmap(fn, randomness="different")(*batched)
        except RuntimeError as exc:
            msg = str(exc)
            if any(word in msg for word in ("running_mean", "in-place", "inplace", "mutate")):
                raise ConfigError(
                    "the model updates a buffer in place (BatchNorm running statistics?), which vmap over tasks "
                    "cannot do; convert it with fastadapt.methods.inner.convert_batchnorm(model) or use --batching loop"
                ) from exc
            raise
    outs = [fn(*(t[i] for t in batched)) for i in range(batched[0].shape[0])]
    return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *outs)


def check_positive(name: str, value: float, integer: bool = False) -> None:
    """A step count or learning rate must be a finite positive number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value) == int(value)
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"--{name.replace('_', '-')} must be {kind}, got {value!r}")
