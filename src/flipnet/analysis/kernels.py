r"""Binary-kernel statistics: 9-bit codes, per-layer histograms and top-N coverage.

Sun & Yao ("Weights having stable signs are important: finding primary subnetworks and kernels
to compress binary weight networks") observe that the 3×3 kernels of a trained binary-weight
network are far from uniform over the :math:`2^9 = 512` possible sign patterns: a few patterns
cover most kernels. This module measures that on any flipnet model.

Kernel codes
------------
Kernels are encoded as integers by :mod:`flipnet.compress.codes` (bit :math:`i = r k_w + c` is 1
where entry :math:`(r, c)` is +1; the all-``+1`` 3×3 kernel is 511). With ``merge_negation`` a
kernel and its negation share a bin (:func:`~flipnet.compress.codes.canonical_codes`): BatchNorm
with a negative scale, or the next layer, can absorb a global sign.

Coverage
--------
For a layer with :math:`N` kernels and code counts :math:`n_1 \ge n_2 \ge \dots`, the top-:math:`m`
coverage is :math:`C(m) = \frac{1}{N}\sum_{j \le m} n_j`, the fraction of kernels that a codebook
of the :math:`m` most frequent kernels reproduces exactly. The Shannon entropy
:math:`H = -\sum_j p_j \log_2 p_j` (bits per kernel) bounds what any lossless code of the kernel
indices can reach: :math:`H / 9` bits per weight for 3×3 kernels.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..compress.codes import MAX_KERNEL_BITS, decode_kernels, encode_kernels, kernel_histogram, kernel_layers

__all__ = [
    "popcount",
    "kernel_codes",
    "coverage_curve",
    "code_entropy",
    "KernelStats",
    "kernel_stats",
    "write_kernel_csv",
    "plot_kernel_stats",
]


def popcount(x: Tensor) -> Tensor:
    """Number of set bits of each element of a non-negative integer tensor (< 2**16)."""
    x = x.to(torch.int64)
    count = torch.zeros_like(x)
    for i in range(MAX_KERNEL_BITS):
        count += (x >> i) & 1
    return count


def kernel_codes(model: nn.Module, kernel_size: tuple[int, int] = (3, 3)) -> dict[str, Tensor]:
    """Codes of every kernel of every binary ``kernel_size`` convolution, per layer name.

    Each value is a 1-D ``int64`` tensor of ``out_channels * in_channels / groups`` codes, in the
    order of ``weight.reshape(-1, kh, kw)``. The signs used are :meth:`BinaryLayer.binary_weight`
    (the forward-pass signs, whatever the weight mode).

    Raises:
        ValueError: if the model has no such layer.
    """
    layers = kernel_layers(model, kernel_size)
    if not layers:
        raise ValueError(
            f"the model has no binary convolution with {kernel_size[0]}×{kernel_size[1]} kernels "
            "(kernel statistics need flipnet.layers.BinaryConv2d layers)"
        )
    out: dict[str, Tensor] = {}
    for name, m in layers:
        w = m.binary_weight()
        out[name] = encode_kernels(w.reshape(-1, *w.shape[-2:])).cpu()
    return out


def coverage_curve(counts: Tensor | np.ndarray) -> np.ndarray:
    """Top-m coverage :math:`C(m)` for m = 1..len(counts): fraction of kernels in the m most frequent bins."""
    n = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = n.sum()
    if total <= 0:
        raise ValueError("cannot compute coverage of an empty histogram")
    return np.cumsum(n) / total


def code_entropy(counts: Tensor | np.ndarray) -> float:
    """Shannon entropy :math:`-\\sum p \\log_2 p` of a histogram, in bits per kernel."""
    n = np.asarray(counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        raise ValueError("cannot compute the entropy of an empty histogram")
    p = n[n > 0] / total
    return float(-(p * np.log2(p)).sum())


@dataclass
class KernelStats:
    """Kernel statistics of one layer (or of all layers, ``name="total"``).

    Attributes:
        name: layer name.
        n_kernels: number of kernels N.
        n_bits: entries per kernel (9 for 3×3).
        merge_negation: whether a kernel and its negation share a bin.
        counts: histogram (length ``2**n_bits``).
        coverage: top-m coverage, m = 1..2**n_bits.
        entropy_bits: entropy of the code distribution, bits per kernel.
    """

    name: str
    n_kernels: int
    n_bits: int
    merge_negation: bool
    counts: np.ndarray
    coverage: np.ndarray
    entropy_bits: float

    @property
    def distinct(self) -> int:
        """Number of distinct codes that occur."""
        return int((self.counts > 0).sum())

    def top(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` most frequent ``(code, count)`` pairs (ties: smaller code first)."""
        order = np.lexsort((np.arange(len(self.counts)), -self.counts))
        return [(int(c), int(self.counts[c])) for c in order[:n] if self.counts[c] > 0]

    def coverage_at(self, m: int) -> float:
        """Fraction of kernels covered by the ``m`` most frequent codes."""
        if m < 1:
            raise ValueError(f"m must be at least 1, got {m}")
        return float(self.coverage[min(m, len(self.coverage)) - 1])


