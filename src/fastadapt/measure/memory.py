"""Peak memory of a block of code, on the GPU or the CPU.

On CUDA this is the peak of ``torch.cuda.max_memory_allocated`` (tensors only). On the CPU it is
the process's peak resident set size while the block ran, read from ``/proc/self/status``
(``VmHWM``) after resetting it through ``/proc/self/clear_refs``; where that reset is not
available the process-lifetime peak (``ru_maxrss``) is reported instead. ``PeakMemory.kind``
says which of the three a figure is.
"""

from __future__ import annotations

import resource
import sys

import torch


def _read_vmhwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_vmhwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_OPEN: list["PeakMemory"] = []  # the blocks being measured, outermost first


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as pm: ...; pm.peak_mb``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb = 0.0
        self.kind = ""

    def _read(self) -> float:
        """The peak since the last reset, in MB."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _read_vmhwm_mb() if self.kind == "cpu_peak_rss" else None
        if hwm is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = rss / 2**20 if sys.platform == "darwin" else rss / 1024.0
        return hwm

    def __enter__(self) -> "PeakMemory":
        # A block inside another (an evaluation inside training) resets the same counter: the
        # enclosing blocks first keep the peak they have seen so far.
        for outer in _OPEN:
            outer._seen = max(outer._seen, outer._read())
        self._seen = 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif _reset_vmhwm():
            self.kind = "cpu_peak_rss"
        else:
            self.kind = "cpu_peak_rss_process"
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _OPEN.remove(self)
        self.peak_mb = max(self._seen, self._read())
