r"""Do scaling factors matter? Sun & Yao's claim 1, as one comparison driver.

Sun & Yao ("Weights having stable signs are important: finding primary subnetworks and kernels
to compress binary weight networks") argue that in binary-weight networks with BatchNorm after
every convolution the per-channel scaling factor :math:`\alpha` of :math:`W \approx \alpha\,
\mathrm{sign}(W)` barely matters: BatchNorm re-normalises each output channel, so a positive
per-channel factor is absorbed (exactly at inference, and nearly so during training), and
what the network learns is the signs. :func:`scaling_study` trains one recipe three times,
changing only ``model.kwargs.scale`` (see :mod:`flipnet.layers`):

* ``none``: :math:`\alpha = 1`;
* ``xnor``: :math:`\alpha_c = \mathrm{mean}|W_c|` of the latent weight (Rastegari et al. 2016);
* ``learnable``: a trained per-channel :math:`\alpha_c` (LQ-Nets style).

Every other setting (seed, data order, schedule) is identical. Results:
``OUT/scaling.csv`` (final test accuracy and test accuracy at the best-validation epoch, per scale and
seed) and ``OUT/scaling.png``.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["SCALE_MODES", "ScalingRow", "scaling_study"]

SCALE_MODES: tuple[str, ...] = ("none", "xnor", "learnable")


@dataclass
class ScalingRow:
    """The result of one training with ``scale`` and ``seed``."""

    scale: str
    seed: int
    epochs: int
    final_test_acc: float
    test_acc_at_best: float
    run_dir: str


def scaling_study(
    recipe: str | Path,
    *,
    scales: Sequence[str] = SCALE_MODES,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    out_dir: str | Path = "runs/scaling",
    plot: bool = True,
) -> list[ScalingRow]:
    """Train ``recipe`` once per scale mode (and seed) and compare test accuracies.

    Args:
        recipe: recipe name or YAML path of a model that accepts ``scale`` (every flipnet zoo model).
        scales: subset of ``("none", "xnor", "learnable")``.
        seeds: seeds to train each scale with.
        overrides: extra ``key=value`` recipe overrides (applied to every run).
        out_dir: parent folder of the runs and of ``scaling.csv`` / ``scaling.png``.

    Raises:
        ValueError: unknown scale, or no scale/seed given.
    """
    from ..train import load_config
    from ._runs import make_trainer, run_accuracy

    bad = [s for s in scales if s not in SCALE_MODES]
    if bad or not scales:
        raise ValueError(f"scales must be a non-empty subset of {SCALE_MODES}, got {list(scales)}")
    if not seeds:
        raise ValueError("give at least one seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(recipe, list(overrides))
    rows: list[ScalingRow] = []
    for seed in seeds:
        for scale in scales:
            trainer = make_trainer(base, [f"model.kwargs.scale={scale}", f"seed={int(seed)}"], out,
                                   f"scale_{scale}_seed{int(seed)}")
            trainer.fit()
            fin, best = run_accuracy(trainer.run_dir)
            rows.append(ScalingRow(scale, int(seed), int(trainer.config.train.epochs), fin, best, str(trainer.run_dir)))
            del trainer
    _write(rows, out, plot)
    return rows


def _write(rows: list[ScalingRow], out: Path, plot: bool) -> None:
    from ..utils import atomic_path

    with atomic_path(out / "scaling.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["final_test_acc"] = f"{r.final_test_acc:.4f}"
            d["test_acc_at_best"] = f"{r.test_acc_at_best:.4f}"
            w.writerow(d)
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(dict.fromkeys(r.scale for r in rows))
    means = [statistics.mean(r.final_test_acc for r in rows if r.scale == s) for s in scales]
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    ax.bar(scales, means, color=["tab:blue", "tab:orange", "tab:green"][: len(scales)], alpha=0.7)
    for i, s in enumerate(scales):
        pts = [r.final_test_acc for r in rows if r.scale == s]
        ax.plot([i] * len(pts), pts, "k.", markersize=6)
        ax.annotate(f"{means[i]:.4f}", (i, means[i]), ha="center", va="bottom", fontsize=8,
                    textcoords="offset points", xytext=(0, 3))
    lo = min(r.final_test_acc for r in rows)
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(means) + 0.03))
    ax.set_xlabel("weight scale")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Scaling factors vs signs")
    fig.tight_layout()
    with atomic_path(out / "scaling.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
