r"""Bit packing of binary tensors and of k-bit indices.

Three layouts are provided.

Bytes (:func:`pack_bits` / :func:`unpack_bits`)
    Eight values per ``uint8`` along one dimension, **numpy-packbits compatible**: value ``+1``
    (or ``True``) is bit 1, value ``-1`` (or ``False``) is bit 0, and the *first* element of each
    group of eight is the **most significant** bit. ``pack_bits(t, dim).numpy()`` equals
    ``numpy.packbits(t.numpy() > 0, axis=dim)``. The last byte is padded with 0 bits; the packed
    dimension has ``ceil(n / 8)`` entries. This is the storage layout of exports.

Words (:func:`pack_words` / :func:`unpack_words`)
    Sixty-four values per ``int64`` word, **least significant bit first**: element ``i`` of a
    group is bit ``i % 64`` of word ``i // 64`` (``+1`` → 1). Padding bits are 0. This is the
    compute layout of the XNOR-popcount kernels (:mod:`flipnet.compress.packed`): with both
    operands packed this way and padding bits 0 in both, for ±1 vectors :math:`a, w` of length
    :math:`K`,

    .. math:: a \cdot w = K - 2\,\mathrm{popcount}(a \oplus w),

    since a product is :math:`-1` exactly where the bits differ, and padding bits never differ.

k-bit indices (:func:`pack_indices` / :func:`unpack_indices`)
    A flat stream of ``k``-bit unsigned integers (``1 <= k <= 8``), used for codebook layers:
    index ``i`` occupies stream bits ``[i*k, (i+1)*k)``, its bit ``j`` at stream bit ``i*k + j``,
    and stream bit ``b`` is bit ``b % 8`` (LSB first) of byte ``b // 8``. ``n`` indices take
    ``ceil(n*k / 8)`` bytes.

Bad input (values other than ±1, wrong dtypes, ``k`` out of range, shapes that do not match)
raises ``ValueError`` with one sentence saying what is wrong.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "pack_bits",
    "unpack_bits",
    "pack_words",
    "unpack_words",
    "pack_indices",
    "unpack_indices",
]

_BYTE_WEIGHTS_BIG = [128, 64, 32, 16, 8, 4, 2, 1]


def packed_size(n: int, bits_per_unit: int) -> int:
    """Number of ``bits_per_unit``-bit units that hold ``n`` bits (``ceil(n / bits_per_unit)``)."""
    return -(-n // bits_per_unit)


def check_binary(t: Tensor, what: str = "tensor") -> Tensor:
    """Return ``t > 0`` as a bool tensor after checking that ``t`` holds only ±1 (or is bool).

    Raises:
        ValueError: if ``t`` holds any value other than -1 and +1 (NaN included).
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        raise ValueError(f"{what} must hold ±1 values, got a complex tensor")
    ok = (t == 1) | (t == -1)
    if not bool(ok.all()):
        bad = t[~ok].flatten()[:3].tolist()
        raise ValueError(
            f"{what} must hold only -1 and +1 (or be a bool tensor); found e.g. {bad}. "
            "Binarise it first, e.g. with flipnet.quantizers.sign"
        )
    return t > 0


def _norm_dim(dim: int, ndim: int, what: str) -> int:
    if ndim == 0:
        raise ValueError(f"{what} must have at least one dimension, got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-d {what}")
    return dim % ndim


def _pack_last(bits: Tensor, unit: int, weights: Tensor) -> Tensor:
    """Pack bool ``bits`` along the last dim into ``unit``-bit groups: sum(bit * weight)."""
    n = bits.shape[-1]
    groups = packed_size(n, unit)
    pad = groups * unit - n
    b = bits.to(weights.dtype)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], groups, unit)
    return (b * weights).sum(dim=-1)


def pack_bits(t: Tensor, dim: int = -1) -> Tensor:
    """Pack ±1 (or bool) values eight per byte along ``dim`` (numpy-packbits bit order).

    Args:
        t: tensor of -1/+1 values (any real dtype) or a bool tensor.
        dim: dimension to pack; its size ``n`` becomes ``ceil(n / 8)``.

    Returns:
        A ``uint8`` tensor on the device of ``t``.
    """
    bits = check_binary(t, "pack_bits input")
    d = _norm_dim(dim, bits.dim(), "pack_bits input")
    bits = bits.movedim(d, -1)
    w = torch.tensor(_BYTE_WEIGHTS_BIG, dtype=torch.int32, device=bits.device)
    packed = _pack_last(bits, 8, w).to(torch.uint8)
    return packed.movedim(-1, d).contiguous()


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of non-negative ints, got {shape!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"{what} must be a sequence of non-negative ints, got {shape!r}")
    return out


