"""Training: recipes (:func:`load_config`), the :class:`Trainer`, checkpoints and multi-seed runs.

>>> from flipnet.train import Trainer, load_config
>>> config = load_config("digits_bop", ["train.epochs=5"])
>>> metrics = Trainer.from_config(config).fit()

The names below are the promises of this package; the modules hold the rest:
:mod:`~flipnet.train.build` (builders from a recipe), :mod:`~flipnet.train.callbacks`,
:mod:`~flipnet.train.loop`, :mod:`~flipnet.train.multi`, :mod:`~flipnet.train.ensemble`,
:mod:`~flipnet.train.fast`, :mod:`~flipnet.train.checkpoint`, :mod:`~flipnet.train.config`,
:mod:`~flipnet.train.distributed`, :mod:`~flipnet.train.plots`. Names are imported on first use,
so ``import flipnet.train.config`` (e.g. by ``flipnet recipes``) imports no torch.

See ``docs/training.md`` for the command line and the run folder, ``docs/recipes.md`` for every
recipe key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flipnet._lazy import lazy_names

_LAZY: dict[str, str] = {
    "Config": "flipnet.train.config",
    "load_config": "flipnet.train.config",
    "list_recipes": "flipnet.train.config",
    "Trainer": "flipnet.train.loop",
    "Callback": "flipnet.train.callbacks",
    "TrainingDiverged": "flipnet.errors",
    "load_run": "flipnet.train.build",
    "load_checkpoint": "flipnet.train.checkpoint",
    "save_checkpoint": "flipnet.train.checkpoint",
    "train_seeds": "flipnet.train.multi",
    "train_sweep": "flipnet.train.multi",
    "read_metrics": "flipnet.train.plots",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

if TYPE_CHECKING:  # pragma: no cover
    from flipnet.errors import TrainingDiverged

    from .build import load_run
    from .callbacks import Callback
    from .checkpoint import load_checkpoint, save_checkpoint
    from .config import Config, list_recipes, load_config
    from .loop import Trainer
    from .multi import train_seeds, train_sweep
    from .plots import read_metrics
