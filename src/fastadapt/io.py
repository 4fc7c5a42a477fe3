"""Atomic, safe checkpoint files, and the user cache folder.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the old one, so an interrupted write never leaves a half-written checkpoint behind. Loading uses
``weights_only=True``: checkpoints hold tensors, numbers, strings and containers only, never
pickled code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import DataError


def cache_dir() -> Path:
    """``$FASTADAPT_CACHE``, else ``$XDG_CACHE_HOME/fastadapt``, else ``~/.cache/fastadapt``: where
    downloads, dataset caches and built kernels go (created when missing)."""
    env = os.environ.get("FASTADAPT_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "fastadapt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the one before: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically. With ``keep_previous`` the checkpoint it
    replaces stays readable as :func:`previous_checkpoint` (a hard link, renamed into place), so
    at every moment at least one complete checkpoint is on disk."""
    path = Path(path)
    if keep_previous and path.is_file():
        prev = previous_checkpoint(path)
        tmp = prev.with_name(prev.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # truncated, corrupt, not a torch file, or holding pickled code
        # One line of our own: torch's message would suggest weights_only=False, which is unsafe.
        raise DataError(f"checkpoint {path} cannot be read (truncated, corrupt or not a fastadapt checkpoint); "
                        "delete it to start over") from None


def load_checkpoint_with_fallback(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                                  warn: Callable[[str], None] | None = None) -> Any:
    """:func:`load_checkpoint`, falling back to the previous checkpoint when the newest one is
    missing or unreadable (``warn`` is told, by default on stderr). Raises the newest one's
    error when neither can be read."""
    path = Path(path)
    prev = previous_checkpoint(path)
    try:
        return load_checkpoint(path, map_location)
    except DataError as exc:
        if not prev.is_file():
            raise
        newest_error = exc
    try:
        ck = load_checkpoint(prev, map_location)
    except DataError:
        raise newest_error from None
    message = (f"warning: {path} cannot be read; continuing from the previous checkpoint {prev.name} "
               f"(step {ck.get('step', '?') if isinstance(ck, dict) else '?'})")
    (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
    return ck


def read_metrics(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, up to iteration ``upto`` when given (later ones belong to
    work lost by an interruption); a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if upto is None or row.get("step", 0) <= upto:
            rows.append(row)
    return rows
