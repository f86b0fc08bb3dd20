"""Helpers shared by the run-based experiments (primary subnetworks, QBN sweep, scaling study)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from ..errors import CheckpointError

__all__ = ["read_run_config", "make_trainer", "evaluate_trainer", "run_accuracy"]


def read_run_config(run_dir: str | Path) -> Any:
    """The resolved recipe of a run folder (``RUN/config.yaml``) as a :class:`flipnet.train.Config`."""
    from ..train import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {run_dir} is not a run folder written by `flipnet train`")
    return load_config(path)


def make_trainer(config: Any, overrides: Sequence[str], out_dir: str | Path, name: str,
                 callbacks: Sequence[Any] = (), track_signs: bool = False) -> Any:
    """A :class:`flipnet.train.Trainer` for ``config`` plus ``overrides``, writing ``out_dir/name``.

    An earlier run folder of that name (from a previous invocation of the same experiment) is
    replaced. Sign tracking is off unless asked for; progress bars are off.
    """
    from ..train import Trainer, load_config

    out_dir = Path(out_dir)
    target = out_dir / name
    if target.is_dir() and ((target / "config.yaml").exists() or (target / "checkpoints").exists()):
        shutil.rmtree(target)
    cfg = load_config(config, [
        *overrides,
        f"output.dir={out_dir}",
        f"output.name={name}",
        f"train.track_signs={'true' if track_signs else 'false'}",
        "train.progress=false",
        "seeds=null",
    ])
    if track_signs:
        from .flips import SignTracker

        callbacks = [*callbacks, SignTracker()]
    return Trainer(cfg, callbacks=list(callbacks))


def evaluate_trainer(trainer: Any) -> float:
    """Test accuracy of the trainer's current model."""
    return float(trainer.evaluate()["acc"])


def run_accuracy(run_dir: str | Path) -> tuple[float, float]:
    """``(final, at best validation)`` test accuracy of a trained run, from its ``metrics.jsonl``.

    The second is the test accuracy at the epoch of best validation accuracy (the trainer's
    ``test_acc_at_best``), never the best test accuracy: results are selected on validation data.
    Without a validation split it is the final test accuracy.
    """
    from ..train import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("test_acc") is not None]
    if not rows:
        raise CheckpointError(f"{run_dir} has no evaluated epoch in its metrics; train it first")
    final = float(rows[-1]["test_acc"])
    at_best = rows[-1].get("test_acc_at_best")
    return final, final if at_best is None else float(at_best)
