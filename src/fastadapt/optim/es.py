"""Evolution-strategies meta-gradients: antithetic ES over a truncation, and Persistent ES.

Both treat a truncation as a black box of the rule's weights ``theta`` (flattened): with
``pairs`` perturbations ``eps_i ~ N(0, sigma^2 I)``, the truncation runs from the same start with
``theta + eps_i`` and ``theta - eps_i`` on the same minibatches (the generator's state is replayed),
the rule without gradients. No backpropagation through the unroll, so the estimate is as cheap in
memory as plain training and insensitive to the chaotic long-unroll gradients that make truncated
backpropagation hard (Metz et al. 2019; VeLO is trained this way).

- ``es`` (antithetic ES, Salimans et al. 2017 applied per truncation)::

      g = sum_i (L(theta + eps_i) - L(theta - eps_i)) eps_i / (2 sigma^2 pairs)

  Every truncation starts its particles from the main trajectory, so, like truncated
  backpropagation, it ignores the effect of the rule on later truncations (truncation bias).
- ``pes`` (Persistent ES, Vicol et al., "Unbiased Gradient Estimation in Unrolled Computation
  Graphs with Persistent Evolution Strategies", ICML 2021, antithetic form): each of the ``2 pairs``
  particles keeps its own optimizee state across the truncations of a trajectory, and the
  perturbations of the positive particle of pair ``i`` are summed in ``xi_i`` (the negative one has
  ``-xi_i``)::

      xi_i += eps_i;    g = sum_i (L(theta + eps_i; s_i^+) - L(theta - eps_i; s_i^-)) xi_i / (2 sigma^2 pairs)

  which is unbiased for the gradient of the whole trajectory's loss (for a fixed ``theta``). The
  particles live in ``traj.extra["pes"]`` and start afresh with every trajectory.

In both, the main trajectory (``traj``) is advanced with the unperturbed rule on the same minibatches
and its meta-loss is what is returned and logged: one more unroll per truncation (``2 pairs + 1`` in
all), in exchange for a clean training curve and validation-like logging. A pair whose particle
diverges (non-finite loss) is left out of the estimate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..errors import ConfigError
from .base import LearnedRule
from .unroll import META_GRADIENTS, Trajectory, unroll


def _check_options(pairs: int, sigma: float) -> None:
    if int(pairs) < 1:
        raise ConfigError(f"--meta-option pairs must be >= 1, got {pairs}")
    if not float(sigma) > 0:
        raise ConfigError(f"--meta-option sigma must be > 0, got {sigma}")


def _copy(traj: Trajectory) -> Trajectory:
    """A particle: the trajectory's problem, parameters, rule state and step (its own loss log)."""
    return Trajectory(traj.problem, traj.layout, traj.params.clone(), {k: v.clone() for k, v in traj.state.items()},
                      traj.step)


def _run(rule: LearnedRule, theta: Tensor, particle: Trajectory, length: int, horizon: int,
         generator: torch.Generator, batches: Tensor) -> float:
    """One truncation of ``particle`` with the rule's weights set to ``theta``, on the minibatches that
    the generator state ``batches`` draws."""
    with torch.no_grad():
        vector_to_parameters(theta, rule.parameters())
    generator.set_state(batches)
    return float(unroll(rule, particle, length, horizon, generator, meta_grad=False))


def _antithetic(rule: LearnedRule, traj: Trajectory, length: int, horizon: int, generator: torch.Generator,
                pairs: int, sigma: float, particles: list[tuple[Trajectory, Trajectory]] | None,
                weights: Tensor | None) -> tuple[float, Tensor, Tensor]:
    """Run the pairs and the main trajectory; set the rule's ``.grad``; return the main loss, the noise
    and the valid-pair mask. ``weights`` (PES: the accumulated perturbations) multiply the loss
    differences instead of the noise itself."""
    params = list(rule.parameters())
    theta = parameters_to_vector(params).detach().clone()
    eps = torch.randn(pairs, theta.numel(), generator=generator).to(theta) * sigma
    weights = eps if weights is None else weights + eps
    batches = generator.get_state()
    diffs = torch.zeros(pairs, dtype=theta.dtype, device=theta.device)
    valid = torch.zeros(pairs, dtype=torch.bool)
    try:
        for i in range(pairs):
            plus, minus = particles[i] if particles is not None else (_copy(traj), _copy(traj))
            up = _run(rule, theta + eps[i], plus, length, horizon, generator, batches)
            down = _run(rule, theta - eps[i], minus, length, horizon, generator, batches)
            if torch.isfinite(torch.tensor([up, down])).all():
                diffs[i], valid[i] = up - down, True
        loss = _run(rule, theta, traj, length, horizon, generator, batches)
    finally:
        with torch.no_grad():
            vector_to_parameters(theta, params)
    n = int(valid.sum())
    grad = (diffs[valid] @ weights[valid.to(theta.device)]) / (2 * sigma ** 2 * n) if n else torch.zeros_like(theta)
    offset = 0
    for p in params:
        p.grad = grad[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return loss, eps, valid


def es_gradient(rule: LearnedRule, traj: Trajectory, length: int, horizon: int, generator: torch.Generator,
                pairs: int = 4, sigma: float = 0.01) -> float:
    """Antithetic ES estimate of the truncation's meta-gradient into ``.grad``; advances ``traj``."""
    _check_options(pairs, sigma)
    loss, _, _ = _antithetic(rule, traj, length, horizon, generator, int(pairs), float(sigma), None, None)
    return loss


def pes_gradient(rule: LearnedRule, traj: Trajectory, length: int, horizon: int, generator: torch.Generator,
                 pairs: int = 4, sigma: float = 0.01) -> float:
    """Persistent ES estimate (antithetic) into ``.grad``; advances ``traj`` and its particles."""
    _check_options(pairs, sigma)
    pairs, sigma = int(pairs), float(sigma)
    memory: dict[str, Any] = traj.extra.setdefault("pes", {})
    if memory.get("pairs") != pairs:  # a new trajectory: every particle starts where it does
        memory.update(pairs=pairs, xi=None, particles=[(_copy(traj), _copy(traj)) for _ in range(pairs)])
    loss, eps, _ = _antithetic(rule, traj, length, horizon, generator, pairs, sigma, memory["particles"],
                               memory["xi"])
    memory["xi"] = eps if memory["xi"] is None else memory["xi"] + eps
    return loss


META_GRADIENTS["es"] = es_gradient
META_GRADIENTS["pes"] = pes_gradient

__all__ = ["es_gradient", "pes_gradient"]
