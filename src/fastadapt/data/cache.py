"""Where datasets and their compact tensor caches live."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FASTADAPT_CACHE``, else ``$XDG_CACHE_HOME/fastadapt``, else ``~/.cache/fastadapt``."""
    env = os.environ.get("FASTADAPT_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "fastadapt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir(name: str) -> Path:
    """Default download folder of dataset ``name``: ``<cache>/data/<name>``."""
    return cache_dir() / "data" / name
