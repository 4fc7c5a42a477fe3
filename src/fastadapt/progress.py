"""Progress bars for long work: shown on a terminal, silent in logs and pipes."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar; ``enabled=False`` hides it, and it also hides itself when stderr is not
    a terminal (``disable=None``), so CI logs are not flooded with redraws."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
