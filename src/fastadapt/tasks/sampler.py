"""k-way n-shot episodes from a pool of labelled images.

The pool keeps every image as ``uint8`` in one contiguous tensor, grouped by class; an episode
is drawn with a handful of vectorised tensor ops (no per-image Python), so sampling stays far
from being the bottleneck of training. The tensor may be memory-mapped from a cache file (see
:mod:`fastadapt.data.pool_cache`): an episode reads only the rows it draws, so a pool larger
than memory works, and nothing here copies or converts the whole pool.

On a GPU, :meth:`EpisodeSampler.on_device` keeps a copy of a pool that fits comfortably in the
GPU's memory there: the host then draws only row indices (from the same generator, so the
episodes are the same) and the gather and conversion run on the GPU, instead of a host-side
gather and a copy of every episode's images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .episode import Episode, EpisodeWithClasses, LabelledBatch

#: :meth:`EpisodeSampler.on_device` copies a pool to a GPU when it takes at most this share of
#: the GPU's memory (Omniglot's training pool at 28x28, rotations included, is 64 MB; CIFAR-10's 150 MB).
DEVICE_POOL_SHARE = 0.1


@dataclass
class ClassPool:
    """Images of one split, grouped by class.

    ``images`` is ``uint8 [N, C, H, W]`` sorted by class; class ``c`` owns rows
    ``offsets[c] : offsets[c] + counts[c]``. ``class_names`` names each class (for messages).
    ``images`` may be memory-mapped; the pool never copies it whole.
    """

    images: Tensor
    offsets: Tensor
    counts: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"a class pool needs uint8 images [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.class_names) != len(self.counts):
            raise DataError("a class pool needs one name per class")

    @classmethod
    def from_labels(cls, images: Tensor, labels: Tensor, class_names: Sequence[str] | None = None) -> "ClassPool":
        """Build a pool from images and integer labels ``0..C-1`` (images already grouped by class
        are used as they are, not copied)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        counts = torch.bincount(labels)
        offsets = torch.cumsum(counts, 0) - counts
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(counts))]
        if bool((labels[1:] >= labels[:-1]).all()) and images.is_contiguous():
            return cls(images, offsets, counts, names)
        order = torch.argsort(labels, stable=True)
        return cls(images[order].contiguous(), offsets, counts, names)

    @classmethod
    def from_grouped(cls, images: Tensor, class_names: Sequence[str] | None = None) -> "ClassPool":
        """Build a pool from ``uint8 [classes, per_class, C, H, W]``."""
        c, n = images.shape[:2]
        counts = torch.full((c,), n, dtype=torch.long)
        names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
        return cls(images.reshape(c * n, *images.shape[2:]).contiguous(), torch.arange(c) * n, counts, names)

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def on_device(source: Any, device: torch.device | str) -> Any:
    """``source``, drawing its tasks on ``device`` where it can (``source.on_device``, as
    :meth:`EpisodeSampler.on_device`); sources without that method are returned as they are."""
    place = getattr(source, "on_device", None)
    return place(device) if place is not None else source


