"""The ``fastadapt`` command line: the only place that reads configuration files and flags.

One module per command group, each registering its sub-commands on the main parser:
:mod:`.train` (``train``, ``eval``, ``list``), :mod:`.tta` (``tta train-source``, ``tta eval``)
and :mod:`.lopt` (``lopt train``, ``lopt eval``). :func:`main` parses, sets the thread count and
turns library errors into one-line messages.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..engine.allocator import tune_malloc
from ..engine.distributed import launch_rank
from ..engine.trainer import RunInterrupted
from ..errors import FastAdaptError, UnknownNameError
from ..measure.threads import set_threads
from ..registry import METHODS
from .lopt import add_lopt_parser
from .train import add_train_parsers
from .tta import add_tta_parser

THREADS_HELP = "CPU threads (default 0: $OMP_NUM_THREADS if set, else one per core)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadapt",
        description="Efficient meta-learning and test-time adaptation on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"fastadapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parsers(sub)
    for group in (add_tta_parser(sub), add_lopt_parser(sub)):
        for leaf in _subcommands(group):  # every command takes --threads
            if not any("--threads" in a.option_strings for a in leaf._actions):
                leaf.add_argument("--threads", type=int, help=THREADS_HELP)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.extend(action.choices.values())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "train" and not argv[1].startswith("-") and argv[1] not in METHODS:
        print(f"error: {UnknownNameError(f'unknown method {argv[1]!r}; known methods: ' + ', '.join(METHODS.names()))}",
              file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = " ".join(["fastadapt", *argv])  # recorded in result files (main() may be called with argv)
    # Reuse freed tensor memory instead of unmapping it every iteration (see engine/allocator.py;
    # a no-op off glibc or when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set).
    tune_malloc()
    try:
        if hasattr(args, "threads"):
            set_threads(args.threads)
        return args.handler(args)
    except FastAdaptError as exc:
        rank = launch_rank()  # under torchrun every process reports, the first one without a tag
        print(f"error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # The trainer says at which step the run was saved (RunInterrupted); other commands save nothing.
        print(f"\n{exc if isinstance(exc, RunInterrupted) else 'interrupted'}", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
