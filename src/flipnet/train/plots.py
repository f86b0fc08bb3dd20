"""Training curves from run folders: loss, accuracy and flip ratio per epoch (PNG, matplotlib Agg).

:func:`plot_runs` reads ``metrics.jsonl`` of one or more run folders and overlays them, one colour
per run. ``flipnet plot RUN [RUN ...] [--out DIR]`` calls it; the trainer calls it at the end of a
run to fill ``RUN/plots``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from flipnet.errors import CheckpointError
from flipnet.utils import atomic_path

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of a run (``metrics.jsonl``; a torn last line is skipped).

    When a resumed run re-logged an epoch, the last row of that epoch wins.

    Raises:
        CheckpointError: ``run_dir`` is not a run folder (no ``metrics.jsonl``).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        from .checkpoint import inner_runs_hint

        raise CheckpointError(
            f"{run_dir} has no metrics.jsonl; give a run folder written by flipnet train.{inner_runs_hint(run_dir)}"
        )
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash while appending
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Draw ``loss.png``, ``accuracy.png`` and ``flip_ratio.png`` for one run or an overlay of runs.

    Args:
        run_dirs: run folders (each with a ``metrics.jsonl``).
        out_dir: where the PNGs go; default ``RUN/plots`` for one run, ``./plots`` for several.
        labels: legend labels (default: the run folder names).

    Returns:
        The paths written. ``flip_ratio.png`` is drawn only when some run logged flip ratios.
        With one run, the flip-ratio plot also shows each binary layer.

    Raises:
        CheckpointError: a folder is not a run folder.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    runs = [Path(r) for r in run_dirs]
    data = [read_metrics(r) for r in runs]
    names = list(labels) if labels is not None else [r.resolve().name for r in runs]
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} labels for {len(runs)} runs")
    out = Path(out_dir) if out_dir is not None else (runs[0] / "plots" if len(runs) == 1 else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    written: list[Path] = []
    single = len(runs) == 1

    for fname, title, ylabel, keys in (
        ("loss.png", "Loss", "cross-entropy", ("train_loss", "test_loss")),
        ("accuracy.png", "Accuracy", "accuracy", ("train_acc", "test_acc")),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (rows, name) in enumerate(zip(data, names)):
            color = colors[i % len(colors)]
            for key, style in zip(keys, ("--", "-")):
                xs, ys = _series(rows, key)
                if xs:
                    split = key.split("_")[0]
                    label = split if single else f"{name} ({split})"
                    ax.plot(xs, ys, style, color=color, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title + ("" if not single else f" — {names[0]}"))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        _save(fig, out / fname)
        plt.close(fig)
        written.append(out / fname)

    if any(_series(rows, "flip_ratio")[0] for rows in data):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        positive = False
        for i, (rows, name) in enumerate(zip(data, names)):
            color = colors[i % len(colors)]
            xs, ys = _series(rows, "flip_ratio")
            positive |= any(y > 0 for y in ys)
            ax.plot(xs, ys, "-", color=color, lw=2, label="total" if single else name)
            if single:
                layer_keys = sorted({k for r in rows for k in r if k.startswith("flip_ratio/")})
                for j, key in enumerate(layer_keys):
                    lx, ly = _series(rows, key)
                    positive |= any(y > 0 for y in ly)
                    ax.plot(lx, ly, ":", lw=1, color=colors[(j + 1) % len(colors)], label=key.split("/", 1)[1])
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("flips per weight per step")
        ax.set_title("Flip ratio" + ("" if not single else f" — {names[0]}"))
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
        _save(fig, out / "flip_ratio.png")
        plt.close(fig)
        written.append(out / "flip_ratio.png")
    return written
