"""Summary statistics used in every report."""

from __future__ import annotations

import math
from typing import Sequence


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval
    (``1.96 * std / sqrt(n)``, sample std), the convention of the few-shot literature."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median needs at least one value")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