def _stats(name: str, codes: Tensor, n_bits: int, merge_negation: bool) -> KernelStats:
    counts = kernel_histogram(codes, n_bits, merge_negation).numpy()
    return KernelStats(
        name=name,
        n_kernels=int(codes.numel()),
        n_bits=n_bits,
        merge_negation=merge_negation,
        counts=counts,
        coverage=coverage_curve(counts),
        entropy_bits=code_entropy(counts),
    )


def kernel_stats(
    model_or_codes: nn.Module | dict[str, Tensor], merge_negation: bool = False, n_bits: int = 9
) -> list[KernelStats]:
    """Per-layer :class:`KernelStats` plus a final ``"total"`` entry over all layers.

    Args:
        model_or_codes: a model (its binary 3×3 convolutions are read) or a ``{name: codes}`` dict.
        merge_negation: count a kernel and its negation as one pattern.
        n_bits: entries per kernel (9 for 3×3).
    """
    codes = kernel_codes(model_or_codes) if isinstance(model_or_codes, nn.Module) else dict(model_or_codes)
    if not codes:
        raise ValueError("no kernel codes given")
    stats = [_stats(name, c, n_bits, merge_negation) for name, c in codes.items()]
    stats.append(_stats("total", torch.cat([c.reshape(-1) for c in codes.values()]), n_bits, merge_negation))
    return stats


def _kernel_string(code: int, n_bits: int = 9) -> str:
    """Row-major ``+``/``-`` pattern of a code, rows separated by ``/`` (e.g. ``++-/+-+/---``)."""
    side = int(round(math.sqrt(n_bits)))
    chars = "".join("+" if (code >> i) & 1 else "-" for i in range(n_bits))
    if side * side != n_bits:
        return chars
    return "/".join(chars[r * side : (r + 1) * side] for r in range(side))


def write_kernel_csv(stats: Iterable[KernelStats], path: str | Path, top: int = 16, coverage_at: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256)) -> None:
    """Write a summary CSV: one row per layer with N, distinct codes, entropy, coverage at
    ``coverage_at`` codewords, and the ``top`` most frequent codes with their share."""
    from ..utils import atomic_path

    stats = list(stats)
    header = ["layer", "n_kernels", "distinct", "entropy_bits", "entropy_bits_per_weight"]
    header += [f"coverage_top{m}" for m in coverage_at]
    header += [f"top{j + 1}_code" for j in range(top)] + [f"top{j + 1}_share" for j in range(top)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for s in stats:
            tops = s.top(top)
            tops += [(-1, 0)] * (top - len(tops))
            w.writerow(
                [s.name, s.n_kernels, s.distinct, f"{s.entropy_bits:.4f}", f"{s.entropy_bits / s.n_bits:.4f}"]
                + [f"{s.coverage_at(m):.4f}" for m in coverage_at]
                + [c for c, _ in tops]
                + [f"{n / s.n_kernels:.4f}" for _, n in tops]
            )


def plot_kernel_stats(stats: Sequence[KernelStats], out_dir: str | Path, top: int = 16) -> list[Path]:
    """Save ``kernel_coverage.png`` (top-m coverage per layer, log-x), ``kernel_histogram.png``
    (sorted frequencies of the total) and ``kernel_top.png`` (the ``top`` most frequent kernels of
    all layers, drawn as 3×3 images, white = +1). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    suffix = " (kernel ≡ −kernel)" if stats and stats[0].merge_negation else ""

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in stats:
        m = np.arange(1, len(s.coverage) + 1)
        style = dict(color="black", linewidth=2.2) if s.name == "total" else dict(linewidth=1.0, alpha=0.75)
        ax.plot(m, s.coverage, label=s.name, **style)
    for k in range(1, 9):
        ax.axvline(2**k, color="grey", linewidth=0.4, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size m (most frequent kernels)")
    ax.set_ylabel("fraction of kernels covered")
    ax.set_ylim(0, 1.01)
    ax.set_title("Top-m kernel coverage" + suffix)
    if len(stats) <= 24:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    paths.append(out_dir / "kernel_coverage.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    total = stats[-1]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    freq = np.sort(total.counts)[::-1] / total.n_kernels
    ax.bar(np.arange(1, len(freq) + 1), freq, width=1.0, color="tab:blue")
    ax.axhline(1.0 / (2 ** total.n_bits if not total.merge_negation else 2 ** (total.n_bits - 1)),
               color="tab:red", linewidth=1.0, linestyle="--", label="uniform")
    ax.set_yscale("log")
    ax.set_xlabel("kernel rank")
    ax.set_ylabel("share of kernels")
    ax.set_title(f"Kernel frequencies, {total.name} ({total.n_kernels} kernels, H = {total.entropy_bits:.2f} bits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "kernel_histogram.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    tops = total.top(top)
    if tops and total.n_bits == 9:
        cols = min(8, len(tops))
        rows = math.ceil(len(tops) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.75 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (code, count) in zip(axes.flat, tops):
            img = decode_kernels([code], 3).squeeze(0).numpy()
            ax.axis("on")
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():  # a frame, so that an all-white kernel is visible
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(1.2)
            ax.set_title(f"{code}\n{100 * count / total.n_kernels:.1f}%", fontsize=7)
        fig.suptitle("Most frequent kernels (white = +1)", fontsize=9)
        fig.tight_layout()
        paths.append(out_dir / "kernel_top.png")
        with atomic_path(paths[-1]) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    return paths
