"""The unit of meta-learning: one task's support and query sets."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor


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