def unpack_bits(packed: Tensor, shape: Sequence[int], dim: int = -1, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: ``uint8`` tensor from :func:`pack_bits`.
        shape: shape of the original tensor.
        dim: the packed dimension.
        dtype: result dtype; ``torch.bool`` gives bits, any other dtype gives ±1.

    Raises:
        ValueError: if ``packed`` is not ``uint8`` or its shape does not match ``shape``.
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"unpack_bits expects a uint8 tensor from pack_bits, got {got}")
    shape = _check_shape(shape, "shape")
    d = _norm_dim(dim, len(shape), "shape")
    expected = list(shape)
    expected[d] = packed_size(shape[d], 8)
    if tuple(packed.shape) != tuple(expected):
        raise ValueError(
            f"packed tensor has shape {tuple(packed.shape)} but shape {shape} packed along dim {d} "
            f"needs {tuple(expected)}"
        )
    p = packed.movedim(d, -1).to(torch.int32)
    shifts = torch.arange(7, -1, -1, dtype=torch.int32, device=p.device)
    bits = ((p.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : shape[d]].bool()
    bits = bits.movedim(-1, d).contiguous()
    if dtype == torch.bool:
        return bits
    one = torch.ones((), dtype=dtype, device=bits.device)
    return torch.where(bits, one, -one)


def _word_weights(device: torch.device) -> Tensor:
    w = torch.ones(64, dtype=torch.int64, device=device) << torch.arange(64, dtype=torch.int64, device=device)
    return w  # bit 63 is INT64_MIN; the sum of distinct bits is their OR in two's complement


def pack_words(t: Tensor, dim: int = -1) -> Tensor:
    """Pack ±1 (or bool) values 64 per ``int64`` word along ``dim`` (LSB first, padding 0).

    The packed dimension has ``ceil(n / 64)`` words. Words are stored as ``int64`` because
    PyTorch's unsigned 64-bit support is limited; bit 63 is the sign bit.
    """
    bits = check_binary(t, "pack_words input")
    d = _norm_dim(dim, bits.dim(), "pack_words input")
    bits = bits.movedim(d, -1)
    return _pack_last(bits, 64, _word_weights(bits.device)).movedim(-1, d).contiguous()


def unpack_words(words: Tensor, n: int, dim: int = -1, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_words`: the first ``n`` values along ``dim``, as ±1 (or bool)."""
    if not isinstance(words, Tensor) or words.dtype != torch.int64:
        got = words.dtype if isinstance(words, Tensor) else type(words).__name__
        raise ValueError(f"unpack_words expects an int64 tensor from pack_words, got {got}")
    d = _norm_dim(dim, words.dim(), "words")
    n = int(n)
    if n < 0 or packed_size(n, 64) != words.shape[d]:
        raise ValueError(f"{words.shape[d]} words along dim {d} cannot hold exactly n={n} values")
    w = words.movedim(d, -1)
    shifts = torch.arange(64, dtype=torch.int64, device=w.device)
    bits = ((w.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :n].bool().movedim(-1, d).contiguous()
    if dtype == torch.bool:
        return bits
    one = torch.ones((), dtype=dtype, device=bits.device)
    return torch.where(bits, one, -one)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 8:
        raise ValueError(f"k (bits per index) must be an int from 1 to 8, got {k!r}")
    return k


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def pack_indices(idx: Tensor, k: int) -> Tensor:
    """Pack non-negative integers below ``2**k`` into a flat ``uint8`` stream of ``k``-bit fields.

    ``idx`` is flattened in row-major order; keep its shape separately to restore it.

    Raises:
        ValueError: ``k`` not in 1..8, ``idx`` not an integer tensor, or a value outside
            ``[0, 2**k)``.
    """
    k = _check_k(k)
    if not isinstance(idx, Tensor) or idx.dtype not in _INT_DTYPES:
        got = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"pack_indices expects an integer tensor, got {got}")
    flat = idx.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << k)):
        raise ValueError(
            f"indices must lie in [0, {1 << k}) for k={k}; got values from {int(flat.min())} to {int(flat.max())}"
        )
    shifts = torch.arange(k, dtype=torch.int64, device=flat.device)
    bits = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1).bool()
    w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=flat.device)
    return _pack_last(bits, 8, w).to(torch.uint8)


def unpack_indices(packed: Tensor, k: int, n: int) -> Tensor:
    """Inverse of :func:`pack_indices`: the ``n`` indices as a 1-d ``int64`` tensor.

    Raises:
        ValueError: ``k`` not in 1..8, ``packed`` not a 1-d ``uint8`` tensor, or its length is not
            ``ceil(n*k/8)``.
    """
    k = _check_k(k)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"unpack_indices expects a 1-d uint8 tensor from pack_indices, got {got}")
    n = int(n)
    if n < 0 or packed.numel() != packed_size(n * k, 8):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n} indices of {k} bits")
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(-1)[: n * k]
    bits = bits.reshape(n, k).to(torch.int64)
    return (bits << torch.arange(k, dtype=torch.int64, device=packed.device)).sum(dim=-1)
