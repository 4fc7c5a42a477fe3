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
