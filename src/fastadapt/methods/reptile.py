"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018), batched."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import METHODS
from ..tasks.episode import Episode
from .inner import BATCHING_MODES, InnerAdam, InnerSGD, check_inner_losses, check_positive, map_tasks
from .maml import LOOP_OR_VMAP_HELP, MAML


@METHODS.register("reptile")
class Reptile(MAML):
    """Reptile (Nichol, Achiam & Schulman, 2018), batched version.

    For each task ``i`` of a meta-batch, ``W_i`` is the result of ``inner_steps`` steps of
    ``inner_optim`` (``sgd`` or ``adam``, fresh state per task) on the task's support set from
    ``theta``; then ``theta <- theta + outer_lr * mean_i(W_i - theta)``. With ``anneal`` the outer
    step size decays linearly over ``anneal_steps`` meta-iterations (default: the run's ``--steps``
    when it started), as in the paper's code: step ``t = 1, 2, ...`` uses
    ``outer_lr * (1 - (t - 1) / anneal_steps)``, so the first step is ``outer_lr`` and the last one
    ``outer_lr / anneal_steps`` (never 0: no step is wasted). The horizon is fixed when the run
    starts and saved with it; a run extended past it (a larger ``--steps`` on resume) keeps the
    last value, so the step size never jumps back up. The query set is not used for
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
        "anneal_steps": 0,
        "batching": "auto",
        "meta_batch": 5,
        "lr_decay_every": 0,
    }
    option_help = {
        **MAML.option_help,
        "inner_lr": "inner learning rate",
        "inner_optim": "inner optimiser: sgd, or adam (fresh state per task, beta1 = 0)",
        "outer_lr": "outer step beta of theta <- theta + beta * mean_i(W_i - theta)",
        "anneal": "decay beta linearly over --anneal-steps",
        "anneal_steps": "horizon of the decay; 0: the run's --steps when it starts",
        "batching": LOOP_OR_VMAP_HELP,
    }
    batching_modes = BATCHING_MODES
    # Nichol et al. (2018), 1-D sine regression: 32 inner SGD steps of 0.02, outer step 0.1
    # annealed linearly to zero over the run, one task per outer step.
    task_defaults = {"regression": {"inner_optim": "sgd", "inner_lr": 0.02, "inner_steps": 32, "outer_lr": 0.1,
                                    "anneal": True, "meta_batch": 1}}

    def __init__(self, model: torch.nn.Module, inner_steps: int = 5, inner_lr: float = 1e-3, inner_optim: str = "adam",
                 outer_lr: float = 1.0, anneal: bool = False, anneal_steps: int | None = None, batching: str = "auto",
                 task_kind: str = "classification") -> None:
        self.inner_optim, self.outer_lr, self.anneal = inner_optim, outer_lr, bool(anneal)
        self.anneal_steps = int(anneal_steps) if anneal_steps else None
        super().__init__(model, inner_steps, inner_lr, first_order=True, grad_checkpoint=False, batching=batching,
                         task_kind=task_kind)

    @classmethod
    def _init_kwargs(cls, opts: dict[str, Any]) -> dict[str, Any]:
        keys = ("inner_steps", "inner_lr", "inner_optim", "outer_lr", "anneal", "batching")
        return {**{k: opts[k] for k in keys}, "anneal_steps": opts.get("anneal_steps") or opts.get("steps")}

    def decide_run_options(self, device: torch.device | str) -> dict[str, Any]:
        out = super().decide_run_options(device)
        if self.anneal:
            out["anneal_steps"] = self.anneal_steps
        return out

    def run_state(self) -> dict[str, Any]:
        return {**super().run_state(), "anneal_steps": self.anneal_steps}

    def load_run_state(self, state: dict[str, Any]) -> None:
        super().load_run_state(state)
        saved = state.get("anneal_steps")
        if self.anneal and saved and self.anneal_steps != saved:
            raise ConfigError(f"the checkpoint anneals the outer step over {saved} iterations, not "
                              f"{self.anneal_steps}; resume with --anneal-steps {saved}")

    def _check_options(self) -> None:
        super()._check_options()
        if self.inner_optim not in ("sgd", "adam"):
            raise ConfigError(f"--inner-optim must be sgd or adam, got '{self.inner_optim}'")
        check_positive("outer_lr", self.outer_lr)
        if self.anneal and not self.anneal_steps:
            raise ConfigError("--anneal needs --anneal-steps (the horizon of the linear decay)")

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
        """beta of meta-iteration ``step`` (1-based; see the class docstring)."""
        if not self.anneal:
            return self.outer_lr
        horizon = float(self.anneal_steps)
        return self.outer_lr * (1.0 - (min(step, horizon) - 1.0) / horizon)

    def train_step(self, batch: Episode, optimizer: torch.optim.Optimizer, step: int = 0) -> dict[str, float]:
        """``theta <- theta + beta * mean_i(W_i - theta)``; the optimiser the trainer built is not
        used (Reptile's outer update is this interpolation, not a gradient step of Adam)."""
        b = batch if batch.batched else Episode.stack([batch])
        metrics = self._backward(b, self._mode(b), step)
        self.sync_gradients()  # several processes: the mean of W_i - theta over the whole meta-batch
        beta = self.outer_step_size(step)
        with torch.no_grad():
            for p in self._adapted().values():
                p.sub_(beta * p.grad)
                p.grad = None
        optimizer.step()  # no gradients left: a no-op that keeps learning-rate schedulers in order
        return metrics
