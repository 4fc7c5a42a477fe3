"""iMAML (Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from ..errors import ConfigError
from ..registry import METHODS
from ..tasks.episode import Episode
from .inner import (BATCHING_MODES, Forward, InnerSGD, LossFn, Params, check_inner_losses, check_positive, inner_loop,
                    map_tasks, module_forward)
from .maml import LOOP_OR_VMAP_HELP, MAML


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, iters: int) -> Params:
    """Solve ``A x = b`` for symmetric positive definite ``A`` (given as ``matvec``) by ``iters``
    steps of conjugate gradient from ``x = 0``, on parameter dicts. A fixed number of steps and
    no data-dependent branches, so it runs unchanged under ``vmap``."""

    def dot(u: Params, v: Params) -> Tensor:
        return sum((u[k] * v[k]).sum() for k in u)

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = dot(r, r)
    for _ in range(iters):
        ap = matvec(p)
        pap = dot(p, ap)
        # Exact convergence leaves p = 0; stop moving instead of dividing 0 by 0.
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = dot(r, r)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    return x


def proximal_term(theta: Params, lam: float) -> Callable[[Params], Tensor]:
    """``p -> lam/2 |p - theta|^2`` (``theta`` held constant)."""
    return lambda p: 0.5 * lam * sum(((p[k] - theta[k]) ** 2).sum() for k in p)


def implicit_meta_gradient(
    forward: Forward,
    loss_fn: LossFn,
    theta: Params,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    *,
    lam: float,
    steps: int,
    lr: float,
    cg_steps: int,
) -> tuple[Params, Tensor, Tensor, Tensor]:
    """One task's iMAML meta-gradient.

    ``phi`` approximately minimises ``L_s(phi) + lam/2 |phi - theta|^2`` (``steps`` of gradient
    descent from ``theta``, no graph kept); the meta-gradient is
    ``(I + H/lam)^-1 grad L_q(phi)`` with ``H`` the Hessian of ``L_s`` at ``phi``, solved by
    ``cg_steps`` of conjugate gradient on Hessian-vector products. Memory does not depend on
    ``steps``. Returns (meta-gradient, query loss, inner losses ``[steps]``, query outputs).
    """
    theta = {k: v.detach() for k, v in theta.items()}
    sx, sy = support
    qx, qy = query
    phi, inner_losses = inner_loop(forward, loss_fn, theta, sx, sy, steps, InnerSGD(lr), differentiable=False,
                                   regularizer=proximal_term(theta, lam))
    phi = {k: v.detach() for k, v in phi.items()}

    def query_loss(p: Params) -> tuple[Tensor, Tensor]:
        out = forward(p, qx)
        return loss_fn(out, qy), out.detach()

    g_query, (q_loss, q_out) = grad_and_value(query_loss, has_aux=True)(phi)
    # H v by reverse-over-reverse; the support-gradient graph is built once and reused by each CG step.
    _, hvp = vjp(grad(lambda p: loss_fn(forward(p, sx), sy)), phi)

    def matvec(v: Params) -> Params:
        (hv,) = hvp(v)
        return {k: v[k] + hv[k] / lam for k in v}

    return conjugate_gradient(matvec, g_query, cg_steps), q_loss.detach(), inner_losses, q_out


@METHODS.register("imaml")
class IMAML(MAML):
    """Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019).

    The inner problem is proximal, ``min_phi L_s(phi) + lam/2 |phi - theta|^2``, solved by
    ``inner_steps`` of gradient descent (step ``inner_lr``) without keeping a graph; the
    meta-gradient ``(I + H/lam)^-1 grad L_q(phi)`` comes from ``cg_steps`` of conjugate
    gradient with Hessian-vector products, so memory stays flat in the number of inner steps.
    Adaptation at evaluation time solves the same proximal problem.

    :meth:`meta_loss` returns the query loss plus a zero-valued term whose gradient is the
    implicit meta-gradient, so the usual ``backward`` + optimiser step train it.
    """

    name = "imaml"
    options = {
        "backbone": "auto",
        "inner_steps": 10,
        "inner_lr": 0.1,
        "lam": 2.0,
        "cg_steps": 5,
        "batching": "auto",
        "meta_batch": 32,
        "lr": 1e-3,
        "lr_decay_every": 0,
    }
    option_help = {
        **MAML.option_help,
        "inner_steps": "gradient steps on the proximal inner problem",
        "inner_lr": "inner learning rate",
        "lam": "proximal regularisation strength lambda",
        "cg_steps": "conjugate-gradient iterations for the implicit meta-gradient",
        "batching": LOOP_OR_VMAP_HELP,
    }
    batching_modes = BATCHING_MODES
    # No sinusoid setting in the paper: the inner rate and meta-batch of MAML's sinusoid setting,
    # which a 10-step proximal inner loop follows without diverging.
    task_defaults = {"regression": {"inner_lr": 0.01, "meta_batch": 25}}

    def __init__(self, model: torch.nn.Module, inner_steps: int = 10, inner_lr: float = 0.1, lam: float = 2.0,
                 cg_steps: int = 5, batching: str = "auto", task_kind: str = "classification") -> None:
        self.lam, self.cg_steps = lam, cg_steps
        super().__init__(model, inner_steps, inner_lr, first_order=True, grad_checkpoint=False, batching=batching,
                         task_kind=task_kind)

    @classmethod
    def _init_kwargs(cls, opts: dict[str, Any]) -> dict[str, Any]:
        return {k: opts[k] for k in ("inner_steps", "inner_lr", "lam", "cg_steps", "batching")}

    def _check_options(self) -> None:
        super()._check_options()
        check_positive("lam", self.lam)
        check_positive("cg_steps", self.cg_steps, integer=True)
        self.cg_steps = int(self.cg_steps)

    def compile_networks(self) -> None:
        raise ConfigError("--compile does not work with imaml: its implicit gradient takes Hessian-vector products "
                          "(a double backward), which compiled graphs do not have; leave out --compile")

    def _fit(self, support_x: Tensor, support_y: Tensor, differentiable: bool,
             ways: int | None = None) -> tuple[Params, Tensor]:
        theta = {k: v.detach() for k, v in self._adapted(ways).items()}
        return inner_loop(module_forward(self.model), self._loss_fn, theta, support_x, support_y, self.inner_steps,
                          InnerSGD(self.inner_lr), differentiable=False, regularizer=proximal_term(theta, self.lam))

    def _task(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Any, ...]:
        g, q_loss, inner_losses, out = implicit_meta_gradient(
            module_forward(self.model), self._loss_fn, self._adapted(), (sx, sy), (qx, qy),
            lam=self.lam, steps=self.inner_steps, lr=self.inner_lr, cg_steps=self.cg_steps)
        return g, q_loss, inner_losses, self._score_fn(out, qy)

    per_task_backward = False

    def _meta_loss(self, b: Episode, mode: str) -> tuple[Tensor, dict[str, float]]:
        g, qloss, inner, score = map_tasks(self._task, mode, b.support_x, b.support_y, b.query_x, b.query_y)
        check_inner_losses(inner, "meta-training")
        loss = qloss.mean()
        # Zero-valued term whose gradient is the mean implicit meta-gradient.
        surrogate = sum((p * g[k].mean(0)).sum() for k, p in self._adapted().items())
        return loss + surrogate - surrogate.detach(), self._metrics(loss, score)
