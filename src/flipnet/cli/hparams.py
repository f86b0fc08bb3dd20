"""``flipnet hparams``: latent-weight hyperparameters as a flip filter (Quist et al. 2023), and back.

::

    flipnet hparams --optimizer sgd --lr 0.1 --momentum 0.9 --weight-decay 1e-4 \\
        --schedule linear --epochs 256 --steps-per-epoch 2502 [--coupled] [--init-scale S] [--out PREFIX [--force]]
    flipnet hparams --alpha 1e-5 --gamma 0.1 [--lr 0.1] [--epochs ...] [--out PREFIX [--force]]
    flipnet hparams --recipe RECIPE [--train-size N] [--init-scale S] [--out PREFIX [--force]]

The first form prints the equivalent CEMA filter (α as a schedule, γ), its effective memory in
steps and epochs, a recipe snippet and the redundant magnitude hyperparameters; the second (α and
γ given) prints the SGD settings with that filter (the reverse mapping) and then the same report.
``--out PREFIX`` draws ``PREFIX_impulse.png``, ``PREFIX_frequency.png`` and ``PREFIX_memory.png``
(an existing file is an error, nothing is written, unless ``--force``). An option the chosen form
does not read (``--weight-decay`` with ``--alpha``, ``--lr`` with ``--recipe``, ...) is an error,
never silently ignored.
Only the standard library and :mod:`flipnet.errors` are imported here.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from flipnet.errors import ConfigError

__all__ = ["register", "cmd_hparams"]


def register(subparsers: Any) -> None:
    """Add ``hparams`` to the ``flipnet`` parser's ``subparsers``."""
    p = subparsers.add_parser(
        "hparams",
        help="latent-weight hyperparameters as a flip filter (CEMA alpha/gamma), memory, redundancies",
        description=(
            "Map latent-weight hyperparameters (SGD or Adam, lr and schedule, momentum, weight decay, init scale) "
            "to the equivalent flip filter of Quist et al. 2023 (CEMA alpha as a schedule, gamma), report its "
            "effective memory and which magnitude hyperparameters are redundant for a binary network; with "
            "--alpha and --gamma, map a CEMA filter back to SGD."
        ),
    )
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="latent-weight optimizer (default sgd)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default 0.1; with --alpha: the free lr of the reverse map, default 1)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum, or Adam beta1 (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay lambda (default 0)")
    p.add_argument("--coupled", action="store_true", help="L2 decay in the gradient (torch SGD/Adam weight_decay) instead of decoupled (SGDW/AdamW)")
    p.add_argument("--init-scale", type=float, default=0.0, help="magnitude of the initial latent weights |w0| (default 0)")
    p.add_argument("--schedule", choices=("constant", "linear", "cosine", "step"), default=None, help="learning-rate schedule (default constant)")
    p.add_argument("--end-lr", type=float, default=None, help="final lr of linear/cosine schedules (default 0)")
    p.add_argument("--step-factor", type=float, default=None, help="factor of the step schedule (default 0.1)")
    p.add_argument("--step-every", type=int, default=None, help="steps between lr drops of the step schedule (default: a quarter of training)")
    p.add_argument("--epochs", type=float, default=None, help="training length in epochs (with --steps-per-epoch)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch (or give --train-size and --batch-size)")
    p.add_argument("--train-size", type=int, default=None, help="training examples (with --batch-size: steps per epoch)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (with --train-size)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: epochs x steps per epoch, else 1000)")
    p.add_argument("--recipe", metavar="RECIPE", default=None,
                   help="read optimizer, lr/alpha schedule, batch size and epochs from a recipe (name or .yaml file)")
    p.add_argument("--alpha", type=float, default=None, help="reverse mapping: CEMA alpha")
    p.add_argument("--gamma", type=float, default=None, help="reverse mapping: CEMA gamma")
    p.add_argument("--out", metavar="PREFIX", default=None, help="draw PREFIX_impulse.png, PREFIX_frequency.png, PREFIX_memory.png")
    p.add_argument("--force", action="store_true", help="with --out: replace existing plot files")
    p.add_argument("--title", default=None, help="plot title (default: the hyperparameters)")
    p.set_defaults(func=cmd_hparams)


