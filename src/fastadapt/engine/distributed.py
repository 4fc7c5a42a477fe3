"""Meta-training on several processes with ``torch.distributed`` (launched by ``torchrun``).

The meta-batch is what is shared. Every process draws the whole meta-batch of an iteration from
the same seeded generator (drawing is cheap next to a step; the stream stays the one a single
process draws) and keeps its contiguous part of the tasks (:func:`~fastadapt.tasks.episode.shard`).
Each computes the meta-gradient of its part, the mean over its tasks; the gradients are then
summed over the processes, each weighted by its share of the tasks, which gives the mean over
the whole meta-batch (one all-reduce of all gradients, :class:`GradientAverager`). Every process
applies the same optimiser step to the same weights, so the weights stay identical everywhere
and equal those of one process up to the order of float additions.

A functional inner loop (MAML and its relatives, Reptile) does not fit the module wrapper of
``DistributedDataParallel``, and ProtoNet would gain nothing from it at these model sizes, so
every method goes through the same collectives: :meth:`MetaLearner.sync_gradients` is the one
place a method hands its gradients over.

BatchNorm running statistics (ProtoNet's Conv-4) are exponential averages that one process
updates task after task. Each process updates them on its own tasks; :class:`RunningStats`
combines the processes' results into what one process would hold after all the tasks in order
(the updates are affine, so the combination is exact up to float rounding). Other buffers are
not changed by training in any registered model and are left alone.

Only rank 0 reads and writes the run directory; a resumed run reads its checkpoint on rank 0
and broadcasts it, so the checkpoint (global step, generator, optimiser) does not depend on how
many processes wrote it or read it back.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, FastAdaptError
from ..tasks.episode import shard

T = TypeVar("T")

#: What ``torchrun`` sets in every process it starts.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher that sets its variables)."""
    return all(k in os.environ for k in LAUNCH_ENV)


def launch_rank() -> int:
    """This process's rank in a ``torchrun`` launch (0 outside one), before any group exists."""
    return int(os.environ["RANK"]) if launched() else 0


