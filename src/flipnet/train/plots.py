"""Training curves from run folders: loss, accuracy and flip ratio per epoch (PNG, matplotlib Agg).

:func:`plot_runs` reads ``metrics.jsonl`` of run folders and group folders (several seeds trained
together, see :mod:`flipnet.train.compare` for the layout) and overlays them:

* runs whose configs differ only in the seed are one *seed group*: its mean is the line and
  mean ± standard deviation over seeds (sample std, per epoch) the shaded band;
* curves are labelled by the hyperparameters in which the groups differ (``gamma=0.0001``),
  or by ``labels``;
* legends sit outside the axes (right of them), never over the curves;
* per-layer flip ratios (one group) cycle through colour *and* line style, so more than ten
  layers stay distinguishable (10 colours × 4 styles);
* the epoch axis has whole-epoch ticks; accuracy is a fraction on a fixed 0..1 axis and loss
  starts at 0, so figures are comparable and differences are not magnified by the axis range;
  flip ratios are on a log axis (labelled as such).

``flipnet plot RUN_OR_GROUP ... [--out DIR] [--labels A B ...] [--separate-seeds]`` calls it;
the trainer calls it at the end of a run to fill ``RUN/plots``.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from flipnet.utils import atomic_path

from .compare import read_metrics

__all__ = ["read_metrics", "plot_runs", "LINESTYLES"]

#: Data splits a curve can show, in drawing order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Line styles cycled (with the colours) for per-layer curves.
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.")


def _series(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[int(r["epoch"])] = float(v)
    return out


def group_series(runs: Sequence[Any], key: str) -> tuple[list[int], list[float], list[float | None]]:
    """Epochs, mean and sample std (``None`` where fewer than two runs have the epoch) of ``key``
    over the runs of a seed group."""
    per_run = [_series(r.rows, key) for r in runs]
    epochs = sorted({e for s in per_run for e in s})
    xs, mean, std = [], [], []
    for e in epochs:
        vals = [s[e] for s in per_run if e in s]
        xs.append(e)
        mean.append(statistics.fmean(vals))
        std.append(statistics.stdev(vals) if len(vals) > 1 else None)
    return xs, mean, std


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _draw(ax: Any, xs: list[int], mean: list[float], std: list[float | None], *, color: Any, style: Any,
          label: str, lw: float = 1.6) -> bool:
    """Mean line, plus a ±std band where defined. Returns whether something was drawn."""
    if not xs:
        return False
    ax.plot(xs, mean, linestyle=style, color=color, lw=lw, marker="o" if len(xs) < 30 else None, ms=3, label=label)
    bx = [x for x, s in zip(xs, std) if s is not None]
    if len(bx) >= 1:
        lo = [m - s for m, s in zip(mean, std) if s is not None]
        hi = [m + s for m, s in zip(mean, std) if s is not None]
        ax.fill_between(bx, lo, hi, color=color, alpha=0.18, lw=0)
    return True


def _epoch_axis(ax: Any, epochs: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs:
        lo, hi = min(epochs), max(epochs)
        ax.set_xlim(lo - 0.3, hi + 0.3)


def _legend(ax: Any, fontsize: float = 8) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=fontsize, frameon=False)


def _title(base: str, groups: Sequence[Any]) -> str:
    n = [len(g.runs) for g in groups]
    if len(groups) == 1:
        g = groups[0]
        return f"{base} — {g.label}" + (f" (mean ± std over {n[0]} seeds)" if n[0] > 1 else "")
    return base + (" (mean ± std over seeds)" if any(k > 1 for k in n) else "")


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    *,
    merge_seeds: bool = True,
    prefix: str = "",
    acc_min: float = 0.0,
    splits: Sequence[str] = ("train", "val", "test"),
) -> list[Path]:
    """Draw ``loss.png``, ``accuracy.png`` and ``flip_ratio.png`` for runs, seed groups or an overlay.

    Args:
        run_dirs: run folders (each with a ``metrics.jsonl``) and/or group folders (whose
            sub-folders are run folders).
        out_dir: where the PNGs go; default ``PATH/plots`` for one path, ``./plots`` for several.
        labels: one label per curve (per seed group; or per path, which then keeps every run its
            own curve); default: the differing hyperparameters.
        merge_seeds: draw runs that differ only in the seed as one mean ± std band (default).
        prefix: put before each file name (``prefix="gallery_"`` writes ``gallery_loss.png``, ...).
        acc_min: lower end of the accuracy axis (default 0: the full 0..1 range); a value above 0
            zooms in, and the axis label and a note in the corner say where the axis starts.
        splits: which of ``train`` (dashed), ``val`` (solid), ``test`` (dotted) the loss and
            accuracy figures show.

    Returns:
        The paths written. ``flip_ratio.png`` is drawn only when some run logged flip ratios;
        with one curve it also shows each binary layer (mean over seeds).

    Raises:
        CheckpointError: a path is neither a run folder nor a group folder.
        ValueError: no paths, or a label count that fits neither the curves nor the paths.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .compare import load_groups

    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    if isinstance(acc_min, bool) or not isinstance(acc_min, (int, float)) or not 0.0 <= acc_min < 1.0:
        raise ValueError(f"acc_min must be a number in [0, 1), got {acc_min!r}")
    if not splits or any(sp not in SPLITS for sp in splits):
        raise ValueError(f"splits must be some of {', '.join(SPLITS)}, got {list(splits)}")
    if "/" in prefix or "\\" in prefix or prefix in (".", ".."):
        raise ValueError(f"prefix must be a file-name prefix without folders, got {prefix!r}")
    groups, _ = load_groups(run_dirs, labels, merge_seeds)
    paths = [Path(r) for r in run_dirs]
    out = Path(out_dir) if out_dir is not None else (paths[0] / "plots" if len(paths) == 1 else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    written: list[Path] = []
    single = len(groups) == 1
    all_epochs = sorted({int(r["epoch"]) for g in groups for run in g.runs for r in run.rows})
    styles = {"train": "--", "val": "-", "test": ":"}
    shown = [(sp, styles[sp]) for sp in SPLITS if sp in splits]

    for fname, title, ylabel, metric in (
        ("loss.png", "Loss", "cross-entropy loss", "loss"),
        ("accuracy.png", "Accuracy", "accuracy (fraction correct)", "acc"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        top = 0.0
        for i, g in enumerate(groups):
            color = colors[i % len(colors)]
            for split, style in shown:
                xs, mean, std = group_series(g.runs, f"{split}_{metric}")
                label = split if single else f"{g.label} ({split})"
                if _draw(ax, xs, mean, std, color=color if not single else colors[["train", "val", "test"].index(split)],
                         style=style, label=label):
                    top = max([top] + [m + (s or 0.0) for m, s in zip(mean, std)])
        _epoch_axis(ax, all_epochs)
        ax.set_ylabel(ylabel)
        if metric == "acc":
            ax.set_ylim(float(acc_min), 1.0)
            if acc_min > 0:
                ax.set_ylabel(f"{ylabel}; axis starts at {acc_min:g}")
                ax.text(0.01, 0.01, f"zoomed: accuracy axis from {acc_min:g} to 1", transform=ax.transAxes,
                        fontsize=7, color="0.35", va="bottom")
        else:
            ax.set_ylim(0.0, top * 1.05 if top > 0 else 1.0)
        ax.set_title(_title(title, groups), fontsize=10)
        ax.grid(True, alpha=0.3)
        _legend(ax)
        _save(fig, out / (prefix + fname))
        plt.close(fig)
        written.append(out / (prefix + fname))

    if any(_series(run.rows, "flip_ratio") for g in groups for run in g.runs):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        positive = False
        for i, g in enumerate(groups):
            xs, mean, std = group_series(g.runs, "flip_ratio")
            positive |= any(y > 0 for y in mean)
            _draw(ax, xs, mean, std, color="black" if single else colors[i % len(colors)], style="-",
                  label="all binary layers" if single else g.label, lw=2.2)
        if single:
            g = groups[0]
            layer_keys: list[str] = []
            for run in g.runs:
                for r in run.rows:
                    for k in r:
                        if k.startswith("flip_ratio/") and k not in layer_keys:
                            layer_keys.append(k)
            for j, key in enumerate(layer_keys):
                xs, mean, std = group_series(g.runs, key)
                positive |= any(y > 0 for y in mean)
                _draw(ax, xs, mean, [None] * len(xs), color=colors[j % len(colors)],
                      style=LINESTYLES[(j // len(colors)) % len(LINESTYLES)], label=key.split("/", 1)[1], lw=1.0)
        if positive:
            ax.set_yscale("log")
            ax.set_ylabel("flips per weight per step (log scale)")
        else:
            ax.set_ylabel("flips per weight per step")
        _epoch_axis(ax, all_epochs)
        ax.set_title(_title("Flip ratio", groups), fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        _legend(ax, fontsize=7)
        _save(fig, out / (prefix + "flip_ratio.png"))
        plt.close(fig)
        written.append(out / (prefix + "flip_ratio.png"))
    return written
