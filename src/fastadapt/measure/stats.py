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


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (two-sided 95%)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def batch_mean_ci95(values: Sequence[float], block: int) -> tuple[float, float | None]:
    """Mean of per-item ``values`` and the half-width of a 95% CI from their consecutive blocks.

    For a stream whose items are not independent within a block (the predictions of one test
    batch share its statistics and the model's adaptation), the blocks, not the items, are the
    independent units: the method of batch means. With ``B`` blocks of means ``m_b`` and sizes
    ``n_b`` (the last may be short), the variance of the overall mean is estimated as
    ``B / (B - 1) * sum(n_b^2 (m_b - mean)^2) / N^2`` (``sd(m_b)^2 / B`` for equal sizes) and the
    half-width is ``t(0.975, B - 1)`` times its square root. With one block there is no estimate:
    the half-width is ``None``.
    """
    n = len(values)
    if n == 0:
        raise ValueError("batch_mean_ci95 needs at least one value")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    mean = sum(values) / n
    blocks = [values[i : i + block] for i in range(0, n, block)]
    b = len(blocks)
    if b == 1:
        return mean, None
    ss = sum((len(v) * (sum(v) / len(v) - mean)) ** 2 for v in blocks)
    return mean, t_quantile_975(b - 1) * math.sqrt(b / (b - 1) * ss) / n
