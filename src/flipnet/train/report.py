"""What a run reports: the header, the per-epoch line, the final line and the result rows.

The test accuracy is reported at the last epoch and at the epoch chosen on the validation split
(``best.pt``), the same way for one run and for several; it is never used to choose anything.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import TYPE_CHECKING, Any, Iterable

from .callbacks import write_group_files, write_summary

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

__all__ = ["HYPERPARAM_KEYS", "hyperparameter_values", "start_line", "epoch_line", "final_line", "results", "finish_files"]

#: Param-group keys logged each epoch (per route) when present: learning rate, Bop's γ and τ,
#: CEMA's σ/α, momentum. Keys that have a schedule in the recipe are logged too.
HYPERPARAM_KEYS = ("lr", "gamma", "threshold", "tau", "sigma", "alpha", "beta", "momentum")


def hyperparameter_values(optimizer: Any, scheduled: Iterable[tuple[str | None, str]] = ()) -> dict[str, float]:
    """Current hyper-parameter values of ``optimizer``, keyed ``<route>/<key>`` (first group per route).

    A flip optimizer's route logs its declared hyper-parameters (Bop: γ and τ; CEMA: α, γ, ...),
    never the router's ``lr`` placeholder; other routes log the keys of :data:`HYPERPARAM_KEYS`
    they have; ``scheduled`` ``(route, key)`` pairs (route ``None``: every route) are always logged.
    """
    routes = getattr(optimizer, "optimizers", None)
    scheduled = set(scheduled)
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        route = g.get("route", "all")
        leaf = routes.get(route) if isinstance(routes, dict) else None
        declared = getattr(leaf, "hyperparameters", None)
        keys = (set(declared) if declared else set(HYPERPARAM_KEYS)) | {k for r, k in scheduled if r in (None, route)}
        for k in sorted(keys):
            name = f"{route}/{k}"
            if k in g and name not in out:
                v = g[k]
                if hasattr(v, "numel") and v.numel() == 1:  # a 0-d tensor (CUDA graphs hold them)
                    out[name] = float(v.item())
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[name] = float(v)
    return out



def start_line(self: Trainer) -> str:
    """The run header: model, data sizes, optimizers, device, threads (and why), resume point, folder."""
    c, d = self.config, self.data
    sizes = f"{len(d.train_y)} train / " + (f"{len(d.val_y)} validation / " if self.val_loader else "") + f"{len(d.test_y)} test"
    where = f"{self.device}" + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
    runs = f"{len(self.members)} runs ({', '.join(m.label for m in self.members)}) of " if len(self.members) > 1 else ""
    resumed = (f", resuming after epoch {self.epoch}" + (f" step {self.step}" if self.batch_in_epoch else "")) if self.epoch or self.step else ""
    line = (f"training {runs}{c.model.name} on {c.data.name} ({sizes}, {self.steps_per_epoch} steps per epoch) with "
            f"binary={c.optim.binary} real={c.optim.real} on {where}, {self.threads} thread{'s' if self.threads > 1 else ''} "
            f"({self._threads_reason}), precision {self.precision.name}{resumed}; run folder {self.group_dir or self.run_dir}")
    if self.val_loader is None:
        line += ("\nno validation split (data.val_size is 0 or unset): best.pt is the last evaluated epoch; "
                 "set data.val_size to select it on held-out training data")
    return line


def epoch_line(self: Trainer, elapsed: float) -> str:
    """One line per epoch (several members: their test accuracies side by side)."""
    if len(self.members) > 1:
        accs = " ".join(f"{m.last_row['test_acc']:.4f}" if m.last_row.get("test_acc") is not None
                        else f"(train {m.last_row['train_acc']:.4f})" for m in self.members)
        return f"epoch {self.epoch}/{self.config.train.epochs} | {len(self.members)} runs | test acc {accs} | {elapsed:.1f}s"
    row = self.members[0].last_row
    parts = [f"epoch {row['epoch']}/{self.config.train.epochs}", f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"]
    if row.get("val_acc") is not None:
        parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}")
    if row.get("test_acc") is not None:
        parts.append(f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")
    if "flip_ratio" in row:
        parts.append(f"flips {row['flip_ratio']:.3g}")
    hp = [f"{k}={v:.3g}" for k, v in row.items() if "/" in k and not k.startswith("flip_ratio/")]
    return " | ".join([*parts, *([" ".join(hp)] if hp else []), f"{row['time_s']:.1f}s"])

def results(self: Trainer) -> list[dict[str, Any]]:
    """One summary row per member: last-epoch and best-validation-epoch numbers, seed, folder."""
    out = []
    for m in self.members:
        r = m.last_row
        out.append({"label": m.label, "seed": m.config.seed, "epochs": r.get("epoch"), "train_loss": r.get("train_loss"),
                    "train_acc": r.get("train_acc"), "test_loss": r.get("test_loss"), "test_acc": r.get("test_acc"),
                    "best_epoch": m.best_epoch or None, "best_val_acc": m.best if math.isfinite(m.best) else None,
                    "test_acc_at_best": m.test_at_best, "flip_ratio": r.get("flip_ratio"), "time_s": m.time_s,
                    "device": str(self.device), "threads": self.threads, "run_dir": str(m.run_dir)})
    return out

def final_line(self: Trainer, epochs: int, seconds: float) -> str:
    """The last line: test accuracy at the last and at the best validation epoch (mean ± std for several runs)."""
    res = results(self)
    if len(res) == 1:
        r = res[0]
        at_best = (f", {r['test_acc_at_best']:.4f} at the best validation epoch {r['best_epoch']} (val {r['best_val_acc']:.4f})"
                   if r["best_val_acc"] is not None and r["test_acc_at_best"] is not None else " (no validation split)")
        acc = f"test accuracy {r['test_acc']:.4f} at the last epoch{at_best}; " if r["test_acc"] is not None else ""
        return f"done: {epochs} epochs in {seconds:.1f} s; {acc}run folder {self.run_dir}"

    def stat(key: str) -> str:
        v = [r[key] for r in res if r[key] is not None]
        return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}" if v else "n/a"

    return (f"done: {epochs} epochs of {len(res)} runs in {seconds:.1f} s; test accuracy {stat('test_acc')} at the last epoch, "
            f"{stat('test_acc_at_best')} at the best validation epoch; group folder {self.group_dir}")


def finish_files(self: Trainer, seconds: float) -> None:
    """At the end (finished, interrupted or diverged), rank 0: close TensorBoard, write each
    member's ``summary.json`` (and the group files), draw the plots. Plots never fail a run."""
    if not self.is_main:
        return
    for m in self.members:
        if m.tb is not None:
            m.tb.close()
    if not any(m.logger and m.logger.rows for m in self.members):
        return
    extra = {"threads": self.threads, "threads_reason": self._threads_reason, "precision": self.precision.name,
             "precision_reason": self.precision.reason, "wall_time_s": seconds}
    rows = results(self)
    try:
        for m, r in zip(self.members, rows):
            write_summary(m.run_dir / "summary.json", {"name": m.config.name, **r, **extra})
        if self.group_dir is not None:
            write_group_files(self.group_dir, rows, [m.logger.rows if m.logger else [] for m in self.members],
                              {"name": self.config.name, "mode": "vectorized", **extra})
    except OSError as e:
        warnings.warn(f"could not write the run summary: {e}", stacklevel=2)
    if self.config.train.plots:
        from .plots import plot_runs

        try:  # never lose a run over a plot
            for m in self.members:
                if m.logger and m.logger.rows:
                    plot_runs([m.run_dir], m.run_dir / "plots")
            if self.group_dir is not None:
                plot_runs([self.group_dir], self.group_dir / "plots")  # seeds as mean ± std bands, labelled by what differs
        except (OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"could not draw the plots of {self.group_dir or self.run_dir}: {e}", stacklevel=2)
