"""Where datasets and their compact tensor caches live.

A dataset's folder is, in this order: the ``--data-dir`` given; ``$FASTADAPT_DATA/<name>`` when that
folder exists (``FASTADAPT_DATA`` is a root laid out like ``omniglot/``, ``mnist/``, ``cifar10/``);
else ``<cache>/data/<name>``, where a missing dataset is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import cache_dir

__all__ = ["cache_dir", "default_data_dir", "env_data_dir", "DATA_ENV"]


def default_data_dir(name: str) -> Path:
    """Default download folder of dataset ``name``: ``<cache>/data/<name>``."""
    return cache_dir() / "data" / name


DATA_ENV = "FASTADAPT_DATA"


def env_data_dir(name: str) -> Path | None:
    """``$FASTADAPT_DATA/<name>`` if the variable is set and that folder exists, else ``None``."""
    root = os.environ.get(DATA_ENV)
    if not root:
        return None
    path = Path(root).expanduser() / name
    return path if path.is_dir() else None
