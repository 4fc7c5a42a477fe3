"""Learned optimizers: update rules meta-trained on task distributions, usable as ``torch.optim``.

- :class:`LSTMRule` (``lstm``): the coordinatewise LSTM of Andrychowicz et al. (2016).
- :class:`LearnedOptimizer`: any trained rule as a ``torch.optim.Optimizer``.
- :mod:`~fastadapt.optim.unroll`: the truncated unrolls that meta-train them.

Meta-training runs (checkpoints, resume, evaluation against tuned baselines) live in
:mod:`fastadapt.engine.lopt`; the command line is ``fastadapt lopt``.
"""

from .base import Layout, LearnedRule, build_rule, load_rule, save_rule
from .learned import LearnedOptimizer
from .lstm import LSTMRule, preprocess_gradient
from .unroll import Trajectory, unroll
from . import es, velo  # noqa: F401,E402  (registers the "velo" rule and the "es" / "pes" meta-gradients)

__all__ = ["Layout", "LearnedRule", "LearnedOptimizer", "LSTMRule", "Trajectory", "build_rule", "load_rule",
           "preprocess_gradient", "save_rule", "unroll"]
