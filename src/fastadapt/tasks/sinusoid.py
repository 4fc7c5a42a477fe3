"""The sinusoid regression family of Finn et al. (2017, Sec. 5.1).

A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase ``~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; the learner sees ``K = shots`` points and is scored on ``queries``
others of the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import DATASETS
from .episode import Episode


class SinusoidTasks:
    """Task source for sinusoid regression (``kind = "regression"``, ``in_shape = (1,)``).

    Targets are ``[points, 1]``. ``sample_batch`` draws a whole meta-batch with a few tensor ops.
    Every split draws from the same distribution (the family is infinite) but from its own
    stream: a split's draws come from a generator seeded by one number taken from the caller's
    generator and the split, so the test tasks of seed 0 are not the training tasks of seed 0.
    The episode stream is a pure function of the generator and the split.
    """

    SPLITS = ("train", "val", "test")

    kind = "regression"
    in_shape = (1,)

    def __init__(self, shots: int, queries: int, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi), x_range: tuple[float, float] = (-5.0, 5.0),
                 split: str = "train") -> None:
        if split not in self.SPLITS:
            raise ConfigError(f"unknown split '{split}' for sinusoid tasks; use one of {', '.join(self.SPLITS)}")
        self.split = split
        self.shots, self.queries = int(shots), int(queries)
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self._check_sizes()

    def _check_sizes(self) -> None:
        for name, value in (("shots", self.shots), ("queries", self.queries)):
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1 for sinusoid regression, got {value}")

    def draw_functions(self, generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases ``[n]`` of ``n`` tasks."""
        u = torch.rand(n, 2, generator=generator)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[:, 0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[:, 1]
        return amp, phase

    @staticmethod
    def curve(amp: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """``A sin(x - phase)`` broadcast over a task dimension: ``amp [T]``, ``x [T, N, 1]``."""
        return amp[:, None, None] * torch.sin(x - phase[:, None, None])

    def _split_stream(self, generator: torch.Generator) -> torch.Generator:
        """A generator for this split, seeded from one draw of ``generator``: seeds of different
        splits differ in their residue mod 3, so no two splits ever share a stream."""
        seed = int(torch.randint(0, 2**60, (1,), generator=generator))
        return torch.Generator().manual_seed(3 * seed + self.SPLITS.index(self.split))

    def sample_batch(self, generator: torch.Generator, num_tasks: int) -> Episode:
        generator = self._split_stream(generator)
        amp, phase = self.draw_functions(generator, num_tasks)
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(num_tasks, self.shots + self.queries, 1, generator=generator)
        y = self.curve(amp, phase, x)
        s = self.shots
        return Episode(x[:, :s], y[:, :s], x[:, s:], y[:, s:])

    def sample(self, generator: torch.Generator) -> Episode:
        return self.sample_batch(generator, 1).task(0)


@DATASETS.register("sinusoid")
def build_sinusoid(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> SinusoidTasks:
    """Sinusoid regression; ``ways`` does not apply and is ignored."""
    return SinusoidTasks(shots, queries, split=split)


build_sinusoid.kind = "regression"  # type: ignore[attr-defined]