def _steps(ns: argparse.Namespace) -> tuple[int, int | None]:
    spe = ns.steps_per_epoch
    if (ns.train_size is None) != (ns.batch_size is None):
        raise ConfigError("give both --train-size and --batch-size (or --steps-per-epoch)")
    if ns.train_size is not None:
        if spe is not None:
            raise ConfigError("give --steps-per-epoch or --train-size/--batch-size, not both")
        if ns.train_size < 1 or ns.batch_size < 1:
            raise ConfigError("--train-size and --batch-size must be positive")
        spe = math.ceil(ns.train_size / ns.batch_size)
    if spe is not None and spe < 1:
        raise ConfigError(f"--steps-per-epoch must be positive, got {spe}")
    if ns.steps is not None:
        if ns.epochs is not None:
            raise ConfigError("give --steps or --epochs (with steps per epoch), not both")
        if ns.steps < 1:
            raise ConfigError(f"--steps must be positive, got {ns.steps}")
        return ns.steps, spe
    if ns.epochs is not None:
        if spe is None:
            raise ConfigError("--epochs needs --steps-per-epoch (or --train-size and --batch-size)")
        if not ns.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {ns.epochs}")
        return max(1, round(ns.epochs * spe)), spe
    return 1000, spe


def _refuse(ns: argparse.Namespace, form: str, options: tuple[str, ...]) -> None:
    """One sentence for the first of ``options`` given on the command line: ``form`` does not read it."""
    for opt in options:
        value = getattr(ns, opt.lstrip("-").replace("-", "_"))
        if value is not None and value is not False:
            raise ConfigError(f"{opt} is not used with {form}; leave it out")


