"""A meta-training step captured once as a CUDA graph and replayed.

A small network's training step on a GPU is bound by the host: each of its ~100 kernels costs
a Python call and a launch, and the GPU waits between them. A CUDA graph records the whole step
(forward, backward and the fused Adam update) once and replays it with one call, so the step
costs what its kernels cost. It needs a step whose shapes do not change and which never reads
the GPU from the host while it runs: learners offer such a step through
:meth:`fastadapt.methods.base.MetaLearner.graphable_loss` (ProtoNet does, and the MAML family
in its vmap batching, the GPU default).

How a run uses it (:class:`GraphedStep`):

- the first :data:`WARMUP` steps run eagerly on a side stream (as PyTorch requires before a
  capture; they are real training steps on real batches), the next one is captured and every
  later one replays the graph after copying its batch into the graph's input tensors;
- a batch of other shapes, or a learning rate the scheduler changed, is captured anew;
- each step still reads its loss and metrics once, after the replay. A non-finite loss raises
  :class:`~fastadapt.errors.NonFiniteLossError` and the captured update skips the weights (Adam's ``found_inf``,
  as ``torch.amp.GradScaler`` uses it), so they stay as they were, as in the eager step;
- a batch that breaks what the captured loss assumed (a different class count under the same
  shapes) is refused in the same way, with a clear error.

The step computes what :meth:`MetaLearner.train_step` computes, with the same kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import fields, is_dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..methods.base import MetaLearner, check_finite

#: Eager steps on a side stream before a capture (PyTorch's recipe uses three).
WARMUP = 3
#: A step that must be recorded anew within this many steps of its last recording (a schedule
#: that changes the learning rate every few steps) runs eagerly from then on: recording costs more.
MIN_REPLAYS = 50

LossFn = Callable[[Any], tuple[Tensor, dict[str, Tensor], Tensor]]


def _tensors(batch: Any) -> list[Tensor]:
    """The tensors of a batch (a dataclass of tensors, possibly nested), in a fixed order."""
    if isinstance(batch, Tensor):
        return [batch]
    if is_dataclass(batch):
        return [t for f in fields(batch) for t in _tensors(getattr(batch, f.name))]
    raise TypeError(f"a captured step needs a batch of tensors, got {type(batch).__name__}")


def _signature(batch: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in _tensors(batch))


def _owner(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def usable(learner: MetaLearner, device: torch.device, world: int, wanted: bool) -> bool:
    """Whether a run captures its steps: asked for, on a GPU, in one process, not compiled, and
    offered by the learner in its configuration (:meth:`~MetaLearner.records_steps`): the class
    that defines its :meth:`~MetaLearner.meta_loss` (and any :meth:`~MetaLearner.train_step` of
    its own) also defines :meth:`~MetaLearner.graphable_loss`, so a subclass that changes the
    loss is never replaced by its parent's captured one."""
    if not (wanted and device.type == "cuda" and world == 1):
        return False
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in learner.modules()):
        return False  # torch.compile (--compile) records its own graphs
    cls = type(learner)
    offered = _owner(cls, "graphable_loss")
    return (offered is not MetaLearner and _owner(cls, "meta_loss") is offered
            and _owner(cls, "train_step") in (MetaLearner, offered) and learner.records_steps(device))


