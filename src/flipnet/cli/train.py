"""The ``train``, ``eval`` and ``recipes`` sub-commands of ``flipnet`` (``plot`` is in :mod:`flipnet.cli.results`).

::

    flipnet train [RECIPE] [key.sub=value ...] [--resume RUN [--force]] [--out DIR]
    flipnet eval RUN [--checkpoint best|last] [--data.root DIR] [--device DEV]
    flipnet recipes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flipnet.errors import ConfigError

__all__ = ["register", "cmd_train", "cmd_eval", "cmd_recipes"]


def register(subparsers: Any) -> None:
    """Add the training sub-commands to the ``flipnet`` parser's ``subparsers``."""
    p = subparsers.add_parser(
        "train",
        help="train a model from a recipe (default: digits_bop)",
        description=(
            "Train from a recipe (a shipped name, see `flipnet recipes`, or a YAML path) with optional "
            "key.sub=value overrides, e.g. `flipnet train digits_bop train.epochs=5 optim.binary_kwargs.gamma=1e-3`. "
            "Under torchrun it trains with DistributedDataParallel."
        ),
    )
    p.add_argument("args", nargs="*", metavar="RECIPE|KEY=VALUE",
                   help="recipe name or path (optional, first), then key.sub=value overrides")
    p.add_argument("--resume", metavar="RUN", help="continue the run (or multi-seed group) in this folder from checkpoints/last.pt")
    p.add_argument("--force", action="store_true",
                   help="with --resume: accept overrides that change the training trajectory (seed, batch size, epochs, ...)")
    p.add_argument("--out", metavar="DIR", help="parent folder of the run folder (same as output.dir=DIR)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="evaluate a trained run on its test set",
                              description="Evaluate the model of a run folder (or a checkpoint file) on the test set.")
    p.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    p.add_argument("--data.root", dest="data_root", metavar="DIR", help="data root, when the data moved since training")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="evaluation batch size (default: the recipe's)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    p.set_defaults(func=cmd_recipes)


def _split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    recipe: str | None = None
    rest = list(args)
    if rest and "=" not in rest[0]:
        recipe = rest.pop(0)
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise ConfigError(
            f"expected key.sub=value overrides after the recipe, got {' '.join(bad)!r}; "
            "give one recipe, then overrides such as train.epochs=5"
        )
    return recipe, rest


def cmd_train(ns: argparse.Namespace) -> int:
    """``flipnet train``: build the config, then train one seed, several seeds, or resume."""
    from flipnet.train.config import load_config
    from flipnet.train.distributed import cleanup_distributed, env_world_size

    recipe, overrides = _split_train_args(ns.args)
    if ns.out:
        # Quoted (JSON is YAML): a folder named 2024, yes or null stays a string.
        overrides.append(f"output.dir={json.dumps(ns.out)}")
    if ns.force and not ns.resume:
        raise ConfigError("--force only applies to --resume RUN")
    if ns.resume:
        if recipe is not None:
            raise ConfigError("give either a recipe or --resume RUN (a resumed run uses its own config.yaml), not both")
        given = Path(ns.resume)
        folder = (given.parent.parent if given.parent.name == "checkpoints" else given.parent) if given.is_file() else given
        if ns.out:
            raise ConfigError("--out cannot move a resumed run; it continues in its own folder")
        cfg_file = folder / "config.yaml"  # RUN, or RUN/checkpoints/last.pt (as Trainer(resume=...) takes)
        if not cfg_file.is_file():
            from flipnet.train.checkpoint import inner_runs_hint

            raise ConfigError(f"{ns.resume} has no config.yaml; --resume needs a run folder written by flipnet train"
                              f".{inner_runs_hint(ns.resume)}")
        config = load_config(cfg_file, overrides)
        if config.seeds is not None and len(config.seeds) > 1:
            from flipnet.train.multi import train_seeds

            results = train_seeds(config, list(config.seeds), vectorize=True, run_dir=ns.resume, resume=True, force=ns.force)
            _print_seed_summary(list(config.seeds), results)
            return 0
        return _fit(config, resume=ns.resume, force=ns.force, cleanup=cleanup_distributed)
    config = load_config(recipe, overrides)
    seeds = config.seeds
    if seeds is not None and len(seeds) > 1:
        if env_world_size() > 1:
            raise ConfigError("several seeds (seeds=[...]) cannot be combined with torchrun; train one seed per launch")
        from flipnet.train.multi import train_seeds

        results = train_seeds(config, list(seeds))
        _print_seed_summary(seeds, results)
        return 0
    return _fit(config, resume=None, force=False, cleanup=cleanup_distributed)


def _fit(config: Any, *, resume: str | None, force: bool, cleanup: Any) -> int:
    """One run (the exit status of Ctrl-C and SIGTERM is :func:`flipnet.cli.main`'s)."""
    from flipnet.train.loop import Trainer

    callbacks = []
    if config.train.track_signs:
        from flipnet.analysis.flips import SignTracker

        callbacks.append(SignTracker())
    try:
        Trainer.from_config(config, callbacks, resume=resume, force=force).fit()
    finally:
        cleanup()
    return 0


def _print_seed_summary(seeds: list[int], results: list[dict[str, Any]]) -> None:
    """One line per seed (``train_seeds`` itself prints the mean ± std)."""
    for seed, row in zip(seeds, results):
        acc = row.get("test_acc") if isinstance(row, dict) else None
        where = row.get("run_dir", "") if isinstance(row, dict) else ""
        text = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
        print(f"seed {seed}: test accuracy {text}" + (f" ({where})" if where else ""))


def cmd_eval(ns: argparse.Namespace) -> int:
    """``flipnet eval``: load a run's checkpoint and print its test accuracy."""
    from flipnet.train.build import build_data, build_loader, model_from_checkpoint, resolve_device, select_precision
    from flipnet.train.checkpoint import load_checkpoint, resolve_checkpoint
    from flipnet.train.evaluation import evaluate

    if ns.batch_size is not None and ns.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {ns.batch_size}")
    device = resolve_device(ns.device, option="--device ")
    path = resolve_checkpoint(ns.run, ns.checkpoint)
    ckpt = load_checkpoint(path, map_location=device)
    config, model = model_from_checkpoint(ckpt, path, ns.run, device)
    if ns.data_root is not None:
        config.data.root = ns.data_root
    bundle = build_data(config)
    loader = build_loader(bundle, "test", ns.batch_size or config.data.eval_batch_size, train=False,
                          device=device, seed=config.seed)
    # the precision the run trained (and was evaluated) in, not what train.precision=auto means here
    stored = (ckpt.get("meta") or {}).get("precision")
    precision = select_precision(stored or getattr(config.train, "precision", config.train.amp), device, model)
    precision.apply(model)
    result = evaluate(model, loader, device, precision.amp_dtype)
    epoch = ckpt.get("epoch")
    print(f"test accuracy {result['acc']:.4f} (loss {result['loss']:.4f}, {result['n']} examples; "
          f"{path}, epoch {epoch})")
    return 0


def cmd_recipes(ns: argparse.Namespace) -> int:
    """``flipnet recipes``: one line per shipped recipe."""
    from flipnet.train.config import DEFAULT_RECIPE, list_recipes

    recipes = list_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, description in recipes.items():
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<{width}}  {description}{mark}")
    return 0
