"""CPU threads and machine load: set once per command, recorded beside every cost figure.

Timings on a CPU depend on how many threads PyTorch uses and on what else the machine is doing
(the same adaptation can take 1.6 ms on one idle thread and over 100 ms on two threads while
another process runs). Every command therefore takes ``--threads`` and every cost figure it
writes carries :func:`cost_context`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ConfigError


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set, else one thread per available core (what PyTorch
    itself would use), at least one."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Set PyTorch's intra-op thread count (``None``/0: :func:`default_threads`); returns it."""
    if threads is None or threads == 0:
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"--threads must be a positive whole number (0: one per core), got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or ``None`` where the OS does not report them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cost_context() -> dict[str, Any]:
    """What a cost figure depends on: threads, cores and the load average when it was taken."""
    return {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg": load_average()}
