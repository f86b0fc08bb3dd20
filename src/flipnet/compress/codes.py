r"""Kernel codes: a binary :math:`k_h \times k_w` kernel as one integer.

A binary kernel :math:`s \in \{-1, +1\}^{k_h \times k_w}` is encoded as

.. math:: \mathrm{code}(s) = \sum_{i=0}^{k_h k_w - 1} b_i\, 2^i, \qquad
          b_i = 1[s_{r,c} = +1],\quad i = r\,k_w + c,

i.e. bit :math:`i` (least significant first) is the sign of the kernel entry in row-major
position :math:`(r, c) = (i \,//\, k_w,\ i \bmod k_w)`; ``+1`` is bit 1, ``-1`` is bit 0 (and, by
flipnet's convention ``sign(0) = +1``, a real weight of exactly 0 counts as ``+1``). For a 3×3
kernel the top-left entry is bit 0 and the bottom-right entry is bit 8; the all-``+1`` kernel is
511, the all-``-1`` kernel is 0. :func:`decode_kernels` inverts :func:`encode_kernels`. Negating a
kernel flips every bit: ``code(-s) = code(s) XOR (2^{k_h k_w} - 1)`` (:func:`negate_codes`);
:func:`canonical_codes` maps a kernel and its negation to the same (smaller) code.

These codes are shared by QBN compression (:mod:`flipnet.compress.qbn`, codebooks of the most
frequent codes) and the kernel statistics of :mod:`flipnet.analysis.kernels`, which sits above
this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import BinaryConv2d, binary_modules

__all__ = [
    "MAX_KERNEL_BITS",
    "encode_kernels",
    "decode_kernels",
    "negate_codes",
    "canonical_codes",
    "kernel_layers",
    "kernel_histogram",
]

#: Largest kernel (in entries) whose codes and histograms this module handles (2^16 bins).
MAX_KERNEL_BITS = 16


def _check_bits(n_bits: int) -> None:
    if not 1 <= n_bits <= MAX_KERNEL_BITS:
        raise ValueError(
            f"kernels must have between 1 and {MAX_KERNEL_BITS} entries to be encoded, got {n_bits}; "
            "kernel statistics are meant for small (e.g. 3×3) convolution kernels"
        )


def encode_kernels(weight: Tensor) -> Tensor:
    """Encode the signs of ``weight`` (``(..., kh, kw)``) as ``int64`` codes of shape ``(...)``.

    Bit ``i = r * kw + c`` (least significant first) is 1 where ``weight[..., r, c] >= 0``. Real
    (latent) weights are binarised with ``sign(0) = +1`` first. See the module docstring.

    Raises:
        ValueError: if ``weight`` has fewer than 2 dimensions or more than 16 entries per kernel.
    """
    if weight.dim() < 2:
        raise ValueError(f"expected a tensor of kernels with shape (..., kh, kw), got shape {tuple(weight.shape)}")
    kh, kw = weight.shape[-2], weight.shape[-1]
    n_bits = kh * kw
    _check_bits(n_bits)
    bits = weight.detach().reshape(*weight.shape[:-2], n_bits).ge(0).to(torch.int64)
    powers = torch.pow(2, torch.arange(n_bits, device=weight.device, dtype=torch.int64))
    return (bits * powers).sum(dim=-1)


def decode_kernels(
    codes: Tensor | Sequence[int] | np.ndarray,
    kernel_size: int | tuple[int, int] = 3,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`encode_kernels`: codes of shape ``(...)`` → ±1 kernels ``(..., kh, kw)``.

    Raises:
        ValueError: if a code is negative or does not fit in ``kh * kw`` bits.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    n_bits = kh * kw
    _check_bits(n_bits)
    codes_t = torch.as_tensor(np.asarray(codes) if not isinstance(codes, Tensor) else codes).to(torch.int64)
    if codes_t.numel() and (int(codes_t.min()) < 0 or int(codes_t.max()) >= (1 << n_bits)):
        raise ValueError(f"kernel codes must lie in [0, {(1 << n_bits) - 1}] for {kh}×{kw} kernels")
    shifts = torch.arange(n_bits, device=codes_t.device, dtype=torch.int64)
    bits = (codes_t.unsqueeze(-1) >> shifts) & 1
    return (bits.to(dtype) * 2 - 1).reshape(*codes_t.shape, kh, kw)


def negate_codes(codes: Tensor, n_bits: int = 9) -> Tensor:
    """Code of the negated kernel: every bit flipped (``codes XOR (2**n_bits - 1)``)."""
    _check_bits(n_bits)
    return codes ^ ((1 << n_bits) - 1)


def canonical_codes(codes: Tensor, n_bits: int = 9) -> Tensor:
    """Map a kernel and its negation to one code, the smaller of the two (always < 2**(n_bits-1))."""
    return torch.minimum(codes, negate_codes(codes, n_bits))


def kernel_layers(model: nn.Module, kernel_size: tuple[int, int] = (3, 3)) -> list[tuple[str, nn.Module]]:
    """The binary 2-D convolutions of ``model`` whose kernels have ``kernel_size`` (default 3×3).

    Only layers whose forward pass uses 1-bit weights count (:attr:`BinaryLayer.has_binary_weight`):
    a ``BinaryConv2d`` built with ``weight_quantizer=None`` keeps real weights, whose signs are
    not its kernels.
    """
    return [
        (name, m)
        for name, m in binary_modules(model)
        if isinstance(m, BinaryConv2d) and m.has_binary_weight and tuple(m.kernel_size) == tuple(kernel_size)
    ]


def kernel_histogram(codes: Tensor, n_bits: int = 9, merge_negation: bool = False) -> Tensor:
    """Counts of each code: an ``int64`` tensor of length ``2**n_bits``.

    With ``merge_negation`` a kernel and its negation share the bin of the smaller code
    (:func:`canonical_codes`); the upper half of the histogram is then zero.
    """
    _check_bits(n_bits)
    c = codes.reshape(-1).to(torch.int64).cpu()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << n_bits)):
        raise ValueError(f"codes must lie in [0, {(1 << n_bits) - 1}]")
    if merge_negation:
        c = canonical_codes(c, n_bits)
    return torch.bincount(c, minlength=1 << n_bits)
