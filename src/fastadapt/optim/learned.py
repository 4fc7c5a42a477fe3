"""A trained update rule as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Layout, LearnedRule, load_rule


class LearnedOptimizer(torch.optim.Optimizer):
    """Train any PyTorch model with a learned rule (``lstm``, ``velo``, ...)::

        opt = LearnedOptimizer(model.parameters(), "runs/lopt-lstm-mnist-mlp")   # or .../lopt.pt
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, as with any optimizer
            opt.step()

    The rule updates all parameters of a group in one batched computation: their gradients and
    values are concatenated into one vector, the rule maps it to an update, and the update is
    split back (no Python loop over tensors). Its memory (e.g. the LSTM's hidden states) lives in
    the optimizer state of the group's first parameter, so ``state_dict`` / ``load_state_dict``
    save and restore it. ``lr`` multiplies the rule's update (default 1: the rule as trained), so
    ``torch.optim.lr_scheduler`` schedules work as a scale. ``horizon`` is the number of steps the
    training will take, the progress feature of rules that read it (VeLO-style); it defaults to the
    meta-training horizon saved with the rule. Parameters without a gradient at a step are left
    unchanged, as by the built-in optimizers.
    """

    def __init__(self, params: Iterable[Any], rule: LearnedRule | str | os.PathLike, lr: float = 1.0,
                 horizon: int | None = None) -> None:
        if not isinstance(rule, LearnedRule):
            rule = load_rule(rule)
        if lr < 0:
            raise ConfigError(f"lr must be >= 0, got {lr}")
        horizon = horizon or rule.meta.get("horizon") or 100
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        super().__init__(params, {"lr": lr, "horizon": horizon})
        self.rule = rule.eval()
        for p in self.rule.parameters():
            p.requires_grad_(False)

    def _group_state(self, group: dict[str, Any], flat: Tensor, layout: Layout) -> dict[str, Any]:
        state = self.state[group["params"][0]]
        if "rule_state" not in state:
            state["step"] = 0
            state["numel"] = layout.numel
            state["rule_state"] = self.rule.init_state(flat, layout)
        elif state["numel"] != layout.numel:
            raise ConfigError(f"the optimizer state covers {state['numel']} coordinates but the group now has "
                              f"{layout.numel}: load a state_dict saved for the same parameters")
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if not params:
                continue
            self.rule.to(params[0].device)
            layout = Layout.of(params)
            flat = layout.flatten(params)
            has_grad = [p.grad is not None for p in params]
            grad = layout.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            state = self._group_state(group, flat, layout)
            progress = min(state["step"] / group["horizon"], 1.0)
            update, new = self.rule(grad.to(flat.dtype), flat, state["rule_state"], layout, progress)
            state["step"] += 1
            if all(has_grad):
                state["rule_state"] = new
                torch._foreach_add_(params, layout.split(update), alpha=group["lr"])
            else:  # coordinates of gradient-less tensors keep their state and values
                mask = layout.flatten([torch.full_like(p, float(h)) for p, h in zip(params, has_grad)]).bool()
                state["rule_state"] = {k: _keep_rows(mask, v, new[k]) for k, v in state["rule_state"].items()}
                for p, u, h in zip(params, layout.split(update), has_grad):
                    if h:
                        p.add_(u, alpha=group["lr"])
        return loss


def _keep_rows(mask: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """``new`` where ``mask [numel]`` is set along the state's coordinate axis (its axis of size
    numel), ``old`` elsewhere; a state without such an axis (per-tensor memory) takes ``new``."""
    axis = next((i for i, n in enumerate(old.shape) if n == mask.numel()), None)
    if axis is None:
        return new
    shape = [1] * old.dim()
    shape[axis] = mask.numel()
    return torch.where(mask.view(shape), new, old)
