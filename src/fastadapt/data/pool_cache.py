"""Decoded datasets cached as one raw ``uint8`` file and a small JSON index, read memory-mapped.

A cache entry is two files beside each other in the user cache (:func:`fastadapt.data.cache.cache_dir`):

* ``<stem>.u8``: the rows (e.g. images ``[N, C, H, W]``) back to back, nothing else;
* ``<stem>.json``: format and version, the source's fingerprint, the shape, the byte count, a
  digest of a few rows, and the loader's own metadata (class names, counts, labels).

Building streams the rows chunk by chunk into a temporary file beside the cache, so the memory
it needs is one chunk, not the dataset. The temporary file is flushed to disk and renamed into
place, and only then is the index written (atomically too): an interrupted build leaves no index,
and a ``.u8`` without a matching index is never read. The new file's pages are then evicted from
the page cache (see :func:`_drop_from_page_cache`), so that reading it maps only what is read.

Reading maps the file read-only and wraps it in a tensor without copying: pages are read from
disk when a row is first touched and live in the page cache, shared by every process that maps
the same file (several runs, distributed ranks), and the kernel may drop them again under memory
pressure. Such a tensor must only be read (indexing, ``index_select``, ``.float()`` of a few
rows): writing to it in place is a memory fault. Loaders of small datasets whose tensors are
handed to code that may write pass ``in_memory=True`` and get an ordinary copy instead.

Why read-only and not copy-on-write: a private writable mapping is charged in full against the
kernel's commit limit, so a cache larger than memory could not be mapped at all.

An index that cannot be read, a file of the wrong size or rows that do not match the digest are
reported on stderr, deleted, and the data are decoded again.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import sys
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..io import atomic_write, atomic_write_text

FORMAT = "fastadapt-uint8-rows"
VERSION = 1
#: How many rows, evenly spaced, the digest of an index covers (read back on every load).
PROBE_ROWS = 64


class CacheContent(NamedTuple):
    """What a cache holds: ``rows`` rows of ``row_shape`` delivered by ``chunks`` (uint8 arrays
    ``[n, *row_shape]``, in order) and the loader's ``meta`` (anything JSON can hold)."""

    row_shape: tuple[int, ...]
    rows: int
    chunks: Iterable[np.ndarray]
    meta: dict[str, Any]


def cache_files(stem: Path) -> tuple[Path, Path]:
    """The data file and the index of the cache entry ``stem``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".u8"), stem.with_name(stem.name + ".json")


def _probe(rows: np.ndarray) -> str:
    """sha256 of ``PROBE_ROWS`` evenly spaced rows (first and last included)."""
    h = hashlib.sha256()
    n = len(rows)
    for i in sorted({(n - 1) * k // max(1, PROBE_ROWS - 1) for k in range(PROBE_ROWS)} if n else ()):
        h.update(np.ascontiguousarray(rows[i]).tobytes())
    return h.hexdigest()


def _map(data: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The first ``prod(shape)`` bytes of ``data``, mapped read-only, as an array of ``shape``."""
    size = math.prod(shape)
    if size == 0:  # an empty file cannot be mapped
        return np.empty(shape, dtype=np.uint8)
    with open(data, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Episodes read rows in random order: read ahead, a row would drag its neighbours from disk.
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=np.uint8).reshape(shape)


def _tensor(rows: np.ndarray, in_memory: bool) -> Tensor:
    if in_memory:
        return torch.from_numpy(np.array(rows))
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor read-only; the read-only mapping is deliberate
        # (see the module's docstring), and its users only read it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(rows)


