"""Truncated unrolls of an optimizee trained by a learned rule: the meta-training objective.

Meta-training follows Andrychowicz et al.: a trajectory of ``horizon`` optimizee steps is cut into
truncations of ``length`` steps; the meta-loss of a truncation is the mean optimizee loss over its
steps, differentiated with respect to the rule's weights through the updates of that truncation
only (the parameters and the rule's state enter it detached), and the rule is updated after each
truncation. The optimizee's gradient is an *input* to the rule: with ``second_order=False`` (the
paper's choice) it is detached, dropping the optimizee's second derivatives; ``second_order=True``
keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..tasks.optimizee import Problem
from .base import Layout, LearnedRule


@dataclass
class Trajectory:
    """Where an optimizee's training stands: flat parameters, the rule's state, steps done."""

    problem: Problem
    layout: Layout
    params: Tensor
    state: dict[str, Tensor]
    step: int = 0
    losses: list[float] = field(default_factory=list)
    #: What a meta-gradient estimator keeps across the truncations of one trajectory (e.g. PES).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, rule: LearnedRule, problem: Problem) -> "Trajectory":
        tensors = list(problem.init.values())
        layout = Layout.of(tensors)
        params = layout.flatten(tensors).detach()
        return cls(problem, layout, params, rule.init_state(params, layout))

    def named(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.problem.init, self.layout.split(flat)))


def unroll(rule: LearnedRule, traj: Trajectory, length: int, horizon: int, generator: torch.Generator,
           second_order: bool = False, meta_grad: bool = True) -> Tensor:
    """Run ``length`` steps of ``traj`` (updated in place, detached at the end) and return the
    meta-loss: the mean optimizee loss at the ``length + 1`` points of the truncation (its first
    point does not depend on the rule; its last is where the next truncation starts).

    With ``meta_grad`` the loss is differentiable with respect to the rule's weights; without it the
    rule runs under ``no_grad`` (evaluation, evolution strategies) and the result is a plain value.
    """
    flat = traj.params.detach().requires_grad_(True)
    state = {k: v.detach() for k, v in traj.state.items()}
    terms: list[Tensor] = []
    for i in range(length):
        loss = traj.problem.loss(traj.named(flat), generator)
        keep = meta_grad and i > 0  # the first point is a constant of the truncation ...
        # ... but with second_order its gradient's graph is part of the meta-loss.
        (grad,) = torch.autograd.grad(loss, flat, create_graph=meta_grad and second_order,
                                      retain_graph=keep or (meta_grad and second_order))
        terms.append(loss if keep else loss.detach())
        traj.losses.append(float(loss.detach()))
        with torch.set_grad_enabled(meta_grad):
            update, state = rule(grad if second_order else grad.detach(), flat if meta_grad else flat.detach(),
                                 state, traj.layout, (traj.step + i) / horizon)
        flat = flat + update
        if not meta_grad:
            flat = flat.detach().requires_grad_(True)
    with torch.set_grad_enabled(meta_grad):
        terms.append(traj.problem.loss(traj.named(flat), generator))
    traj.params = flat.detach()
    traj.state = {k: v.detach() for k, v in state.items()}
    traj.step += length
    return torch.stack(terms).mean()


def truncated_gradient(rule: LearnedRule, traj: Trajectory, length: int, horizon: int,
                       generator: torch.Generator, second_order: bool = False) -> float:
    """Backpropagate the meta-loss of one truncation into the rule's ``.grad``; return its value."""
    loss = unroll(rule, traj, length, horizon, generator, second_order=second_order)
    if torch.isfinite(loss):
        loss.backward()
    return float(loss.detach())


#: Meta-gradient estimators by name: ``f(rule, traj, length, horizon, generator, **options) -> loss``;
#: each leaves the rule's gradient in ``.grad`` (none when the loss is not finite) and advances ``traj``.
META_GRADIENTS: dict[str, Callable[..., float]] = {"truncated": truncated_gradient}
