"""``flipnet plot`` and ``flipnet compare``: figures and tables from run folders.

::

    flipnet plot RUN_OR_GROUP [...] [--out DIR] [--labels A B ...] [--separate-seeds] [--prefix TEXT] [--acc-min A] [--splits S ...]
    flipnet compare RUN_OR_GROUP [...] [--csv FILE] [--labels A B ...] [--separate-seeds]

A group folder (``flipnet train RECIPE seeds=[0,1,2]``) stands for its member runs, a folder of
run or group folders (``runs/``) for every run in it; runs that differ only in their seed are
drawn as one mean ± std band and reported as one table row. Only
the standard library and :mod:`flipnet.errors` are imported here; the plotting and table code is
imported when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from flipnet.errors import ConfigError

__all__ = ["register", "cmd_plot", "cmd_compare"]


def register(subparsers: Any) -> None:
    """Add ``plot`` and ``compare`` to the ``flipnet`` parser's ``subparsers``."""
    p = subparsers.add_parser(
        "plot",
        help="draw loss, accuracy and flip-ratio curves of runs (mean ± std over seeds)",
        description=(
            "Draw loss.png, accuracy.png and flip_ratio.png. Several runs are overlaid and labelled by the "
            "hyperparameters in which they differ; runs that differ only in the seed (or the members of a "
            "multi-seed run folder) are one mean ± std band."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_OR_GROUP", help="run folders, multi-seed group folders, or folders of them")
    p.add_argument("--out", metavar="DIR", help="output folder (default: PATH/plots for one path, ./plots for several)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per curve (default: the differing hyperparameters)")
    p.add_argument("--separate-seeds", action="store_true", help="one curve per run instead of mean ± std bands")
    p.add_argument("--prefix", default="", metavar="TEXT", help="file-name prefix, e.g. gallery_ (gallery_loss.png, ...)")
    p.add_argument("--acc-min", type=float, default=0.0, metavar="A",
                   help="start the accuracy axis at A instead of 0 (the axis label says so)")
    p.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["train", "val", "test"],
                   help="which splits the loss and accuracy figures show (default: all three)")
    p.set_defaults(func=cmd_plot)

    p = subparsers.add_parser(
        "compare",
        help="table of validation-selected and final accuracy of runs (mean ± std over seeds)",
        description=(
            "Print one markdown table: per run or seed group the test accuracy at the best validation epoch, "
            "the best validation accuracy, the final test accuracy (mean ± std over seeds), epochs, wall time "
            "per run and the hyperparameters in which the runs differ."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_OR_GROUP", help="run folders, multi-seed group folders, or folders of them")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV (plain numbers) to FILE")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="one label per row (default: the differing hyperparameters)")
    p.add_argument("--separate-seeds", action="store_true", help="one row per run instead of one per seed group")
    p.set_defaults(func=cmd_compare)


def cmd_plot(ns: argparse.Namespace) -> int:
    """``flipnet plot``: draw the curves and print the files written."""
    from flipnet.train.plots import plot_runs

    try:
        paths = plot_runs(ns.runs, ns.out, ns.labels, merge_seeds=not ns.separate_seeds, prefix=ns.prefix,
                           acc_min=ns.acc_min, splits=ns.splits)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for path in paths:
        print(path)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """``flipnet compare``: print the markdown table (and write the CSV)."""
    from flipnet.train.compare import compare_runs, format_markdown, write_csv

    try:
        rows, keys = compare_runs(ns.runs, ns.labels, merge_seeds=not ns.separate_seeds)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(format_markdown(rows, keys), end="")
    if ns.csv:
        print(f"wrote {write_csv(rows, keys, ns.csv)}")
    return 0
