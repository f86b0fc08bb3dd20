"""The analysis sub-commands of ``flipnet`` (Sun & Yao's three claims, and QBN compression).

::

    flipnet analyze RUN [--out DIR] [--no-plots]
    flipnet kernels RUN [--checkpoint best|last] [--merge-negation] [--top N] [--out DIR]
    flipnet primary RUN [key=value ...] --epochs-k K [K ...] [--variants frozen reinit] [--epochs N]
    flipnet qbn RUN [key=value ...] [--bits K [K ...]] [--epochs N] [--distance auto|hamming|magnitude]
    flipnet scaling RECIPE [key=value ...] [--scales none xnor learnable] [--seeds S ...] [--out DIR]

Recipe overrides (``key.sub=value``) go right after RUN / RECIPE, before the options.

``analyze`` reads the sign snapshots of a run trained with ``train.track_signs=true`` and writes
``RUN/analysis/sign_dynamics.csv`` and ``signs_*.png``. ``kernels`` writes kernel histograms and
top-m coverage (``RUN/analysis/kernels*.csv``, ``kernel_*.png``). ``primary`` retrains from the
signs of epoch k (``RUN/analysis/primary``). ``qbn`` sweeps codebook sizes 2^k, fine-tunes and
writes the accuracy-vs-bits curve and the compressed weights (``RUN/analysis/qbn``). ``scaling``
trains one recipe with each weight-scale mode.

At module level this imports only the standard library and :mod:`flipnet.errors`.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator

from flipnet.errors import CheckpointError, ConfigError

__all__ = ["register", "cmd_analyze", "cmd_kernels", "cmd_primary", "cmd_qbn", "cmd_scaling"]


def _overrides(values: list[str]) -> list[str]:
    bad = [v for v in values if "=" not in v]
    if bad:
        raise ConfigError(f"expected key.sub=value recipe overrides, got {' '.join(bad)!r}")
    return values


@contextlib.contextmanager
def _value_errors_as_config_errors() -> Iterator[None]:
    """Report a ``ValueError`` from an experiment as a :class:`ConfigError` (bad option, exit 2)."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _run_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a run folder (give the folder that `flipnet train` wrote)")
    return p


