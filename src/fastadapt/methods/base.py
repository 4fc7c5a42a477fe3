"""The interface every meta-learner implements.

Training calls :meth:`MetaLearner.train_step` (by default: :meth:`meta_loss`, a finiteness check,
backward and an optimiser step). Evaluation calls :meth:`adapt` on a task's support set and
:meth:`predict` on its query inputs. Both go through the same per-task fitting code, so the inner
loop used at test time is the one that was meta-trained.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from ..tasks.episode import Episode


class MetaLearner(nn.Module):
    """Base class of all meta-learners.

    Subclasses set ``name`` (the registry name), ``options`` (hyper-parameters the CLI exposes,
    name -> default), ``adapt_requires_grad`` (whether :meth:`adapt` differentiates, e.g. MAML),
    and implement :meth:`from_config`, :meth:`meta_loss`, :meth:`adapt` and :meth:`predict`.
    """

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    #: One line of help per option (shown by ``fastadapt train NAME --help`` with its default).
    option_help: ClassVar[dict[str, str]] = {}
    #: Defaults that depend on the task family, keyed by task kind (``regression`` for sinusoids,
    #: ``classification`` for image episodes): they override ``options`` and the dataset's defaults.
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    adapt_requires_grad: ClassVar[bool] = False
    task_kind: ClassVar[str] = "classification"
    #: Set by a trainer whose meta-batch is shared by several processes, while it trains: turns the
    #: gradients of this process's share into those of the whole meta-batch (see :meth:`sync_gradients`).
    gradient_sync: Callable[[], None] | None = None
    #: True for a learner whose every training pass through Conv-4's batch-statistics BatchNorm
    #: runs in fused blocks (:mod:`fastadapt.models.fused`), exact in either layout: then
    #: ``--memory-format auto`` takes the faster channels-last on the CPU too.
    fused_training: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], in_shape: tuple[int, ...]) -> "MetaLearner":
        """Build from a resolved configuration (a plain dict; never a file)."""
        raise NotImplementedError

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        """Meta-training loss over a batch of episodes (leading task dim) and logged metrics
        (``loss``, and ``accuracy`` in percent or ``mse``)."""
        raise NotImplementedError

    def graphable_loss(self, batch: Any) -> Callable[[Any], tuple[Tensor, dict[str, Tensor], Tensor]] | None:
        """For a CUDA-graph training step (:mod:`fastadapt.engine.graphs`): a function that, for
        batches like ``batch`` (the same shapes, and what else this method reads from ``batch``
        here, once), returns :meth:`meta_loss`'s loss, its metrics as tensors, and a boolean tensor
        that is false for a batch that breaks those assumptions, without reading the GPU from the
        host; or ``None`` where this configuration has none. Learners that offer one override
        this; the trainer then captures their steps."""
        raise NotImplementedError(f"{self.name} has no CUDA-graph training step")

    def records_steps(self, device: torch.device | str) -> bool:
        """Whether :meth:`graphable_loss` gives a step to record in this configuration on
        ``device`` (a learner that offers one for some configurations only overrides this)."""
        return True

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Any:
        """Fit one task on its support set; returns whatever :meth:`predict` needs."""
        raise NotImplementedError

    def predict(self, adapted: Any, x: Tensor) -> Tensor:
        """Outputs (logits, or regression values) of the adapted learner on inputs ``x``."""
        raise NotImplementedError

    def draw_batch(self, source: Any, generator: torch.Generator, meta_batch: int, step: int) -> Any:
        """The training batch of meta-iteration ``step`` (1-based): ``meta_batch`` episodes by
        default. A learner that trains on something else at some steps (a classifier pre-training
        stage) overrides this; everything comes from ``generator``, which the trainer checkpoints,
        so a resumed run continues the same stream."""
        return source.sample_batch(generator, meta_batch)

    def train_step(self, batch: Episode, optimizer: torch.optim.Optimizer, step: int = 0) -> dict[str, float]:
        """One meta-iteration. Raises :class:`NonFiniteLossError` before touching the weights
        if the loss is NaN or infinite."""
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.meta_loss(batch)
        check_finite(loss, f"meta-training step {step}")
        loss.backward()
        self.sync_gradients()
        optimizer.step()
        return metrics

    def sync_gradients(self) -> None:
        """Make the ``.grad`` of every parameter the meta-gradient of the whole meta-batch when
        several processes share it (each computed the mean over its own tasks); nothing to do in
        one process. Every :meth:`train_step` calls it once, between the backward pass and the
        first use of the gradients, also when it has none to update."""
        if self.gradient_sync is not None:
            self.gradient_sync()

    def decide_run_options(self, device: torch.device | str) -> dict[str, Any]:
        """Options whose value is decided when a run starts (``batching: auto`` becomes ``loop`` or
        ``vmap``, a schedule's horizon becomes a number): fixes them on this learner and returns
        the concrete values to save in ``config.yaml``. A resumed run is built with the saved
        values, so nothing is decided twice."""
        return {}

    def run_state(self) -> dict[str, Any]:
        """Decisions a resumed run must reuse (saved in every checkpoint)."""
        return {}

    def load_run_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`run_state` from a checkpoint; raise ``ConfigError`` on a conflict."""

    def compile_networks(self) -> None:
        """``--compile``: compile every network of the learner in place with ``torch.compile``
        (``nn.Module.compile``, which keeps parameter names, so checkpoints are unchanged)."""
        for module in self.children():
            module.compile()

    def parameter_groups(self) -> list[dict[str, Any]] | None:
        """Optional optimiser parameter groups (e.g. a separate rate for learned step sizes)."""
        return None


def check_finite(loss: Tensor | float, where: str) -> None:
    value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the loss became {value} at {where}; lower the learning rate (the last good checkpoint is kept)"
        )


def hit_rate(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of ``labels`` predicted by the arg-max of ``logits``, as a tensor on their device
    (reading it back is left to the caller, so several can be read at once)."""
    return (logits.argmax(dim=-1) == labels).float().mean()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percentage of ``labels`` predicted by the arg-max of ``logits`` (0 to 100)."""
    return 100.0 * float(hit_rate(logits, labels))
