"""glibc malloc settings for many short-lived, mid-sized tensors.

With its defaults, glibc returns every freed block above a dynamic threshold (128 KiB to 32 MiB)
to the kernel with ``munmap`` and trims the heap top eagerly, so each meta-iteration maps,
page-faults and zero-fills the same memory again; on a small CPU that kernel work is a large
share of the time (``benchmarks/allocator.py``). Raising the mmap and trim thresholds keeps freed
memory in the process for reuse. The cost: the process's resident size stays near its peak
instead of shrinking between iterations (memory is reused, not leaked). Tensors larger than the
threshold (2 GiB here) are still mapped and returned as before.

The same effect for any program: ``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647``
in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest value it can express (2 GiB)


def tune_malloc(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds in this process. Returns True when applied; False
    on other C libraries (macOS, musl, Windows), where nothing is changed. Respects settings the
    user already made through ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    value = ctypes.c_int(min(int(threshold), THRESHOLD))
    ok_mmap = libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), value) == 1
    ok_trim = libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), value) == 1
    return ok_mmap and ok_trim