def join_from_env(device: str) -> bool:
    """Join the process group of a ``torchrun`` launch: ``gloo`` for the CPU, ``nccl`` for
    ``--device cuda`` (each process on ``cuda:LOCAL_RANK``). Returns True when this call created
    the group (the caller then ends it with :func:`leave`); False in a plain process or when the
    group already exists."""
    if not launched():
        return False
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run one process (without torchrun)")
    if dist.is_initialized():
        return False
    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                              "visible); start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return True


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Processes:
    """The processes that share a run: this one's ``rank`` among ``world``, ``local_rank`` on its
    machine, and the device the collectives' tensors live on (the GPU under NCCL, else the CPU).
    ``Processes()`` is one process: every method below then does nothing collective."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the process that reads and writes the run directory and reports."""
        return self.rank == 0

    def describe(self, threads: int) -> str:
        """``1 thread`` / ``4 threads`` in one process, ``2 processes × 1 thread`` for several."""
        text = f"{threads} thread{'s' if threads != 1 else ''}"
        return text if self.world == 1 else f"{self.world} processes × {text}"

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0, its result handed to every process. A library error raised by
        ``fn`` is raised by every process, so all stop together with the same message."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except FastAdaptError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The first process of each machine runs the block before the others of that machine
        (a dataset is downloaded and cached once per machine, then read from the cache). If the
        block fails there, the others still run it, and fail with their own message."""
        if self.world > 1 and self.local_rank != 0:
            dist.barrier()
        try:
            yield
        finally:
            if self.world > 1 and self.local_rank == 0:
                dist.barrier()

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers in every process."""
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def processes() -> Processes:
    """The processes of the current ``torch.distributed`` group, or one process without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    rank = dist.get_rank()
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    return Processes(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), device)


def _flat_groups(tensors: list[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Positions of ``tensors`` grouped by dtype and device (one flat buffer per group)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


class GradientAverager:
    """Replaces each parameter's gradient (the mean over this process's tasks) by the mean over
    the whole meta-batch: ``sum_r (n_r / N) g_r``, one all-reduce per dtype. A gradient that no
    process has stays ``None`` (the optimiser then skips the parameter, as in one process)."""

    def __init__(self, params: list[nn.Parameter], procs: Processes) -> None:
        self.params, self.procs = params, procs
        self.groups = _flat_groups(params)
        self.weight = 1.0
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        for (dtype, device), index in self.groups.items():
            params = [self.params[i] for i in index]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
            flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.weight)
            flat = torch.cat([flat, present])
            dist.all_reduce(flat)
            offset = 0
            for p, seen in zip(params, flat[-len(params):].tolist()):
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p) if seen > 0 else None
                offset += n


class RunningStats:
    """Combines the BatchNorm running statistics each process updated on its own tasks into those
    one process would hold after all the tasks of the meta-batch, in order.

    One update is ``r <- (1 - m) r + m x`` (momentum ``m``), or the cumulative mean
    ``r <- r + (x - r) / t`` when the momentum is ``None``. From the state ``r0`` at the start of
    the iteration, process ``p`` applied ``k_p`` updates and holds ``r_p``. With momentum, one
    process would hold ``(1-m)^N r0 + sum_p (1-m)^{K_p} (r_p - (1-m)^{k_p} r0)``, ``K_p`` the
    updates of the later processes; as a cumulative mean, ``(t0 r0 + sum_p ((t0 + k_p) r_p - t0
    r0)) / (t0 + N)``. The counts ``k_p`` are read from ``num_batches_tracked``.
    """

    def __init__(self, module: nn.Module, procs: Processes) -> None:
        self.procs = procs
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.track_running_stats and m.running_mean is not None]
        self.start: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def begin(self) -> None:
        self.start = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
                      for m in self.norms]

    def end(self) -> None:
        if not self.norms:
            return
        procs = self.procs
        counts = torch.tensor([int(m.num_batches_tracked) - t0 for m, (_, _, t0) in zip(self.norms, self.start)],
                              dtype=torch.long, device=procs.device)
        gathered = [torch.empty_like(counts) for _ in range(procs.world)]
        dist.all_gather(gathered, counts)
        per_process = torch.stack(gathered).tolist()  # [world][norm]
        parts, finish = [], []
        for j, (m, (mean0, var0, t0)) in enumerate(zip(self.norms, self.start)):
            k = [row[j] for row in per_process]
            mine, later, total = k[procs.rank], sum(k[procs.rank + 1:]), sum(k)
            for now, before in ((m.running_mean, mean0), (m.running_var, var0)):
                if m.momentum is None and t0 + total == 0:  # never updated
                    parts.append(torch.zeros_like(now))
                    finish.append((before, 0.0))
                elif m.momentum is None:
                    parts.append(now * (t0 + mine) - before * t0)
                    finish.append((before * (t0 / (t0 + total)), 1.0 / (t0 + total)))
                else:
                    f = 1.0 - m.momentum
                    parts.append((now - before * f ** mine) * f ** later)
                    finish.append((before * f ** total, 1.0))
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat)
        offset, i = 0, 0
        with torch.no_grad():
            for j, (m, (_, _, t0)) in enumerate(zip(self.norms, self.start)):
                for buf in (m.running_mean, m.running_var):
                    base, scale = finish[i]
                    n = buf.numel()
                    buf.copy_(base + scale * flat[offset:offset + n].view_as(buf))
                    offset, i = offset + n, i + 1
                m.num_batches_tracked.fill_(t0 + sum(row[j] for row in per_process))


class SharedMetaBatch:
    """What a meta-iteration does on several processes; in one process every step is the identity
    and nothing collective happens (the single-process run is unchanged, bit for bit).

    ``begin_step`` keeps this process's part of the drawn batch, ``end_step`` combines the logged
    metrics (means over the whole meta-batch), the stop requests (one process stopping stops all
    at the same iteration: see :meth:`stop`) and the training time (rank 0's clock) in one
    all-reduce.
    """

    def __init__(self, learner: nn.Module, procs: Processes) -> None:
        self.learner, self.procs = learner, procs
        params = [p for p in learner.parameters() if p.requires_grad]
        self.grads = GradientAverager(params, procs)
        self.stats = RunningStats(learner, procs)
        self.share = 1.0
        self._stop = False

    @contextmanager
    def attached(self) -> Iterator[None]:
        """While training: the learner's :meth:`sync_gradients` averages over the processes."""
        if self.procs.world == 1:
            yield
            return
        self.learner.gradient_sync = self.grads
        try:
            yield
        finally:
            self.learner.__dict__.pop("gradient_sync", None)

    def begin_step(self, batch: Any) -> Any:
        if self.procs.world == 1:
            return batch
        part, size, total = shard(batch, self.procs.rank, self.procs.world)
        self.share = self.grads.weight = size / total
        self.grads.calls = 0
        self.stats.begin()
        return part

    def stop(self, requested: bool) -> bool:
        """Whether to stop after this iteration, given this process's request as it stands: that
        request in one process; with several, the requests combined by the last :meth:`end_step`
        (one arriving later is combined at the end of the next iteration), the same everywhere."""
        return requested if self.procs.world == 1 else self._stop

    def end_step(self, metrics: dict[str, float], stop: bool,
                 train_seconds: float) -> tuple[dict[str, float], float]:
        procs = self.procs
        if procs.world == 1:
            return metrics, train_seconds
        if self.grads.calls != 1:
            raise ConfigError(f"{getattr(self.learner, 'name', 'this learner')} cannot be trained by several processes: "
                              "its train_step does not call sync_gradients() once per iteration")
        self.stats.end()
        keys = sorted(metrics)
        values = [metrics[k] * self.share for k in keys] + [float(stop), train_seconds if procs.main else 0.0]
        flat = torch.tensor(values, dtype=torch.float64, device=procs.device)
        dist.all_reduce(flat)
        out = flat.tolist()
        self._stop = out[-2] > 0
        return dict(zip(keys, out[:len(keys)])), out[-1]