def _schedule_kwargs(ns: argparse.Namespace, steps: int) -> dict[str, Any]:
    if ns.step_every is not None and ns.step_every < 1:
        raise ConfigError(f"--step-every must be a positive number of steps, got {ns.step_every}")
    schedule = ns.schedule or "constant"
    if schedule not in ("linear", "cosine") and ns.end_lr is not None:
        raise ConfigError(f"--end-lr is read by the linear and cosine schedules, not by --schedule {schedule}")
    if schedule != "step" and (ns.step_factor is not None or ns.step_every is not None):
        raise ConfigError(f"--step-factor/--step-every are read by --schedule step, not by --schedule {schedule}")
    return dict(
        schedule=schedule, end_lr=0.0 if ns.end_lr is None else ns.end_lr,
        step_factor=0.1 if ns.step_factor is None else ns.step_factor,
        step_every=ns.step_every or max(1, steps // 4), steps=steps,
    )


def cmd_hparams(ns: argparse.Namespace) -> int:
    """``flipnet hparams``: print the report (and draw the plots with ``--out``)."""
    from flipnet.analysis.hparams import LatentHparams, check_plottable, flip_filter, latent_from_cema, plot_filter, report

    if ns.force and not ns.out:
        raise ConfigError("--force replaces existing plot files; it needs --out PREFIX")
    if ns.title is not None and not ns.out:
        raise ConfigError("--title names the plots; it needs --out PREFIX")
    if ns.recipe is not None:
        from flipnet.analysis.hparams import hparams_from_recipe
        from flipnet.train.config import load_config

        _refuse(ns, "--recipe (the recipe sets the optimizer, its schedule and the training length)",
                ("--alpha", "--gamma", "--steps", "--epochs", "--steps-per-epoch", "--batch-size", "--optimizer", "--lr",
                 "--momentum", "--weight-decay", "--coupled", "--schedule", "--end-lr", "--step-factor", "--step-every"))
        config = load_config(ns.recipe)
        h = hparams_from_recipe(config, train_size=ns.train_size, init_scale=ns.init_scale)
        if ns.out:
            check_plottable(h, ns.out, overwrite=ns.force)
        print(f"recipe {config.name}: binary optimizer {config.optim.binary} {dict(config.optim.binary_kwargs)}, "
              f"batch {config.data.batch_size}, {config.train.epochs} epochs")
        clips = [f"optim.weight_clip={config.optim.weight_clip:g}"] if config.optim.weight_clip is not None else []
        model_clip = dict(config.model.kwargs).get("weight_clip")
        if model_clip is not None:
            clips.append(f"model.kwargs.weight_clip={model_clip:g}")
        if clips:
            print(f"note: {' and '.join(clips)} clip(s) the latent weights (and the STE gradient): the filter below "
                  "describes the training only while the latent weights stay inside the clip")
        key = "alpha" if config.optim.binary == "cema" else "lr"
        if any(sc.key == key and sc.route in (None, "binary") and sc.unit == "epoch" and sc.type in ("linear", "cosine")
               for sc in config.optim.schedules):
            print(f"note: the recipe updates {key} once per epoch; below it is computed per step (the recipe's values "
                  "are this line's staircase, and the recipe snippet's unit: step is the smooth version)")
        print()
        print(report(h))
        if ns.out:
            for path in plot_filter(h, ns.out, title=ns.title or config.name, overwrite=ns.force):
                print(f"wrote {path}")
        return 0
    steps, spe = _steps(ns)
    if (ns.alpha is None) != (ns.gamma is None):
        raise ConfigError("the reverse mapping needs both --alpha and --gamma")
    if ns.alpha is not None:
        _refuse(ns, "--alpha/--gamma (the reverse mapping gives SGD with decoupled decay; only --lr is free)",
                ("--optimizer", "--momentum", "--weight-decay", "--coupled"))
        sched = _schedule_kwargs(ns, steps)
        lr = 1.0 if ns.lr is None else ns.lr
        base = latent_from_cema(ns.alpha, ns.gamma, lr=lr)
        h = LatentHparams(
            optimizer="sgd", lr=base.lr, momentum=base.momentum, weight_decay=base.weight_decay, decoupled=True,
            init_scale=ns.init_scale, steps_per_epoch=spe, **sched,
        )
        if ns.out:
            check_plottable(h, ns.out, overwrite=ns.force)
        print(f"CEMA alpha {ns.alpha:g} gamma {ns.gamma:g} is latent-weight SGD with")
        print(f"  momentum {base.momentum:.6g}, decoupled weight decay {base.weight_decay:.6g} at lr {base.lr:g}")
        print(f"  (any lr works: weight decay = alpha / lr = {ns.alpha:g} / lr; the binary weights do not depend on the choice)")
        print()
    else:
        sched = _schedule_kwargs(ns, steps)
        h = LatentHparams(
            optimizer=ns.optimizer or "sgd", lr=0.1 if ns.lr is None else ns.lr,
            momentum=0.9 if ns.momentum is None else ns.momentum,
            weight_decay=0.0 if ns.weight_decay is None else ns.weight_decay,
            decoupled=not ns.coupled, init_scale=ns.init_scale, steps_per_epoch=spe, **sched,
        )
        if ns.out:
            check_plottable(h, ns.out, overwrite=ns.force)
        if h.optimizer == "sgd":
            f = flip_filter(h)
            if f.alpha is not None and f.gamma is not None and f.kind == "cema":
                back = latent_from_cema(f.alpha, f.gamma, lr=h.lr)
                if not h.decoupled:
                    print(f"(coupled decay: the same filter as decoupled SGD with momentum {back.momentum:.6g}, "
                          f"weight decay {back.weight_decay:.6g} at lr {h.lr:g})")
    print(report(h))
    if ns.out:
        for path in plot_filter(h, ns.out, title=ns.title, overwrite=ns.force):
            print(f"wrote {path}")
    return 0
