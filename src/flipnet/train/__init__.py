"""Training: recipes (:func:`load_config`), the :class:`Trainer`, checkpoints, DDP and plots.

>>> from flipnet.train import Trainer, load_config
>>> config = load_config("digits_bop", ["train.epochs=5"])
>>> metrics = Trainer(config).fit()

See ``docs/training.md`` for the command line and the run folder, ``docs/recipes.md`` for every
recipe key.
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import (
    DEFAULT_RECIPE,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_recipes,
    load_config,
    recipe_path,
)
from .loop import (
    Callback,
    MetricsLogger,
    Trainer,
    TrainingDiverged,
    build_model,
    evaluate,
    load_data,
    load_run,
    recipe_model,
)
from .plots import plot_runs, read_metrics

__all__ = [
    "DEFAULT_RECIPE",
    "Callback",
    "Config",
    "DataConfig",
    "MetricsLogger",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "ScheduleConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "apply_overrides",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "evaluate",
    "list_recipes",
    "load_checkpoint",
    "load_config",
    "load_data",
    "load_run",
    "plot_runs",
    "read_metrics",
    "recipe_model",
    "recipe_path",
    "resolve_checkpoint",
    "save_checkpoint",
]