def _drop_from_page_cache(path: Path) -> None:
    """Evict the pages of ``path`` (written and flushed to disk) from the page cache.

    Pages written in large blocks are cached as large blocks, up to 2 MiB, and a mapping maps (and
    the process's resident size counts) a whole block when one row of it is read: sampling would
    soon hold the whole file. Read back from disk with random access advised, a row brings in
    only its own pages."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class _Damaged(Exception):
    pass


def load_cache(stem: Path, source: str, in_memory: bool = False) -> tuple[Tensor, dict[str, Any]] | None:
    """The rows (``uint8 [N, *row_shape]``, mapped read-only, or copied into memory with
    ``in_memory``) and metadata of the cache entry ``stem``, or ``None`` when there is no complete
    entry for ``source`` (a damaged one is deleted)."""
    data, index = cache_files(stem)
    if not index.is_file():
        return None
    try:
        try:
            record = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Damaged(f"its index cannot be read ({exc})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise _Damaged("its index is not a fastadapt cache index")
        if record.get("version") != VERSION:
            raise _Damaged(f"it was written in format version {record.get('version')}, this is version {VERSION}")
        if record.get("source") != source:
            raise _Damaged("it was decoded from other data")
        shape = tuple(int(s) for s in record["shape"])
        expected = math.prod(shape)
        try:
            size = data.stat().st_size
        except OSError:
            raise _Damaged(f"{data.name} is missing") from None
        if size != expected or int(record["bytes"]) != expected:
            raise _Damaged(f"{data.name} holds {size} bytes, its index expects {expected}")
        rows = _map(data, shape)
        if _probe(rows) != record["probe"]:
            raise _Damaged(f"the rows of {data.name} do not match its index")
        meta = record["meta"]
    except (_Damaged, KeyError, TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, _Damaged) else f"its index is malformed ({type(exc).__name__}: {exc})"
        print(f"warning: the dataset cache {data} is damaged or out of date: {reason}; deleting it and decoding "
              "the data again", file=sys.stderr, flush=True)
        discard_cache(stem)
        return None
    return _tensor(rows, in_memory), meta


def discard_cache(stem: Path) -> None:
    """Delete the cache entry ``stem`` (index first, so that the data is never trusted alone)."""
    data, index = cache_files(stem)
    index.unlink(missing_ok=True)
    data.unlink(missing_ok=True)


def write_cache(stem: Path, source: str, content: CacheContent,
                in_memory: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """Stream ``content`` into the cache entry ``stem`` for ``source``; return it as
    :func:`load_cache` does.

    Only one chunk is in memory at a time (the caller's). On any error, the temporary file is
    removed and no index exists, so nothing half-written is ever read."""
    data, index = cache_files(stem)
    data.parent.mkdir(parents=True, exist_ok=True)
    index.unlink(missing_ok=True)  # the old index no longer vouches for the data file
    row_shape = tuple(int(s) for s in content.row_shape)

    def stream(f: BinaryIO) -> None:
        written = 0
        for chunk in content.chunks:
            if chunk.dtype != np.uint8 or tuple(chunk.shape[1:]) != row_shape:
                raise DataError(f"a cache chunk is {chunk.dtype} {tuple(chunk.shape)}, expected uint8 "
                                f"[n, {', '.join(map(str, row_shape))}]")
            f.write(np.ascontiguousarray(chunk).data)
            written += len(chunk)
        if written != content.rows:
            raise DataError(f"the cache {data.name} received {written} rows, expected {content.rows}")

    atomic_write(data, stream)  # a temporary file beside it, flushed to disk, renamed into place
    _drop_from_page_cache(data)
    shape = (content.rows, *row_shape)
    rows = _map(data, shape)
    record = {"format": FORMAT, "version": VERSION, "source": source, "dtype": "uint8", "shape": list(shape),
              "bytes": math.prod(shape), "probe": _probe(rows), "meta": content.meta}
    atomic_write_text(index, json.dumps(record) + "\n")
    return _tensor(rows, in_memory), content.meta


def cached_rows(stem: Path, source: str, build: Callable[[], CacheContent],
                in_memory: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """The cache entry ``stem`` of ``source``, built by ``build()`` when missing or damaged."""
    return load_cache(stem, source, in_memory) or write_cache(stem, source, build(), in_memory)
