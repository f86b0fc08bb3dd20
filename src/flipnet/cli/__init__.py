"""The ``flipnet`` command: one ``argparse`` parser, sub-commands contributed by command modules.

Each module named in :data:`COMMAND_MODULES` defines ``register(subparsers) -> None`` and imports
only the standard library and :mod:`flipnet.errors` at module level; the heavy modules (torch,
the trainer, the exporters) are imported inside the command functions. So ``flipnet --help``,
``flipnet --version`` and ``flipnet recipes`` import no torch and answer at once.

Errors caused by bad input (:class:`flipnet.errors.FlipnetError`) are printed as one line without
a traceback and exit with status 2; Ctrl-C exits with status 130, SIGTERM with 143 (after the
trainer saved), a closed output pipe (``flipnet recipes | head -1``) quietly with status 141.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from flipnet._version import __version__
from flipnet.errors import FlipnetError

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: Modules that contribute sub-commands, in the order they appear in ``flipnet --help``.
COMMAND_MODULES: tuple[str, ...] = ("flipnet.cli.train", "flipnet.cli.results", "flipnet.cli.analysis", "flipnet.cli.compress", "flipnet.cli.hparams")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage mistake as one line on stderr (exit status 2), like every other
    flipnet error; the sub-command parsers inherit it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``flipnet`` argument parser with every sub-command."""
    parser = _Parser(prog="flipnet", description="Train, understand and compress binary neural networks.")
    parser.add_argument("--version", action="version", version=f"flipnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flipnet`` command line; returns the exit status."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        # `flipnet train RECIPE --out DIR key=value`: overrides after an option are still overrides
        if getattr(ns, "command", None) == "train" and all("=" in a and not a.startswith("-") for a in extra):
            ns.args = [*ns.args, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
    except KeyboardInterrupt as e:  # the trainer saved first (flipnet.train.callbacks.Stopped carries the signal)
        import signal

        if getattr(e, "signum", None) == signal.SIGTERM:
            print("flipnet: terminated", file=sys.stderr)
            return 143
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