class EpisodeSampler:
    """Draws k-way n-shot episodes (``ways`` classes, ``shots`` support and ``queries`` query
    images per class) from a :class:`ClassPool`.

    Support and query images of a class are distinct. Labels are remapped to ``0..ways-1``
    in the order the classes were drawn; images are returned class-major as ``float32`` in
    ``[0, 1]``. The stream of episodes is a pure function of the ``torch.Generator`` passed to
    :meth:`sample`, so a run is reproducible and a resumed run continues the same stream.
    """

    kind = "classification"

    def __init__(self, pool: ClassPool, ways: int, shots: int, queries: int, split: str = "split") -> None:
        self.pool = pool
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.split = split
        self._check_sizes()
        max_count = int(pool.counts.max())
        # Positions past a class's size get a key that always sorts last.
        self._invalid = torch.arange(max_count)[None, :] >= pool.counts[:, None]
        self._uneven = bool(self._invalid.any())
        self._support_y = torch.arange(self.ways).repeat_interleave(self.shots)
        self._query_y = torch.arange(self.ways).repeat_interleave(self.queries)
        self._images = pool.images  # gathered from: the pool, or its copy on a GPU (on_device)
        self._lut: Tensor | None = None  # on a GPU: the 256 values of a uint8 pixel, divided on the host

    def on_device(self, device: torch.device | str) -> "EpisodeSampler":
        """This sampler, drawing its episodes on ``device``: on a GPU whose memory the pool fits
        within :data:`DEVICE_POOL_SHARE` of, a sampler that shares this one's pool and keeps a copy
        of its images there (the same episodes from the same generator, gathered and converted
        on the GPU); otherwise ``self``, whose episodes the caller moves."""
        device = torch.device(device)
        here = self._images.device
        if device.type != "cuda" or (here.type == "cuda" and device.index in (None, here.index)):
            return self
        pool_bytes = self.pool.images.numel() * self.pool.images.element_size()
        if pool_bytes > DEVICE_POOL_SHARE * torch.cuda.get_device_properties(device).total_memory:
            return self
        return self._placed(device)

    def _placed(self, device: torch.device) -> "EpisodeSampler":
        """A shallow copy of this sampler that gathers from a copy of the images on ``device``."""
        placed = copy.copy(self)
        placed._images = self.pool.images.to(device)
        # A GPU divides by a scalar as a multiply by its reciprocal, one rounding away from the
        # host's division: a table of the host's 256 quotients keeps the episodes bit for bit.
        placed._lut = torch.arange(256, dtype=torch.uint8).float().div_(255.0).to(device)
        placed._support_y, placed._query_y = self._support_y.to(device), self._query_y.to(device)
        return placed

    def _gather(self, rows: Tensor) -> Tensor:
        """Images of pool rows ``rows`` (any shape) as float in ``[0, 1]``, on the images' device."""
        # index_select is several times faster than advanced indexing for this gather.
        rows = rows.reshape(-1).to(self._images.device, non_blocking=True)
        raw = self._images.index_select(0, rows)
        if self._lut is None:
            return raw.float().div_(255.0)
        return self._lut.index_select(0, raw.reshape(-1).int()).view(raw.shape)

    def _check_sizes(self) -> None:
        for name, value, low in (("ways", self.ways, 2), ("shots", self.shots, 1), ("queries", self.queries, 1)):
            if value < low:
                raise ConfigError(f"--{name} must be at least {low}, got {value}")
        if self.ways > self.pool.num_classes:
            raise ConfigError(
                f"--ways {self.ways} is more than the {self.pool.num_classes} classes of the {self.split} split; "
                f"use --ways {self.pool.num_classes} or fewer"
            )
        need = self.shots + self.queries
        smallest = int(self.pool.counts.min())
        if need > smallest:
            name = self.pool.class_names[int(self.pool.counts.argmin())]
            raise ConfigError(
                f"--shots {self.shots} + --queries {self.queries} = {need} images per class, but class '{name}' "
                f"of the {self.split} split has only {smallest}; lower --shots or --queries"
            )

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.pool.image_shape

    def sample_classes(self, generator: torch.Generator) -> Tensor:
        """``ways`` distinct classes, uniformly at random, in random order.

        With many more classes than ways, the first ``ways`` distinct values of a short i.i.d.
        uniform sequence are such a sample, at a fraction of the cost of a full permutation.
        """
        n = self.pool.num_classes
        if 4 * self.ways <= n:
            seen: dict[int, None] = {}
            for c in torch.randint(0, n, (2 * self.ways + 8,), generator=generator).tolist():
                seen.setdefault(c, None)
                if len(seen) == self.ways:
                    return torch.tensor(list(seen), dtype=torch.long)
        return torch.randperm(n, generator=generator)[: self.ways]

    def _draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Row indices into ``pool.images`` ``[ways, shots + queries]`` and the classes ``[ways]``."""
        pool = self.pool
        classes = self.sample_classes(generator)
        keys = torch.rand(self.ways, self._invalid.shape[1], generator=generator)
        if self._uneven:
            keys.masked_fill_(self._invalid[classes], 2.0)
        picks = keys.topk(self.shots + self.queries, dim=1, largest=False, sorted=True).indices
        return pool.offsets[classes][:, None] + picks, classes

    def sample_indices(self, generator: torch.Generator) -> Tensor:
        """Row indices into ``pool.images``, shape ``[ways, shots + queries]``."""
        return self._draw(generator)[0]

    def _episode(self, idx: Tensor) -> Episode:
        """The episode of row indices ``idx [ways, shots + queries]``, or the batch of episodes of
        ``idx [tasks, ways, shots + queries]``, gathered and converted in one pass."""
        shape = self.pool.image_shape
        x = self._gather(idx).reshape(*idx.shape, *shape)
        lead, s = idx.shape[:-2], self.shots
        support = x[..., :s, :, :, :].reshape(*lead, -1, *shape)
        query = x[..., s:, :, :, :].reshape(*lead, -1, *shape)
        return Episode(support, self._support_y.expand(*lead, -1).clone(), query,
                       self._query_y.expand(*lead, -1).clone())

    def sample(self, generator: torch.Generator) -> Episode:
        return self._episode(self.sample_indices(generator))

    def sample_batch(self, generator: torch.Generator, num_tasks: int) -> Episode:
        """``num_tasks`` episodes stacked with a leading task dimension (the episodes
        :meth:`sample` would draw one after another, gathered in one pass)."""
        return self.sample_batch_with_classes(generator, num_tasks).episode

    def sample_batch_with_classes(self, generator: torch.Generator, num_tasks: int) -> EpisodeWithClasses:
        """:meth:`sample_batch`'s episodes with the pool's ids of each episode's classes
        (``classes [num_tasks, ways]``)."""
        drawn = [self._draw(generator) for _ in range(num_tasks)]
        return EpisodeWithClasses(self._episode(torch.stack([idx for idx, _ in drawn])),
                                  torch.stack([classes for _, classes in drawn]))

    @property
    def num_classes(self) -> int:
        return self.pool.num_classes

    def _labelled_rows(self) -> tuple[Tensor, Tensor]:
        """Every image row that belongs to a class, and its class (computed once)."""
        if not hasattr(self, "_rows"):
            counts = self.pool.counts
            cls = torch.repeat_interleave(torch.arange(len(counts)), counts)
            start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            within = torch.arange(int(counts.sum())) - start
            self._rows, self._row_class = self.pool.offsets[cls] + within, cls
        return self._rows, self._row_class

    def sample_labelled(self, generator: torch.Generator, batch_size: int) -> LabelledBatch:
        """``batch_size`` images drawn uniformly (with replacement) from the whole split, with
        their class ids ``0..num_classes-1``: the batches of an ordinary classifier."""
        if batch_size < 1:
            raise ConfigError(f"--pretrain-batch must be at least 1, got {batch_size}")
        rows, row_class = self._labelled_rows()
        pick = torch.randint(0, len(rows), (batch_size,), generator=generator)
        return LabelledBatch(self._gather(rows[pick]), row_class[pick].to(self._images.device))
