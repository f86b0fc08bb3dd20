"""Hooks into the trainer and the trainer's own loggers: metrics files, TensorBoard, progress bar.

This module imports only the standard library at load time, so that
``from flipnet.train.callbacks import Callback`` (e.g. by :mod:`flipnet.analysis.flips`) costs
nothing and creates no import cycle.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import statistics
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from flipnet.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

__all__ = ["Callback", "MetricsLogger", "TensorBoardLogger", "ProgressBar", "StopSignals", "Stopped", "summarize", "write_summary",
           "write_group_files"]


class Callback:
    """Hooks into :class:`~flipnet.train.Trainer`. Override the ones you need; each receives the trainer.

    The trainer attributes a callback may read: ``model`` (unwrapped), ``optimizer``,
    ``config``, ``run_dir``, ``epoch`` (epochs completed), ``step`` (optimizer steps taken),
    ``device``, ``is_main`` (rank 0: the process that may write files), ``members`` (the runs
    trained together; one unless ``seeds=[...]``). With several members, ``model``,
    ``optimizer``, ``config`` and ``run_dir`` are those of the first member, except in
    :meth:`on_epoch_end`, which is called once per member with that member's.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once, after everything is built (and restored, when resuming)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """Called after every optimizer step. Keep it cheap: no host synchronisation."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Called after each epoch's evaluation, before logging; keys added to ``metrics`` are logged."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once when training stops: finished, interrupted (Ctrl-C, SIGTERM) or diverged."""


def _write_error(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write {path} ({e.strerror or e}); free disk space or make the folder writable, "
        "then continue with flipnet train --resume (the last checkpoint written is kept)"
    )


def read_rows_strict(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a line torn by a crash (the last, unterminated one) is skipped.

    Raises:
        CheckpointError: any other line is not a JSON row (the file is damaged).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the run's history cannot be continued") from None
    lines = text.split("\n")
    rows: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("epoch"), int)):
            if i == len(lines) and not text.endswith("\n"):
                continue  # torn while appending: that epoch is re-trained
            raise CheckpointError(
                f"{path} is damaged at line {i} (not a metrics row); repair or remove that line, "
                "or start a new run: resuming would lose the run's history"
            )
        rows[row["epoch"]] = row  # a re-logged epoch: the last row wins
    return [rows[e] for e in sorted(rows)]


