"""The unit of meta-learning: one task's support and query sets."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass
class Episode:
    """A task as tensors: fit on ``support``, evaluate on ``query``.

    Shapes (single task): ``support_x [S, *in_shape]``, ``support_y [S]``,
    ``query_x [Q, *in_shape]``, ``query_y [Q]``. Classification labels are ``long`` and
    remapped to ``0..ways-1``; regression targets are float tensors ``[S, out_dim]``.

    A batch of tasks is the same structure with a leading task dimension ``T`` on every
    tensor (see :meth:`stack`), so ``torch.func.vmap`` can map over it.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def batched(self) -> bool:
        """True when the tensors carry a leading task dimension.

        Told from the targets: class labels are ``[S]`` per task, regression targets ``[S, out]``.
        """
        per_task_dims = 2 if self.support_y.is_floating_point() else 1
        return self.support_y.dim() > per_task_dims

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0] if self.batched else 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Episode":
        return Episode(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def task(self, i: int) -> "Episode":
        """The ``i``-th task of a batch, without the task dimension."""
        return Episode(*(getattr(self, f.name)[i] for f in fields(self)))

    def tasks(self) -> list["Episode"]:
        return [self.task(i) for i in range(self.num_tasks)] if self.batched else [self]

    def part(self, start: int, stop: int) -> "Episode":
        """Tasks ``start..stop-1`` of a batch, still with the task dimension."""
        return Episode(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    @staticmethod
    def stack(episodes: Sequence["Episode"]) -> "Episode":
        """Stack single-task episodes of equal shapes into a batch with a leading task dim."""
        if not episodes:
            raise ValueError("cannot stack an empty list of episodes")
        return Episode(*(torch.stack([getattr(e, f.name) for e in episodes]) for f in fields(Episode)))


@dataclass
class LabelledBatch:
    """Images with class ids that are global to their split: the batches of an ordinary
    classifier (pre-training a feature extractor on all training classes).

    Shapes: ``x [B, *in_shape]`` (float), ``y [B]`` (long, ``0..classes-1`` of the split).
    """

    x: Tensor
    y: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LabelledBatch":
        return LabelledBatch(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking))

    @property
    def num_images(self) -> int:
        return self.y.shape[0]

    def part(self, start: int, stop: int) -> "LabelledBatch":
        """Images ``start..stop-1``."""
        return LabelledBatch(self.x[start:stop], self.y[start:stop])


@dataclass
class EpisodeWithClasses:
    """An episode (or a batch of them) together with the split-level ids of the classes it drew:
    ``classes[k]`` is the class of label ``k`` (``[ways]``, or ``[T, ways]`` for a batch), so a
    learner that keeps one classifier row per training class can find the rows of an episode."""

    episode: Episode
    classes: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EpisodeWithClasses":
        return EpisodeWithClasses(self.episode.to(device, non_blocking), self.classes.to(device, non_blocking=non_blocking))

    @property
    def num_tasks(self) -> int:
        return self.episode.num_tasks

    def tasks(self) -> list[tuple[Episode, Tensor]]:
        """``(episode, classes)`` of every task, without the task dimension."""
        if not self.episode.batched:
            return [(self.episode, self.classes)]
        return [(self.episode.task(i), self.classes[i]) for i in range(self.num_tasks)]

    def part(self, start: int, stop: int) -> "EpisodeWithClasses":
        """Tasks ``start..stop-1`` of a batch, with their classes."""
        return EpisodeWithClasses(self.episode.part(start, stop), self.classes[start:stop])


def shard(batch: Any, index: int, count: int) -> tuple[Any, int, int]:
    """Part ``index`` of ``batch`` cut into ``count`` contiguous parts whose sizes differ by at
    most one, in order (part 0 holds the first items), with its size and the batch's.

    The items are the tasks of a batch of episodes (:class:`Episode` with a task dimension,
    :class:`EpisodeWithClasses`) or the images of a :class:`LabelledBatch`. A loss that is a mean
    over the items of a part, weighted by ``size / total`` and summed over the parts, is the mean
    over the whole batch.
    """
    if isinstance(batch, LabelledBatch):
        total, what = batch.num_images, "images"
    elif isinstance(batch, (Episode, EpisodeWithClasses)):
        episode = batch.episode if isinstance(batch, EpisodeWithClasses) else batch
        if not episode.batched:
            raise ConfigError(f"a single episode cannot be shared by {count} processes; draw a batch of at least "
                              f"{count} (--meta-batch)")
        total, what = batch.num_tasks, "tasks"
    else:
        raise ConfigError(f"a batch of type {type(batch).__name__} cannot be split between processes")
    check_shareable(total, count, what)
    start, stop = index * total // count, (index + 1) * total // count
    return batch.part(start, stop), stop - start, total


def check_shareable(total: int, count: int, what: str = "tasks") -> None:
    """Refuse a batch of ``total`` tasks (or images) for ``count`` processes: each needs one."""
    if total < count:
        flag = "--meta-batch" if what == "tasks" else "--pretrain-batch"
        raise ConfigError(f"a batch of {total} {what} cannot be shared by {count} processes (each needs at least "
                          f"one); raise {flag} to {count} or more, or start fewer processes")
