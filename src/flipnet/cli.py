"""The ``flipnet`` command: one ``argparse`` parser, sub-commands contributed by feature modules.

Each feature module exposes ``register_cli(subparsers)``: :mod:`flipnet.train.cli` (``train``,
``eval``, ``recipes``, ``plot``), :mod:`flipnet.analysis.cli` and :mod:`flipnet.compress.cli`.
Errors caused by bad input (:class:`flipnet.errors.FlipnetError`) are printed as one line without
a traceback and exit with status 2; Ctrl-C exits with status 130, a closed output pipe
(``flipnet recipes | head -1``) quietly with status 141.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from flipnet import __version__
from flipnet.errors import FlipnetError

__all__ = ["build_parser", "main"]

#: Modules that contribute sub-commands, in the order they appear in ``flipnet --help``.
CLI_MODULES: tuple[str, ...] = ("flipnet.train.cli", "flipnet.analysis.cli", "flipnet.compress.cli")


def _optional_module(name: str):  # type: ignore[no-untyped-def]
    """Import ``name``; ``None`` only when that module (or its package) does not exist yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        parts = name.split(".")
        missing_self = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        if e.name in missing_self:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The ``flipnet`` argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="flipnet",
        description="Train, understand and compress binary neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"flipnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CLI_MODULES:
        module = _optional_module(name)
        if module is not None:
            module.register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flipnet`` command line; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    func = getattr(ns, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status = int(func(ns) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at exit
        return status
    except FlipnetError as e:
        print(f"flipnet {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flipnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `flipnet recipes | head -1`: the reader left, nothing to report
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
