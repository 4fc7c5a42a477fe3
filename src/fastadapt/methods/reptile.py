"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018), batched."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import METHODS
from ..tasks.episode import Episode
from .inner import InnerAdam, InnerSGD, check_inner_losses, check_positive, map_tasks
from .maml import MAML


@METHODS.register("reptile")
class Reptile(MAML):
    """Reptile (Nichol, Achiam & Schulman, 2018), batched version.

    For each task ``i`` of a meta-batch, ``W_i`` is the result of ``inner_steps`` steps of
    ``inner_optim`` (``sgd`` or ``adam``, fresh state per task) on the task's support set from
    ``theta``; then ``theta <- theta + outer_lr * mean_i(W_i - theta)``. With ``anneal`` the outer
    step size decays linearly to 0 over the run, as in the paper. The query set is not used for
    the update, only for the logged loss and accuracy after adaptation. Adaptation at evaluation
    time runs the same inner loop.

    :meth:`meta_loss` returns that query loss plus a zero-valued term whose gradient is the Reptile
    direction ``theta - mean_i W_i``, so ``outer_lr`` times SGD on it is exactly the update above.
    """

    name = "reptile"
    options = {
        "backbone": "auto",
        "inner_steps": 5,
        "inner_lr": 1e-3,
        "inner_optim": "adam",
        "outer_lr": 1.0,
        "anneal": False,
        "batching": "auto",
        "meta_batch": 5,
    }

    def __init__(self, model: torch.nn.Module, inner_steps: int = 5, inner_lr: float = 1e-3, inner_optim: str = "adam",
                 outer_lr: float = 1.0, anneal: bool = False, total_steps: int | None = None, batching: str = "auto",
                 task_kind: str = "classification") -> None:
        self.inner_optim, self.outer_lr, self.anneal, self.total_steps = inner_optim, outer_lr, bool(anneal), total_steps
        super().__init__(model, inner_steps, inner_lr, first_order=True, grad_checkpoint=False, batching=batching,
                         task_kind=task_kind)

    @classmethod
    def _init_kwargs(cls, opts: dict[str, Any]) -> dict[str, Any]:
        keys = ("inner_steps", "inner_lr", "inner_optim", "outer_lr", "anneal", "batching")
        return {**{k: opts[k] for k in keys}, "total_steps": opts.get("steps")}

    def _check_options(self) -> None:
        super()._check_options()
        if self.inner_optim not in ("sgd", "adam"):
            raise ConfigError(f"--inner-optim must be sgd or adam, got '{self.inner_optim}'")
        check_positive("outer_lr", self.outer_lr)
        if self.anneal and not self.total_steps:
            raise ConfigError("--anneal needs the run's --steps")

    def _inner_optimizer(self, ways: int | None = None) -> Any:
        return InnerAdam(self.inner_lr) if self.inner_optim == "adam" else InnerSGD(self.inner_lr)

    def _task(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Any, ...]:
        fast, inner_losses = self._fit(sx, sy, differentiable=False)
        fast = {k: v.detach() for k, v in fast.items()}
        with torch.no_grad():
            out = self._outputs(fast, qx)
        return fast, self._loss_fn(out, qy), inner_losses, self._score_fn(out, qy)

    per_task_backward = False

    def _meta_loss(self, b: Episode, mode: str) -> tuple[Tensor, dict[str, float]]:
        fast, qloss, inner, score = map_tasks(self._task, mode, b.support_x, b.support_y, b.query_x, b.query_y)
        check_inner_losses(inner, "meta-training")
        loss = qloss.mean()
        # Zero-valued term whose gradient is theta - mean_i W_i.
        surrogate = sum((p * (p - fast[k].mean(0)).detach()).sum() for k, p in self._adapted().items())
        return loss + surrogate - surrogate.detach(), self._metrics(loss, score)

    def outer_step_size(self, step: int) -> float:
        if not self.anneal:
            return self.outer_lr
        return self.outer_lr * max(0.0, 1.0 - step / float(self.total_steps))

    def train_step(self, batch: Episode, optimizer: torch.optim.Optimizer, step: int = 0) -> dict[str, float]:
        """``theta <- theta + beta * mean_i(W_i - theta)``; the optimiser the trainer built is not
        used (Reptile's outer update is this interpolation, not a gradient step of Adam)."""
        b = batch if batch.batched else Episode.stack([batch])
        _, metrics = self._choose_mode(b, step)
        beta = self.outer_step_size(step)
        with torch.no_grad():
            for p in self._adapted().values():
                p.sub_(beta * p.grad)
                p.grad = None
        optimizer.step()  # no gradients left: a no-op that keeps learning-rate schedulers in order
        return metrics
