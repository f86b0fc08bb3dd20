r"""Many runs at once: several seeds (or hyperparameter values) of one recipe trained together.

``flipnet train RECIPE seeds=0,1,2`` calls :func:`train_seeds`; :func:`train_sweep` trains
configurations that differ only in hyperparameter values. Both go through :func:`train_group`,
which builds one :class:`~flipnet.train.Trainer` whose members are the runs: the vectorised
ensemble (:mod:`flipnet.train.ensemble`) is its step function, so callbacks, resume, progress,
divergence checks, plots and Ctrl-C are those of a single run. Models the ensemble cannot widen
are trained one after the other (``vectorize=False``, or ``"auto"`` with a warning).

Each member writes a normal run folder ``GROUP/<label>`` (``flipnet eval`` / ``export`` accept it);
``GROUP`` holds ``seeds.csv``, ``metrics.csv``, ``summary.json`` (mean ± std of the test accuracy
at the last and at the best validation epoch) and overlay plots. ``flipnet train --resume GROUP``
continues a multi-seed run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from flipnet.errors import ConfigError

from . import build
from .callbacks import summarize, write_group_files
from .config import Config
from .ensemble import NotVectorizable, SeedEnsemble, SeedOptimizer
from .loop import Trainer

__all__ = [
    "SeedEnsemble",
    "SeedOptimizer",
    "NotVectorizable",
    "train_seeds",
    "train_sweep",
    "train_group",
    "sweep_configs",
    "summarize",
]


# ----------------------------------------------------------------------------- configs
_FREE_KEYS = ("seed", "seeds", "output", "description", "name")


def _structure(config: Any) -> dict[str, Any]:
    """The parts of a config that members of one group must share."""
    from .config import config_to_dict

    d = config_to_dict(config)
    for k in _FREE_KEYS:
        d.pop(k, None)
    optim = d.get("optim", {})
    for k in ("binary_kwargs", "real_kwargs", "schedules", "weight_clip"):
        optim.pop(k, None)
    return d


def sweep_configs(config: Any, key: str, values: Sequence[Any]) -> list[Any]:
    """Copies of ``config`` with ``key`` (a dotted recipe key) set to each of ``values``.

    Example:
        >>> sweep_configs(cfg, "optim.binary_kwargs.gamma", [1e-4, 1e-3])
    """
    from .config import apply_overrides, config_from_dict, config_to_dict

    if not values:
        raise ConfigError(f"sweep over {key} needs at least one value")
    raw = config_to_dict(config)
    out = []
    for v in values:
        text = json.dumps(v) if not isinstance(v, str) else v
        out.append(config_from_dict(apply_overrides(raw, [f"{key}={text}"])))
    return out


# ----------------------------------------------------------------------------- results
def _member_label(config: Any, sweep_key: str | None) -> str:
    label = f"seed_{config.seed}"
    if sweep_key is not None:
        node: Any = config
        for part in sweep_key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        label = f"{sweep_key.split('.')[-1]}={node}-{label}"
    return label


def train_group(
    configs: Sequence[Config],
    *,
    vectorize: bool | str = "auto",
    run_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    verbose: bool = True,
    resume: bool = False,
    force: bool = False,
    _group_config: Config | None = None,
) -> list[dict[str, Any]]:
    """Train several configurations that share data, model and schedule lengths, in one process.

    Members may differ in ``seed`` and in optimizer hyperparameter values (``optim.binary_kwargs``,
    ``optim.real_kwargs``, ``optim.schedules``, ``optim.weight_clip``); everything else must be
    equal.

    Args:
        configs: validated recipes (:func:`flipnet.train.load_config`).
        vectorize: ``True``: one trainer over all members (one wide network); ``False``: one
            trainer per member, one after the other; ``"auto"``: vectorise when the model allows
            it, else one after the other (with a warning).
        run_dir: the group's folder (default from ``configs[0].output``); member ``i`` writes a
            normal run folder ``run_dir/<label>``.
        labels: member folder names (default ``seed_<seed>``).
        verbose: print the mean ± std at the end.
        resume: continue the group in ``run_dir`` (vectorised groups); ``force``: see
            :class:`~flipnet.train.Trainer`.

    Returns:
        One dict per member (:meth:`flipnet.train.Trainer.results`): ``label``, ``seed``,
        ``run_dir``, the last epoch's ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``,
        and ``best_epoch``, ``best_val_acc``, ``test_acc_at_best`` (the epoch chosen on
        validation data), ``epochs``, ``time_s``.
    """
    if not configs:
        raise ConfigError("train_group needs at least one configuration")
    ref = _structure(configs[0])
    for i, c in enumerate(configs[1:], start=1):
        if _structure(c) != ref:
            raise ConfigError(
                f"configuration {i} differs from the first in more than seed and optimizer hyperparameters; "
                "runs trained together must share data, model, batch size, epochs and optimizer types"
            )
    labels = list(labels) if labels is not None else [f"seed_{c.seed}" for c in configs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"member labels must be distinct, got {labels}; use distinct seeds")
    if vectorize not in (True, False, "auto"):
        raise ConfigError(f"vectorize must be true, false or auto, got {vectorize!r}")
    if configs[0].train.track_signs:
        raise ConfigError("train.track_signs records the signs of one run; with several seeds train each seed "
                          "on its own (flipnet train RECIPE seed=N) or set train.track_signs=false")
    if resume and run_dir is None:
        raise ConfigError("resume=True needs run_dir, the group folder to continue")
    started = time.perf_counter()
    results = None
    if vectorize is not False:
        try:
            trainer = Trainer.from_configs(configs, labels, group_dir=run_dir, resume=run_dir if resume else None,
                                           force=force, group_config=_group_config or configs[0])
        except NotVectorizable as e:
            if vectorize is True:
                raise
            warnings.warn(f"{e}; training the runs one after the other", stacklevel=2)
        else:
            trainer.fit()
            results, mode, group_dir = trainer.results(), "vectorized", trainer.group_dir
    if results is None:
        if resume:
            raise ConfigError("only vectorised groups can be resumed together; resume each member folder with flipnet train --resume")
        if run_dir is not None:
            group_dir = Path(run_dir)
            build.check_new_run_dir(group_dir, "group", "choose another group folder")
        else:
            group_dir = build.new_run_dir(configs[0].output, configs[0].name, kind="group")
        build.make_run_dir(group_dir, "group")
        from flipnet.utils import atomic_write_text

        from .config import dump_config

        atomic_write_text(group_dir / "config.yaml", dump_config(_group_config or configs[0]))
        results, rows = _train_sequential(configs, labels, group_dir)
        write_group_files(group_dir, results, rows, {"name": configs[0].name, "mode": "sequential",
                                                     "wall_time_s": time.perf_counter() - started})
        mode = "sequential"
    if verbose:
        s = summarize(results)
        if "test_acc" in s:
            print(f"{group_dir}: test_acc {s['test_acc']['mean']:.4f} ± {s['test_acc']['std']:.4f} over {len(results)} runs "
                  f"({mode}, {time.perf_counter() - started:.1f}s)", flush=True)
    return results


def _train_sequential(configs: Sequence[Config], labels: list[str], group_dir: Path) -> tuple[list[dict], list[list[dict]]]:
    results, rows = [], []
    for cfg, label in zip(configs, labels):
        cfg = copy.deepcopy(cfg)
        cfg.seeds = None
        cfg.output = dataclasses.replace(cfg.output, dir=str(group_dir), name=label)
        trainer = Trainer.from_config(cfg)
        trainer.fit()
        (result,) = trainer.results()
        results.append({**result, "label": label})
        rows.append(list(trainer.logger.rows) if trainer.logger else [])
    return results, rows


def train_seeds(config: Any, seeds: Sequence[int] | None = None, *, vectorize: bool | str = "auto",
                verbose: bool = True, run_dir: str | Path | None = None, resume: bool = False,
                force: bool = False) -> list[dict[str, Any]]:
    """Train ``config`` once per seed, all seeds together in one process.

    Args:
        config: a validated recipe (:func:`flipnet.train.load_config`).
        seeds: the seeds; default ``config.seeds``, else ``[config.seed]``.
        vectorize, verbose, run_dir, resume, force: see :func:`train_group`. The group folder's
            ``config.yaml`` is ``config`` with ``seeds``, so ``flipnet train --resume GROUP``
            continues all seeds.

    Returns:
        One result dict per seed (see :func:`train_group`); ``runs/<name>/seeds.csv`` and
        ``summary.json`` hold the same rows and their mean ± std.

    Example:
        >>> from flipnet.train import load_config
        >>> rows = train_seeds(load_config("digits_bop", ["train.epochs=3"]), [0, 1, 2])
        >>> [r["test_acc"] for r in rows]
    """
    seeds = list(seeds if seeds is not None else (config.seeds or [config.seed]))
    if not seeds:
        raise ConfigError("seeds must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    configs = []
    for sd in seeds:
        if isinstance(sd, bool) or not isinstance(sd, int):
            raise ConfigError(f"seeds must be integers, got {sd!r}")
        c = copy.deepcopy(config)
        c.seed = int(sd)
        c.seeds = None
        configs.append(c)
    group_config = copy.deepcopy(config)
    group_config.seeds = [int(sd) for sd in seeds]
    return train_group(configs, vectorize=vectorize, verbose=verbose, run_dir=run_dir, resume=resume, force=force,
                       _group_config=group_config)


def train_sweep(config: Any, key: str, values: Sequence[Any], seeds: Sequence[int] | None = None, *,
                vectorize: bool | str = "auto", verbose: bool = True) -> list[dict[str, Any]]:
    """Train ``config`` for each value of one hyperparameter (× each seed), all together.

    Args:
        config: a validated recipe.
        key: dotted recipe key of an optimizer hyperparameter, e.g. ``optim.binary_kwargs.gamma``.
        values: the values to try.
        seeds: seeds per value (default ``config.seeds`` or ``[config.seed]``).

    Returns:
        One result dict per (value, seed), labelled ``<last key part>=<value>-seed_<seed>``, with
        the swept ``value`` added.
    """
    seeds = list(seeds if seeds is not None else (config.seeds or [config.seed]))
    configs, labels = [], []
    for cfg in sweep_configs(config, key, values):
        for sd in seeds:
            c = copy.deepcopy(cfg)
            c.seed = int(sd)
            c.seeds = None
            configs.append(c)
            labels.append(_member_label(c, key))
    vals = [v for v in values for _ in seeds]
    results = train_group(configs, vectorize=vectorize, labels=labels, verbose=verbose)
    for r, v in zip(results, vals):
        r["value"] = v
    return results
