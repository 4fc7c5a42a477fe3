"""Measurement helpers: peak memory of nested blocks."""

import mmap

import pytest

from fastadapt.measure.memory import PeakMemory


def _touch(mb: int) -> None:
    """Make ``mb`` MB resident and give them back (fresh pages: a heap could reuse freed ones)."""
    with mmap.mmap(-1, mb * 2**20) as m:
        for i in range(0, len(m), 4096):
            m[i] = 1


def test_an_inner_block_does_not_hide_the_outer_blocks_earlier_peak():
    # Training measures its peak around evaluations that measure their own: the inner reset
    # must not make the outer block forget what it saw before.
    with PeakMemory("cpu") as outer:
        if outer.kind != "cpu_peak_rss":
            pytest.skip("this kernel cannot reset the peak resident size")
        _touch(300)
        with PeakMemory("cpu") as inner:
            _touch(10)
    with PeakMemory("cpu") as alone:
        _touch(10)
    assert inner.peak_mb < outer.peak_mb - 200, (inner.peak_mb, outer.peak_mb)
    assert outer.peak_mb > alone.peak_mb + 200, (alone.peak_mb, outer.peak_mb)
