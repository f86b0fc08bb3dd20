r"""Primary binary subnetworks: retrain with the signs of epoch k (Sun & Yao's claim 2).

Sun & Yao ("Weights having stable signs are important: finding primary subnetworks and kernels
to compress binary weight networks") find that the signs of a binary-weight network are
essentially fixed early in training: the signs :math:`s_k = \mathrm{sign}(w_k)` after a few
epochs :math:`k` define a "primary binary subnetwork" that, like a lottery ticket, can be
trained to the accuracy of the full run. This module tests that on any run trained with sign
tracking (``train.track_signs=true``), re-using its recipe through :class:`flipnet.train.Trainer`.

For each ``k`` in ``epochs_k`` and each variant, the run's recipe is trained again from the same
seed (so the real-valued parameters start from the same initialisation) for ``epochs`` epochs:

``frozen``
    binary weights fixed to :math:`s_k` (``optim.binary=none``: ``requires_grad=False``); only
    BatchNorm, scales and the full-precision layers train. For latent layers the weight is set to
    :math:`s_k \odot |w_0|` (:math:`w_0` the initial weight) so that an XNOR scale keeps the
    initial magnitudes; its signs, the only thing the forward pass uses, are :math:`s_k`.
``reinit``
    latent weights re-initialised to :math:`w = s_k \odot |w_0|` and trained as in the original
    recipe (signs may change again). For flip-mode runs :math:`|w_0| = 1`.

``k = 0`` is the random initial sign pattern: the natural control (a frozen random subnetwork).
The report puts the final test accuracy of each retraining next to the unconstrained run, with
the fraction of :math:`s_k` equal to the final signs :math:`s_E` of the original run.
Results: ``RUN/analysis/primary/primary.csv`` and ``primary.png``; each retraining is a run
folder ``RUN/analysis/primary/<variant>_k<k>``.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import CheckpointError
from .flips import list_snapshots, read_initial_weights, read_snapshot, snapshot_path, tracked_layers, unpack_signs

__all__ = ["VARIANTS", "PrimaryRow", "primary_experiment", "set_signs"]

VARIANTS: tuple[str, ...] = ("frozen", "reinit")


@dataclass
class PrimaryRow:
    """One retraining: ``variant`` (``frozen``, ``reinit`` or ``full`` for the original run) with
    the signs of epoch ``k``."""

    k: int
    variant: str
    epochs: int
    final_test_acc: float
    test_acc_at_best: float
    equal_final_signs: float
    signs_kept: bool | None


@torch.no_grad()
def set_signs(model: torch.nn.Module, signs: dict[str, torch.Tensor], magnitudes: dict[str, torch.Tensor] | None = None) -> None:
    """Set every tracked binary weight of ``model`` to ``signs[name] * magnitudes[name]``.

    Flip-mode layers get the ±1 signs. Latent layers get ``signs * |magnitude|`` (exact zeros are
    replaced by 1e-8 so that the sign survives), or the ±1 signs when ``magnitudes`` is ``None``.

    Raises:
        KeyError: if the model's binary layers do not match ``signs``.
    """
    layers = tracked_layers(model)
    names = [n for n, _, _ in layers]
    if sorted(names) != sorted(signs):
        raise KeyError(f"the model's binary layers {names} do not match the recorded ones {sorted(signs)}")
    for name, module, w in layers:
        s = signs[name].to(device=w.device, dtype=w.dtype).reshape(w.shape)
        if getattr(module, "weight_mode", "latent") == "flip" or magnitudes is None:
            w.copy_(s)
        else:
            mag = magnitudes[name].to(device=w.device, dtype=w.dtype).reshape(w.shape).abs().clamp_min(1e-8)
            w.copy_(s * mag)


def _signs_at(run_dir: Path, k: int) -> tuple[dict[str, torch.Tensor], float]:
    path = snapshot_path(run_dir, k)
    if not path.is_file():
        have = [e for e, _ in list_snapshots(run_dir)]
        raise CheckpointError(
            f"{run_dir} has no sign snapshot for epoch {k}; recorded epochs: {have or 'none'} "
            "(train with train.track_signs=true)"
        )
    snap = read_snapshot(path)
    final = read_snapshot(list_snapshots(run_dir)[-1][1])
    equal = sum(
        int(np.sum(np.unpackbits(a ^ b, bitorder="little", count=n))) for a, b, n in zip(snap.packed, final.packed, snap.numels)
    )
    total = sum(snap.numels)
    signs = {name: unpack_signs(p, shape) for name, p, shape in zip(snap.layers, snap.packed, snap.shapes)}
    return signs, 1.0 - equal / total


def primary_experiment(
    run_dir: str | Path,
    epochs_k: Sequence[int],
    *,
    variants: Sequence[str] = VARIANTS,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    plot: bool = True,
) -> list[PrimaryRow]:
    """Retrain a run's recipe from the signs of each epoch in ``epochs_k`` (see module docstring).

    Args:
        run_dir: a run trained with ``train.track_signs=true``.
        epochs_k: snapshot epochs whose signs to use (0 = initial signs).
        variants: any of ``"frozen"`` and ``"reinit"``.
        epochs: training epochs of each retraining (default: the run's ``train.epochs``).
        overrides: extra ``key=value`` recipe overrides for the retrainings.
        out_dir: where results go (default ``RUN/analysis/primary``).
        plot: draw ``primary.png``.

    Returns:
        One :class:`PrimaryRow` per (k, variant), after a ``full`` row for the original run.
    """
    from ._runs import make_trainer, read_run_config, run_accuracy

    run_dir = Path(run_dir)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {list(variants)}")
    ks = sorted({int(k) for k in epochs_k})
    if not ks or ks[0] < 0:
        raise ValueError(f"epochs_k must be non-negative epoch numbers, got {list(epochs_k)}")
    cfg = read_run_config(run_dir)
    n_epochs = int(epochs) if epochs is not None else int(cfg.train.epochs)
    if n_epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {n_epochs}")
    snaps = {k: _signs_at(run_dir, k) for k in ks}  # fail early on a missing epoch
    if "reinit" in variants:
        init: dict[str, torch.Tensor] | None = read_initial_weights(run_dir)
    else:  # frozen signs need no magnitudes; keep |w_0| when recorded (XNOR scales)
        try:
            init = read_initial_weights(run_dir)
        except CheckpointError:
            init = None
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis" / "primary"
    out.mkdir(parents=True, exist_ok=True)

    final_acc, best_acc = run_accuracy(run_dir)
    last_epoch = list_snapshots(run_dir)[-1][0]
    rows = [PrimaryRow(last_epoch, "full", int(cfg.train.epochs), final_acc, best_acc, 1.0, None)]
    for k in ks:
        signs, equal = snaps[k]
        for variant in variants:
            ov = [f"train.epochs={n_epochs}", *overrides]
            if variant == "frozen":
                ov = ["optim.binary=none", "optim.binary_kwargs={}", "optim.weight_clip=null", *ov]
            trainer = make_trainer(cfg, ov, out, f"{variant}_k{k:04d}")
            set_signs(trainer.model, signs, init)
            trainer.fit()
            fin, best = run_accuracy(trainer.run_dir)
            kept: bool | None = None
            if variant == "frozen":
                kept = all(
                    bool(torch.equal(torch.where(w.detach().cpu() >= 0, 1.0, -1.0), signs[name].reshape(w.shape)))
                    for name, _, w in tracked_layers(trainer.model)
                )
            rows.append(PrimaryRow(k, variant, n_epochs, fin, best, equal, kept))
            del trainer
    _write(rows, out, plot)
    return rows


def _write(rows: list[PrimaryRow], out: Path, plot: bool) -> None:
    from ..utils import atomic_path

    with atomic_path(out / "primary.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["signs_kept"] = "" if r.signs_kept is None else str(r.signs_kept).lower()
            for key in ("final_test_acc", "test_acc_at_best", "equal_final_signs"):
                d[key] = f"{d[key]:.4f}"
            w.writerow(d)
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = rows[0]
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for variant, style in (("frozen", "o-"), ("reinit", "s--")):
        sel = [r for r in rows if r.variant == variant]
        if sel:
            ax.plot([r.k for r in sel], [r.final_test_acc for r in sel], style, label=f"{variant} signs of epoch k")
    ax.axhline(full.final_test_acc, color="black", linestyle=":", linewidth=1.2, label="unconstrained run")
    ks = sorted({r.k for r in rows[1:]})
    eq = [next(r.equal_final_signs for r in rows[1:] if r.k == k) for k in ks]
    ax2 = ax.twinx()
    ax2.plot(ks, eq, color="tab:grey", alpha=0.6, linewidth=1, marker=".", label="signs equal to final")
    ax2.set_ylabel("fraction of signs of epoch k equal to the final signs", fontsize=8, color="tab:grey")
    ax2.set_ylim(0, 1.02)
    ax.set_xlabel("epoch k whose signs are used")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Primary binary subnetworks")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(out / "primary.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
