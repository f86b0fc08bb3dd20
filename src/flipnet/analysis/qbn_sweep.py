"""The QBN experiment: accuracy against bits per weight for codebooks of 2^k kernels.

:func:`qbn_sweep` projects a trained run onto per-layer kernel codebooks
(:func:`flipnet.compress.qbn.apply_qbn`), evaluates, fine-tunes with the projection in the
forward pass (:class:`QBNCallback`) and stores each compressed model as a ``flipnet-export`` file.
The compression itself lives in :mod:`flipnet.compress.qbn`; this module only runs experiments
with it. See ``docs/analysis.md``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch import Tensor

from ..compress.export import export_model
from ..compress.qbn import Distance, apply_qbn, check_k, qbn_bits, qbn_layers
from ..train.checkpoint import resolve_checkpoint
from ..train.callbacks import Callback
from ..utils import atomic_path
from ._runs import evaluate_trainer, make_trainer, read_run_config

__all__ = ["QBNCallback", "QBNSweepRow", "qbn_sweep"]


class QBNCallback(Callback):
    """Trainer callback that puts the model under QBN at the start of training.

    ``Trainer(config, callbacks=[QBNCallback(k)])`` fine-tunes with the projection in the forward
    pass. The conversion is in place, so the trainer's optimizer stays valid. Unless
    ``codebooks`` are given, each layer's codebook is taken from its signs at that moment (load
    the trained weights with ``model.init_from``).
    """

    def __init__(self, k: int, distance: Distance = "auto", codebooks: Mapping[str, Tensor] | None = None,
                 exclude: Iterable[str] = ()) -> None:
        self.k = check_k(k)
        self.distance = distance
        self.codebooks = codebooks
        self.exclude = tuple(exclude)
        self.layers: dict[str, Any] = {}

    def on_train_start(self, trainer: Any) -> None:
        if not qbn_layers(trainer.model) or self.codebooks is not None:
            self.layers = apply_qbn(trainer.model, self.k, distance=self.distance, codebooks=self.codebooks,
                                    exclude=self.exclude)
        else:
            self.layers = dict(qbn_layers(trainer.model))

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        metrics["qbn_bits_per_weight"] = qbn_bits(trainer.model)[-2].bits_per_weight


@dataclass
class QBNSweepRow:
    """One point of :func:`qbn_sweep`: ``k=None`` is the 1-bit model without QBN."""

    k: int | None
    bits_per_weight_qbn: float
    bits_per_weight_all: float
    acc_projected: float
    acc_finetuned: float


def qbn_sweep(
    run_dir: str | Path,
    bits: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
    *,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    distance: Distance = "auto",
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    plot: bool = True,
    control: bool = True,
) -> list[QBNSweepRow]:
    """Accuracy against bits per weight: project a trained run onto codebooks and fine-tune.

    For each ``k`` in ``bits``: load the run's weights (``model.init_from``), put every binary 3×3
    convolution under QBN with its ``2**k`` most frequent kernels, evaluate (``acc_projected``),
    fine-tune for ``epochs`` (default: a quarter of the run's epochs, at least 1) with the run's
    recipe and the projection in the forward pass, evaluate again (``acc_finetuned``) and save the
    compressed model to ``<out_dir>/k<k>/qbn.safetensors`` (a ``flipnet-export`` file;
    :func:`flipnet.compress.export.load_qbn` reads its QBN layers back). The row with ``k=None`` is the unprojected
    1-bit model; with ``control`` (default) it is fine-tuned the same way (``acc_finetuned``), so
    that QBN is compared with equally long training. Results go to ``<out_dir>/qbn.csv`` and ``qbn.png`` (default
    ``RUN/analysis/qbn``).
    """
    ks = [check_k(k) for k in bits]
    if not ks:
        raise ValueError("give at least one k (index width) to sweep")
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis" / "qbn"
    out.mkdir(parents=True, exist_ok=True)
    ft_epochs = int(epochs) if epochs is not None else max(1, int(cfg.train.epochs) // 4)
    if ft_epochs < 1:
        raise ValueError(f"fine-tuning epochs must be at least 1, got {ft_epochs}")
    init = resolve_checkpoint(run_dir, checkpoint)
    rows: list[QBNSweepRow] = []
    ft = [f"model.init_from={init}", f"train.epochs={ft_epochs}", *overrides]
    # the 1-bit model without QBN; with ``control`` it gets the same fine-tuning, so that the
    # comparison isolates the projection from the extra training
    base = make_trainer(cfg, ft, out, "control")
    acc_base = evaluate_trainer(base)
    acc_base_ft = acc_base
    if control:
        base.fit()
        acc_base_ft = evaluate_trainer(base)
    rows.append(QBNSweepRow(None, 1.0, qbn_bits(base.model)[-1].bits_per_weight, acc_base, acc_base_ft))
    del base
    for k in ks:
        cb = QBNCallback(k, distance)
        trainer = make_trainer(cfg, ft, out, f"k{k}", callbacks=[cb])
        apply_qbn(trainer.model, k, distance=distance)
        acc_proj = evaluate_trainer(trainer)
        trainer.fit()
        acc_ft = evaluate_trainer(trainer)
        b = qbn_bits(trainer.model)
        export_model(trainer.model, Path(trainer.run_dir) / "qbn.safetensors",
                     metadata={"model": {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)}, "qbn_k": k})
        rows.append(QBNSweepRow(k, b[-2].bits_per_weight, b[-1].bits_per_weight, acc_proj, acc_ft))
        del trainer
    _write_sweep(rows, out, plot)
    return rows


def _write_sweep(rows: list[QBNSweepRow], out: Path, plot: bool) -> None:
    with atomic_path(out / "qbn.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "codebook_size", "bits_per_weight_qbn_layers", "bits_per_weight_all_binary",
                    "test_acc_projected", "test_acc_finetuned"])
        for r in rows:
            w.writerow(["none" if r.k is None else r.k, "" if r.k is None else 1 << r.k,
                        f"{r.bits_per_weight_qbn:.4f}", f"{r.bits_per_weight_all:.4f}",
                        f"{r.acc_projected:.4f}", f"{r.acc_finetuned:.4f}"])
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = [r for r in rows if r.k is not None]
    base = [r for r in rows if r.k is None]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    x = [r.bits_per_weight_qbn for r in q]
    ax.plot(x, [r.acc_projected for r in q], "o--", label="projected, no fine-tuning")
    ax.plot(x, [r.acc_finetuned for r in q], "o-", label="projected + fine-tuned")
    for r in q:
        ax.annotate(f"k={r.k}", (r.bits_per_weight_qbn, r.acc_finetuned), fontsize=7,
                    textcoords="offset points", xytext=(3, 4))
    if base:
        ax.axhline(base[0].acc_finetuned, color="black", linewidth=1, linestyle=":",
                   label="1 bit/weight, same fine-tuning" if base[0].acc_finetuned != base[0].acc_projected
                   else "1 bit/weight (no QBN)")
    ax.set_xlabel("bits per weight (QBN layers, incl. codebook)")
    ax.set_ylabel("test accuracy")
    ax.set_title("QBN: accuracy against bits per weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "qbn.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
