"""The ``train``, ``eval``, ``recipes`` and ``plot`` sub-commands of ``flipnet``.

::

    flipnet train [RECIPE] [key.sub=value ...] [--resume RUN] [--out DIR]
    flipnet eval RUN [--checkpoint best|last] [--data.root DIR] [--device DEV]
    flipnet recipes
    flipnet plot RUN [RUN ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flipnet.errors import ConfigError

__all__ = ["register_cli", "cmd_train", "cmd_eval", "cmd_recipes", "cmd_plot"]


def register_cli(subparsers: Any) -> None:
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
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from checkpoints/last.pt")
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

    p = subparsers.add_parser("plot", help="draw loss, accuracy and flip-ratio curves of runs",
                              description="Draw loss.png, accuracy.png and flip_ratio.png; several runs are overlaid.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/plots for one run, ./plots for several)")
    p.set_defaults(func=cmd_plot)


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
    from flipnet.train.loop import Trainer

    recipe, overrides = _split_train_args(ns.args)
    if ns.out:
        # Quoted (JSON is YAML): a folder named 2024, yes or null stays a string.
        overrides.append(f"output.dir={json.dumps(ns.out)}")
    if ns.resume:
        if recipe is not None:
            raise ConfigError("give either a recipe or --resume RUN (a resumed run uses its own config.yaml), not both")
        if ns.out:
            raise ConfigError("--out cannot move a resumed run; it continues in its own folder")
        cfg_file = Path(ns.resume) / "config.yaml"
        if not cfg_file.is_file():
            raise ConfigError(f"{ns.resume} has no config.yaml; --resume needs a run folder written by flipnet train")
        config = load_config(cfg_file, overrides)
        if config.seeds is not None and len(config.seeds) > 1:
            raise ConfigError("--resume continues one run; several seeds (seeds=[...]) cannot be resumed together")
        try:
            Trainer(config, resume=ns.resume).fit()
        finally:
            cleanup_distributed()
        return 0
    config = load_config(recipe, overrides)
    seeds = config.seeds
    if seeds is not None and len(seeds) > 1:
        if env_world_size() > 1:
            raise ConfigError("several seeds (seeds=[...]) cannot be combined with torchrun; train one seed per launch")
        from flipnet.train.multi import train_seeds

        results = train_seeds(config, list(seeds))
        _print_seed_summary(seeds, results)
        return 0
    if seeds is not None:
        config.seed = seeds[0]
        config.seeds = None
    try:
        Trainer(config).fit()
    finally:
        cleanup_distributed()
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
    from flipnet.train.checkpoint import load_checkpoint, resolve_checkpoint
    from flipnet.train.distributed import DistInfo
    from flipnet.train.loop import _amp_dtype, _make_loader, evaluate, load_data, model_from_checkpoint, resolve_device

    if ns.batch_size is not None and ns.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {ns.batch_size}")
    device = resolve_device(ns.device, option="--device ")
    path = resolve_checkpoint(ns.run, ns.checkpoint)
    ckpt = load_checkpoint(path, map_location=device)
    config, model = model_from_checkpoint(ckpt, path, ns.run, device)
    if ns.data_root is not None:
        config.data.root = ns.data_root
    bundle = load_data(config)
    loader = _make_loader(bundle, "test", ns.batch_size or config.data.eval_batch_size, train=False,
                          device=device, augment=False, seed=config.seed, dist_info=DistInfo())
    result = evaluate(model, loader, device, _amp_dtype(config.train.amp, device))
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


def cmd_plot(ns: argparse.Namespace) -> int:
    """``flipnet plot``: draw the curves and print the files written."""
    from flipnet.train.plots import plot_runs

    for path in plot_runs(ns.runs, ns.out):
        print(path)
    return 0
