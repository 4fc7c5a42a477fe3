"""Progress of long work: a bar on a terminal, plain lines in logs, nothing with ``--no-progress``.

Every long loop in fastadapt (meta-training, evaluation, dataset decoding, downloads, test-time
adaptation) goes through :func:`progress_bar`:

* on a terminal (or in a notebook) it is a ``tqdm`` bar, redrawn in place;
* where stderr is not a terminal (a log file, CI, ``nohup``) a redrawn bar would be either
  noise or nothing, so instead one plain line is written to stderr every
  ``$FASTADAPT_PROGRESS_SECONDS`` seconds (default 10; 0 turns the lines off), e.g.
  ``meta-train maml: 120/500 it (24%), loss=1.234, accuracy=45.000 | 2.10 it/s, elapsed 00:57, left 03:01``,
  and a last line when the work ends (only if an earlier line was written, so short work stays
  silent);
* ``enabled=False`` (the CLI's ``--no-progress``) shows nothing at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm as _std_tqdm
from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _auto_tqdm  # already imported (quietly) by tqdm.auto

from .errors import ConfigError

ENV_SECONDS = "FASTADAPT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 10.0

_clock = time.monotonic  # replaced by a fake clock in the tests


def log_interval() -> float:
    """Seconds between plain progress lines: ``$FASTADAPT_PROGRESS_SECONDS`` (default 10)."""
    text = os.environ.get(ENV_SECONDS, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{ENV_SECONDS}={text!r} is not a number of seconds; set it to e.g. 10 (0: no lines)")
    return value


def _on_terminal() -> bool:
    # tqdm.auto picks a notebook widget inside Jupyter, whose stderr is not a terminal either.
    if _auto_tqdm is not _std_tqdm:
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def progress_bar(iterable: Any = None, enabled: bool = True, **kwargs: Any) -> Any:
    """A progress tracker with tqdm's interface (iterate it, or ``update``/``set_postfix``/``close``).

    ``kwargs`` are tqdm's (``total``, ``initial``, ``desc``, ``unit``, ``unit_scale``, ...). On a
    terminal it is a tqdm bar; elsewhere a :class:`LogProgress` writing a line every few seconds;
    ``enabled=False`` silences both.
    """
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if _on_terminal():
        kwargs.setdefault("leave", False)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, **kwargs)


def _duration(seconds: float) -> str:
    return _std_tqdm.format_interval(max(0.0, seconds))


class LogProgress:
    """Plain progress lines for non-terminal output (see the module docstring).

    Implements the part of tqdm's interface fastadapt uses; tqdm-only display options
    (``leave``, ``dynamic_ncols``, ``position``, ...) are accepted and ignored.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, desc: str | None = None, total: float | None = None,
                 initial: float = 0, unit: str = "it", unit_scale: bool = False, interval: float | None = None,
                 **_display_options: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.desc, self.total, self.n, self.unit, self.unit_scale = desc or "", total, initial, unit, unit_scale
        self.interval = log_interval() if interval is None else float(interval)
        self.postfix: dict[str, Any] = {}
        self._initial = initial
        self._start = self._last = _clock()
        self._printed = False
        self._shown: float = -1  # the count at the last line written
        self._closed = False

    # ------------------------------------------------------------------ tqdm's interface
    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.interval > 0:
            now = _clock()
            if now - self._last >= self.interval:
                self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._printed and self.n != self._shown:  # the end of work whose progress was shown
            self._emit(_clock())

    # ------------------------------------------------------------------ the line
    def _amount(self, value: float) -> str:
        if self.unit_scale:
            return _std_tqdm.format_sizeof(value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    def line(self, now: float | None = None) -> str:
        """The progress line as of ``now`` (default: the clock)."""
        now = _clock() if now is None else now
        elapsed = now - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            head = f"{self._amount(self.n)}/{self._amount(self.total)} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            head = f"{self._amount(self.n)} {self.unit}"
        parts = [f"{self.desc}: {head}" if self.desc else head]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        speed = f"{self._amount(rate)} {self.unit}/s" if self.unit_scale else f"{rate:.2f} {self.unit}/s"
        timing = f"{speed}, elapsed {_duration(elapsed)}"
        if self.total and rate > 0:
            timing += f", left {_duration((self.total - self.n) / rate)}"
        return ", ".join(parts) + " | " + timing

    def _emit(self, now: float) -> None:
        print(self.line(now), file=sys.stderr, flush=True)
        self._last, self._printed, self._shown = now, True, self.n
