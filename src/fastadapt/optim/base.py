"""What every learned update rule shares: the flat layout of a parameter set, the rule
interface, and saving and loading a trained rule.

A *rule* is an ``nn.Module`` whose weights are the meta-knowledge. It updates all parameters of
a set at once: the parameters and gradients are flattened into one vector each (in the order of
a :class:`Layout`), so one batched computation serves every tensor whatever its shape, with no
Python loop over tensors. Rules keep their per-coordinate memory in a dict of tensors (``state``)
that the caller carries from step to step, in the style of optax's ``init`` / ``update`` pairs::

    state = rule.init_state(flat_params, layout)
    update, state = rule(flat_grad, flat_params, state, layout, progress)
    flat_params = flat_params + update

``progress`` is the fraction of the training run done (``step / horizon``), a feature some rules
use (VeLO-style). The same two calls serve meta-training (differentiable, over a truncated unroll,
:mod:`fastadapt.optim.unroll`) and use (:class:`fastadapt.optim.LearnedOptimizer`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..io import load_checkpoint, save_checkpoint
from ..registry import LEARNED_RULES

FORMAT = "fastadapt-learned-optimizer"
VERSION = 1


@dataclass(frozen=True)
class Layout:
    """How a list of tensors is laid out in one flat vector: their shapes and offsets."""

    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> "Layout":
        return cls(tuple(t.shape for t in tensors))

    @property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    def segment_ids(self, device: torch.device | str = "cpu") -> Tensor:
        """``int64 [numel]``: the index of the tensor each coordinate belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_tensors, device=device),
                                       torch.tensor(self.sizes, device=device))

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, flat: Tensor) -> list[Tensor]:
        return [part.view(shape) for part, shape in zip(torch.split(flat, self.sizes), self.shapes)]


class LearnedRule(nn.Module):
    """Base of learned update rules; subclasses register in :data:`fastadapt.registry.LEARNED_RULES`.

    ``hparams`` are the constructor's keyword arguments, saved with the weights so that
    :func:`load_rule` rebuilds the same rule.
    """

    name = "rule"

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        #: How the rule was meta-trained (``optimizee``, ``horizon``, ...); filled by :func:`load_rule`.
        self.meta: dict[str, Any] = {}

    def init_state(self, params: Tensor, layout: Layout) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, grad: Tensor, params: Tensor, state: dict[str, Tensor], layout: Layout,
                progress: float) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - interface
        raise NotImplementedError


def build_rule(name: str, **hparams: Any) -> LearnedRule:
    return LEARNED_RULES.get(name)(**hparams)


def rule_blob(rule: LearnedRule, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`save_rule` writes: plain types and tensors only (loadable with ``weights_only``)."""
    return {"format": FORMAT, "version": VERSION, "rule": rule.name, "hparams": dict(rule.hparams),
            "state_dict": {k: v.detach().cpu() for k, v in rule.state_dict().items()}, "meta": dict(meta or {})}


def save_rule(rule: LearnedRule, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Write a trained rule (atomically) to ``path``, e.g. ``RUN_DIR/lopt.pt``."""
    save_checkpoint(rule_blob(rule, meta), path)


def rule_from_blob(blob: dict[str, Any], where: str) -> LearnedRule:
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DataError(f"{where} is not a fastadapt learned optimizer (written by 'fastadapt lopt train')")
    if blob.get("version", 0) > VERSION:
        raise DataError(f"{where} was written by a newer fastadapt (format {blob['version']}); upgrade to read it")
    rule = build_rule(blob["rule"], **blob["hparams"])
    rule.meta = dict(blob.get("meta", {}))  # how it was meta-trained (optimizee, horizon, ...)
    try:
        rule.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise DataError(f"{where}: the saved weights do not fit a {blob['rule']} rule ({exc})") from None
    return rule


def rule_path(path: str | os.PathLike) -> str:
    """``path``, or the ``lopt.pt`` in it when it is a ``lopt train`` run folder."""
    path = os.fspath(path)
    return os.path.join(path, "lopt.pt") if os.path.isdir(path) else path


def load_rule(path: str | os.PathLike, device: str | torch.device = "cpu") -> LearnedRule:
    """A rule saved by :func:`save_rule` (or a ``lopt train`` run folder, whose ``lopt.pt`` it reads),
    with ``meta`` telling how it was meta-trained."""
    path = rule_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no learned optimizer at {path}; train one with 'fastadapt lopt train --out DIR'")
    return rule_from_blob(load_checkpoint(path), path).to(device)