class CudaGraphs:
    """How :class:`GraphedStep` runs and records steps on a GPU: eager steps on a side stream (as
    PyTorch asks before a capture), captures with ``torch.cuda.graph`` on that stream, replays on
    the current one. Another object with the same two methods can stand in for it (the tests run
    the step's bookkeeping on the CPU with one that re-runs the step at each replay)."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()

    def eager(self, fn: Callable[[], Tensor]) -> Tensor:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], Tensor]:
        """Record ``fn`` (which returns one tensor) without running it; returns ``replay() ->`` that
        tensor, refilled by the recorded kernels."""
        torch.cuda.synchronize()
        groups = optimizer.param_groups
        capturable = [g.get("capturable", False) for g in groups]
        for g in groups:
            g["capturable"] = True  # the fused kernel is the same; the flag only allows capture
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                out = fn()
        finally:
            for g, c in zip(groups, capturable):
                g["capturable"] = c

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay


class GraphedStep:
    """``step(batch, step_number) -> metrics``: :meth:`MetaLearner.train_step` for ``learner`` and
    ``optimizer`` (a fused ``torch.optim.Adam``), recorded once and replayed (see the module
    docstring). ``context`` is entered around each recorded step (an autocast context);
    ``backend`` runs and records the steps (default :class:`CudaGraphs`)."""

    def __init__(self, learner: MetaLearner, optimizer: torch.optim.Optimizer,
                 context: Callable[[], Any], backend: Any = None) -> None:
        self.learner, self.optimizer, self.context = learner, optimizer, context
        self.backend = backend if backend is not None else CudaGraphs()
        self.replay: Callable[[], Tensor] | None = None
        self._key: tuple | None = None
        self._warm = 0
        self._failed = False
        self._inputs: list[Tensor] = []
        self._names: list[str] = []
        self._skip: Tensor | None = None
        self._kept: tuple = ()
        self._recorded_at = 0
        self.captures = 0

    def _eager_step(self, batch: Any, step: int) -> dict[str, float]:
        """The learner's own step, in the same autocast context as a recorded one."""
        with self.context():
            return self.learner.train_step(batch, self.optimizer, step)

    def _record(self, batch: Any, loss_fn: LossFn) -> Tensor:
        """Zero the gradients, compute the loss, backward, an Adam update skipped for a bad step;
        returns ``[loss, metrics..., valid]`` packed in one tensor. No host reads."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        with self.context():
            loss, metrics, valid = loss_fn(batch)
        ok = torch.isfinite(loss.detach()) & valid
        loss.backward()
        self.learner.sync_gradients()
        self._skip.copy_((~ok).float())
        opt.found_inf = self._skip  # read by the fused Adam kernel: a bad step leaves the weights
        try:
            opt.step()
        finally:
            del opt.found_inf
        self._names = list(metrics)
        return torch.stack([loss.detach().float(), *(metrics[k].detach().float() for k in self._names),
                            valid.float()])

    def __call__(self, batch: Any, step: int) -> dict[str, float]:
        if not self._failed:
            try:
                signature = _signature(batch)
            except TypeError:  # not a batch of tensors: nothing to record
                self._failed = True
        if self._failed:
            return self._eager_step(batch, step)
        if self._skip is None:
            self._skip = torch.zeros((), device=_tensors(batch)[0].device)
        key = (signature, tuple(float(g["lr"]) for g in self.optimizer.param_groups))
        if self.replay is not None and key == self._key:
            for dst, src in zip(self._inputs, _tensors(batch)):
                dst.copy_(src, non_blocking=True)
            return self._read(self.replay(), step)
        loss_fn = self.learner.graphable_loss(batch)
        if loss_fn is None:  # the learner has no recorded step for this configuration
            self._failed = True
            return self._eager_step(batch, step)
        if self.replay is not None and step - self._recorded_at < MIN_REPLAYS:
            self._failed = True  # it changes too often to gain from recording
            self._release()
            warnings.warn(f"the training step changed {step - self._recorded_at} steps after it was recorded "
                          f"(a learning rate or batch shape that keeps changing); it runs without CUDA graphs "
                          f"from now on", RuntimeWarning, stacklevel=2)
            return self._eager_step(batch, step)
        if self._warm < WARMUP:  # real steps, eagerly, before the first capture
            self._warm += 1
            return self._read(self.backend.eager(lambda: self._record(batch, loss_fn)), step)
        self._release()  # the previous recording's memory, before the new one takes its own
        self.optimizer.zero_grad(set_to_none=True)
        try:
            replay = self.backend.capture(lambda: self._record(batch, loss_fn), self.optimizer)
        except Exception as exc:  # noqa: BLE001 - any capture failure: go on eagerly
            self._failed = True
            warnings.warn(f"CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}); "
                          f"training goes on without it", RuntimeWarning, stacklevel=2)
            return self._eager_step(batch, step)
        # The graph reads the batch it was recorded with (later batches are copied into it) and
        # every tensor the loss function holds (a learner's constants): both must outlive it, or
        # their memory is reused while the graph still reads it.
        self._inputs, self._kept = _tensors(batch), (batch, loss_fn)
        self.replay, self._key, self._recorded_at = replay, key, step
        self.captures += 1
        return self._read(self.replay(), step)  # capturing records the step without running it

    def _release(self) -> None:
        self.replay, self._key, self._inputs, self._kept = None, None, [], ()

    def _read(self, out: Tensor, step: int) -> dict[str, float]:
        values = out.tolist()  # the one host read of a step
        loss, metrics, valid = values[0], values[1:-1], values[-1]
        if not valid:  # its loss means nothing (and is often NaN): the assumptions come first
            raise ConfigError(f"meta-training step {step}: this batch does not fit the captured training step "
                              f"(its class count changed); train with --no-cuda-graphs")
        check_finite(loss, f"meta-training step {step}")  # the update was skipped in the graph too
        return dict(zip(self._names, metrics))