class MetricsLogger:
    """Per-epoch rows to ``metrics.jsonl`` (appended, flushed and fsynced per row) and
    ``metrics.csv`` (rewritten atomically each epoch; per-layer flip ratios only in the JSONL).

    Args:
        run_dir: the run folder.
        keep_until_epoch: resuming after this epoch: keep the logged rows up to it (``None``: a
            new run, start empty).

    Raises:
        CheckpointError: resuming and ``metrics.jsonl`` is missing, damaged or lacks epochs
            ``1..keep_until_epoch``.
    """

    def __init__(self, run_dir: Path, keep_until_epoch: int | None = None) -> None:
        from flipnet.utils import atomic_write_text

        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        try:
            if keep_until_epoch is not None and keep_until_epoch > 0:
                if not self.jsonl.is_file():
                    raise CheckpointError(f"{self.jsonl} is missing; the run's history up to epoch {keep_until_epoch} is lost")
                self.rows = [r for r in read_rows_strict(self.jsonl) if r["epoch"] <= keep_until_epoch]
                missing = sorted(set(range(1, keep_until_epoch + 1)) - {r["epoch"] for r in self.rows})
                if missing:
                    raise CheckpointError(
                        f"{self.jsonl} lacks epoch(s) {', '.join(map(str, missing[:5]))} of the checkpoint's "
                        f"{keep_until_epoch}; it is damaged, resuming would lose the run's history"
                    )
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
            self._write_csv()
        except OSError as e:
            raise _write_error(self.jsonl, e) from None

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row to both files."""
        self.rows.append(row)
        try:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._write_csv()
        except OSError as e:
            raise _write_error(self.jsonl, e) from None

    def _write_csv(self) -> None:
        from flipnet.utils import atomic_write_text

        columns: list[str] = []
        for r in self.rows:
            for k in r:
                if not k.startswith("flip_ratio/") and k not in columns:
                    columns.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        atomic_write_text(self.csv, buf.getvalue())


class TensorBoardLogger:
    """Scalar rows to ``RUN/tensorboard`` event files (``mode``: ``auto`` = when installed, ``True``, ``False``).

    Raises:
        ConfigError: ``mode`` is ``True`` and tensorboard is not installed.
    """

    def __init__(self, run_dir: Path, mode: bool | str, start_epoch: int = 0) -> None:
        self.writer: Any = None
        if mode is False:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode is True:
                from flipnet.errors import ConfigError

                raise ConfigError("train.tensorboard=true but tensorboard is not installed; pip install tensorboard") from None
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar:
    """A tqdm bar per epoch on stderr (``enabled``: ``auto`` = on a terminal); lines printed go above it."""

    def __init__(self, enabled: bool | str, is_main: bool = True) -> None:
        self.enabled = is_main and (sys.stderr.isatty() if enabled == "auto" else bool(enabled))
        self.bar: Any = None

    def start(self, total: int, initial: int, desc: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float | None = None) -> None:
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update(1)

    def postfix(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def write(self, msg: str) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Stopped(KeyboardInterrupt):
    """What :meth:`flipnet.train.Trainer.fit` raises after Ctrl-C or SIGTERM saved the run.

    A :class:`KeyboardInterrupt` (so ``except KeyboardInterrupt`` still catches it) that carries
    the signal: ``signum`` is ``signal.SIGINT``, ``signal.SIGTERM``, or ``None`` (a
    ``KeyboardInterrupt`` raised inside the loop). The ``flipnet`` command exits with
    ``128 + signum`` (130, 143) for one run and for several seeds alike.
    """

    def __init__(self, signum: int | None = None) -> None:
        super().__init__()
        self.signum = signum


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop at the end of the current step, so the saved
    state is consistent; a second signal stops at once (``KeyboardInterrupt`` inside the step: the
    last end-of-epoch checkpoint is kept). Handlers are installed in the main thread only.

    Attributes:
        requested: a stop was asked for; ``signal``: which signal (``None`` before).
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        if self.announce:
            print("\nstopping after this step (press Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main interpreter
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# summaries

#: Result keys :func:`summarize` averages by default: the last epoch's and the best validation
#: epoch's test accuracy, the best validation accuracy, and the last epoch's losses.
SUMMARY_KEYS = ("test_acc", "test_acc_at_best", "best_val_acc", "test_loss", "train_acc", "train_loss")


def summarize(results: Sequence[dict[str, Any]], keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, Any]:
    """Mean, sample standard deviation (n−1), min and max of ``keys`` over runs.

    A key missing (or ``None``) in some run is summarised over the others; ``std`` is 0.0 for
    a single run.
    """
    out: dict[str, Any] = {"n": len(results)}
    for k in keys:
        vals = [float(r[k]) for r in results if r.get(k) is not None and math.isfinite(float(r[k]))]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "min": min(vals), "max": max(vals)}
    return out


def write_summary(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    from flipnet.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    from flipnet.utils import atomic_write_text

    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns and not k.startswith("flip_ratio/"):
                columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def write_group_files(group_dir: Path, results: list[dict[str, Any]], member_rows: list[list[dict[str, Any]]],
                      extra: dict[str, Any]) -> dict[str, Any]:
    """The folder of runs trained together: ``seeds.csv`` (one result row per run), ``metrics.csv``
    (every run's epochs, with ``member`` and ``seed`` columns) and ``summary.json`` (mean ± std).

    Returns the summary written.
    """
    _write_table(group_dir / "seeds.csv", results)
    _write_table(group_dir / "metrics.csv", [{"member": r["label"], "seed": r["seed"], **row}
                                              for r, rows in zip(results, member_rows) for row in rows])
    summary = {**extra, "members": [r["label"] for r in results], "seeds": [r["seed"] for r in results],
               "device": results[0].get("device") if results else None, **summarize(results)}
    write_summary(group_dir / "summary.json", summary)
    return summary