def register(subparsers: Any) -> None:
    """Add ``analyze``, ``kernels``, ``primary``, ``qbn`` and ``scaling`` to the ``flipnet`` parser."""
    p = subparsers.add_parser(
        "analyze", help="sign dynamics of a run: flip ratios, sign stability, latent norms",
        description="Per layer and overall, per epoch: flip ratio, fraction of signs equal to the final "
                    "signs, fraction that never flip again, latent-weight norm. Needs a run trained with "
                    "train.track_signs=true. Writes RUN/analysis/sign_dynamics.csv and signs_*.png.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis)")
    p.add_argument("--no-plots", action="store_true", help="write the CSV only")
    p.set_defaults(func=cmd_analyze)

    p = subparsers.add_parser(
        "kernels", help="3x3 binary-kernel statistics: histograms, top-m coverage, entropy",
        description="Encode every binary 3x3 kernel as a 9-bit code and report, per layer, the number of "
                    "distinct kernels, the entropy and the fraction covered by the m most frequent ones. "
                    "Writes RUN/analysis/kernels.csv (kernels_merged.csv with --merge-negation) and kernel_*.png.")
    p.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    p.add_argument("--merge-negation", action="store_true", help="count a kernel and its negation as one pattern")
    p.add_argument("--top", type=int, default=16, metavar="N", help="most frequent kernels to list and draw (default: 16)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis)")
    p.add_argument("--no-plots", action="store_true", help="write the CSV only")
    p.set_defaults(func=cmd_kernels)

    p = subparsers.add_parser(
        "primary", help="primary-subnetwork experiment: retrain with the signs of epoch k",
        description="For each k, retrain the run's recipe (same seed) with the binary weights' signs "
                    "taken from epoch k: 'frozen' (signs fixed, only BatchNorm/scales/real layers train) "
                    "and 'reinit' (latent weights = sign_k * |w_init|, trained normally). k=0 is the "
                    "random initial sign pattern. Writes RUN/analysis/primary/primary.csv and primary.png.")
    p.add_argument("run", metavar="RUN", help="run folder trained with train.track_signs=true")
    p.add_argument("--epochs-k", type=int, nargs="+", required=True, metavar="K", help="snapshot epochs to take signs from")
    p.add_argument("--variants", nargs="+", choices=("frozen", "reinit"), default=["frozen", "reinit"])
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="epochs of each retraining (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis/primary)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for the retrainings (right after RUN)")
    p.set_defaults(func=cmd_primary)

    p = subparsers.add_parser(
        "qbn", help="QBN: compress binary 3x3 kernels with 2^k-entry codebooks, fine-tune, accuracy vs bits",
        description="For each k, project every binary 3x3 kernel onto the layer's 2^k most frequent kernels, "
                    "evaluate, fine-tune with the projection in the forward pass, evaluate again and store "
                    "k-bit indices + codebook. Writes RUN/analysis/qbn/qbn.csv, qbn.png and k<k>/qbn.safetensors.")
    p.add_argument("run", metavar="RUN", help="trained run folder")
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8], metavar="K",
                   help="index widths k in 1..8 (default: 1 to 8)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="fine-tuning epochs per k (default: a quarter of the run's epochs)")
    p.add_argument("--distance", choices=("auto", "hamming", "magnitude"), default="auto",
                   help="kernel-to-codeword distance (default: hamming for flip mode, magnitude-weighted for latent)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="weights to start from (default: best)")
    p.add_argument("--no-control", action="store_true",
                   help="skip fine-tuning the 1-bit model without QBN for the same epochs (the control)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis/qbn)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides for fine-tuning, right after RUN, e.g. optim.binary_kwargs.lr=1e-3")
    p.set_defaults(func=cmd_qbn)

    p = subparsers.add_parser(
        "scaling", help="do scaling factors matter? train a recipe with scale=none, xnor and learnable",
        description="Train the recipe once per weight-scale mode (model.kwargs.scale), everything else equal, "
                    "and compare test accuracy. Writes OUT/scaling.csv and scaling.png.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe name or path, e.g. sun_yao_resnet20_bwn")
    p.add_argument("--scales", nargs="+", choices=("none", "xnor", "learnable"), default=["none", "xnor", "learnable"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S")
    p.add_argument("--out", metavar="DIR", default="runs/scaling", help="output folder (default: runs/scaling)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for every run (right after RECIPE)")
    p.set_defaults(func=cmd_scaling)


def cmd_analyze(ns: argparse.Namespace) -> int:
    """``flipnet analyze``: write the sign-dynamics table and plots."""
    from flipnet.analysis.flips import analyze_run

    run = _run_dir(ns.run)
    out = Path(ns.out) if ns.out else run / "analysis"
    dyn = analyze_run(run, out, plot=not ns.no_plots)
    total = [r for r in dyn.rows if r["layer"] == "total"]
    print(f"{'epoch':>5}  {'flip_ratio':>10}  {'equal_final':>11}  {'never_flip_after':>16}  {'latent_norm':>11}")
    for r in total:
        print(f"{r['epoch']:>5}  {r['flip_ratio']:>10.3g}  {r['equal_final']:>11.4f}  {r['never_flip_after']:>16.4f}  "
              f"{r['latent_norm']:>11.4g}")
    print(f"wrote {out / 'sign_dynamics.csv'}" + ("" if ns.no_plots else f" and {out}/signs_*.png"))
    return 0


def cmd_kernels(ns: argparse.Namespace) -> int:
    """``flipnet kernels``: kernel histograms and coverage of a trained model."""
    from flipnet.analysis.kernels import kernel_stats, plot_kernel_stats, write_kernel_csv
    from flipnet.train import load_run

    if ns.top < 1:
        raise ConfigError(f"--top must be at least 1, got {ns.top}")
    _, model = load_run(ns.run, ns.checkpoint)
    try:
        stats = kernel_stats(model, merge_negation=ns.merge_negation)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    base = Path(ns.run) if Path(ns.run).is_dir() else Path(ns.run).parent
    out = Path(ns.out) if ns.out else base / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    name = "kernels_merged.csv" if ns.merge_negation else "kernels.csv"
    write_kernel_csv(stats, out / name, top=ns.top)
    if not ns.no_plots:
        plot_kernel_stats(stats, out / ("kernels_merged" if ns.merge_negation else "kernels"), top=ns.top)
    print(f"{'layer':<24} {'kernels':>8} {'distinct':>8} {'H bits':>7}  coverage top 2/8/64/256")
    for s in stats:
        cov = "/".join(f"{s.coverage_at(m):.3f}" for m in (2, 8, 64, 256))
        print(f"{s.name:<24} {s.n_kernels:>8} {s.distinct:>8} {s.entropy_bits:>7.2f}  {cov}")
    print(f"wrote {out / name}")
    return 0


def cmd_primary(ns: argparse.Namespace) -> int:
    """``flipnet primary``: retrain from the signs of epoch k."""
    from flipnet.analysis.primary import primary_experiment

    run = _run_dir(ns.run)
    with _value_errors_as_config_errors():
        rows = primary_experiment(run, ns.epochs_k, variants=ns.variants, epochs=ns.epochs,
                                  overrides=_overrides(ns.overrides), out_dir=ns.out)
    print(f"{'k':>5} {'variant':<8} {'final acc':>9} {'acc@bestval':>11} {'=final signs':>12} {'signs kept':>10}")
    for r in rows:
        kept = "" if r.signs_kept is None else str(r.signs_kept).lower()
        print(f"{r.k:>5} {r.variant:<8} {r.final_test_acc:>9.4f} {r.test_acc_at_best:>11.4f} {r.equal_final_signs:>12.4f} {kept:>10}")
    return 0


def cmd_qbn(ns: argparse.Namespace) -> int:
    """``flipnet qbn``: accuracy against bits per weight."""
    from flipnet.analysis.qbn_sweep import qbn_sweep

    run = _run_dir(ns.run)
    with _value_errors_as_config_errors():
        rows = qbn_sweep(run, ns.bits, epochs=ns.epochs, overrides=_overrides(ns.overrides), distance=ns.distance,
                         checkpoint=ns.checkpoint, out_dir=ns.out, control=not ns.no_control)
    print(f"{'k':>4} {'bits/w (QBN layers)':>19} {'bits/w (all binary)':>19} {'acc projected':>13} {'acc fine-tuned':>14}")
    for r in rows:
        k = "1bit" if r.k is None else str(r.k)
        print(f"{k:>4} {r.bits_per_weight_qbn:>19.4f} {r.bits_per_weight_all:>19.4f} {r.acc_projected:>13.4f} {r.acc_finetuned:>14.4f}")
    return 0


def cmd_scaling(ns: argparse.Namespace) -> int:
    """``flipnet scaling``: one training per scale mode."""
    from flipnet.analysis.scaling import scaling_study

    with _value_errors_as_config_errors():
        rows = scaling_study(ns.recipe, scales=ns.scales, seeds=ns.seeds, overrides=_overrides(ns.overrides),
                             out_dir=ns.out)
    print(f"{'scale':<10} {'seed':>4} {'final acc':>9} {'acc@bestval':>11}")
    for r in rows:
        print(f"{r.scale:<10} {r.seed:>4} {r.final_test_acc:>9.4f} {r.test_acc_at_best:>11.4f}")
    return 0
