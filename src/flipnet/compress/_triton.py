r"""XNOR-popcount kernels for CUDA, written in Triton: the ``"triton"`` implementation of the
packed layers (:mod:`flipnet.compress.packed`).

For ±1 vectors :math:`a, w` of length :math:`K`, packed LSB-first with zero padding bits (the
word layout of :func:`flipnet.compress.pack.pack_words`),

.. math:: a \cdot w = K - 2 \sum_j \mathrm{popcount}(a_j \oplus w_j).

The kernels work on **int32 words**: an int64 word of that layout is, on a little-endian machine
(every CUDA host), two int32 words with the low 32 values first, so ``words.view(torch.int32)``
is the same bit string and padding bits stay zero on both sides.

Kernels
    ``pack``: real input → int32 words of its signs (bit = ``x >= 0``, as ``sign(0) = +1``), 32
    values per word along one dimension, in one pass that reads each value once; the word count
    is padded to an even number so that the words view as the int64 layout.

    ``gemm``: ``(M, Kw)`` words × ``(N, Kw)`` words → ``(M, N)`` float32
    ``K − 2·popcount(a ⊕ w)``, two variants. ``"bcast"``: each program computes a
    ``BLOCK_M × BLOCK_N`` tile; per step it loads ``BLOCK_K`` words of ``BLOCK_M`` rows and of
    ``BLOCK_N`` weight rows, XORs them as a ``BLOCK_M × BLOCK_N × BLOCK_K`` broadcast, counts bits
    and sums over the words. ``"kmajor"``: the operands are transposed to word-major order (the
    weights once, cached) and each word adds one ``BLOCK_M × BLOCK_N`` outer product of
    XOR-popcounts, with coalesced loads. Both accumulate in int32 (exact: ``|sum| <= K``). On CUDA
    the configuration (:data:`CONFIGS`) is chosen per (row bucket, N, Kw) by timing on first use.
    On a GPU the count is the hardware ``popc`` instruction (``libdevice.popc``); under Triton's
    CPU interpreter (``TRITON_INTERPRET=1``, used by the tests) it is the SWAR bit count, since
    the interpreter has no libdevice.

Dense layers pack their input and call ``gemm`` directly. Convolutions pack the input per pixel
along channels, gather the packed im2col matrix with PyTorch (pad words, ``unfold``; the same
layout and padding correction as the ``"torch"`` implementation) and call ``gemm``.

:func:`usable_on` says whether these kernels can run on a device: CUDA with Triton importable,
or the CPU under the interpreter. The packed layers consider ``"triton"`` among their
candidates only there, and keep it only where their run-time measurement finds it fastest (and
its output identical).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["CONFIGS", "available", "interpreting", "usable_on", "status", "pack_signs", "xnor_gemm", "default_config",
           "linear", "conv2d"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


try:  # imported with this module; flipnet.compress.packed imports this module on first use only
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as _e:  # noqa: BLE001 - any import failure means "not available"
    triton = tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"triton is not importable ({type(_e).__name__}: {_e})"
try:
    from triton.language.extra import libdevice
except Exception:  # noqa: BLE001 - other layouts: the SWAR count is used then
    libdevice = None

if triton is not None:

    @triton.jit
    def _popc32(x, HW_POPC: tl.constexpr):
        if HW_POPC:
            c = libdevice.popc(x)
        else:  # SWAR bit count of 32-bit words (arithmetic shifts are masked, so signs do not matter)
            x = x - ((x >> 1) & 0x55555555)
            x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
            x = (x + (x >> 4)) & 0x0F0F0F0F
            c = (x * 0x01010101) >> 24
        return c

    @triton.jit
    def _gemm_kernel(a_ptr, w_ptr, out_ptr, M, N, KW, k_bits,
                     stride_am, stride_wn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_POPC: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, KW, BLOCK_K):
            k = k0 + rk
            k_ok = k < KW
            a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = a[:, None, :] ^ w[None, :, :]
            acc += tl.sum(_popc32(x, HW_POPC), axis=2)
        out = (k_bits - 2 * acc).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _gemm_kmajor_kernel(a_ptr, w_ptr, out_ptr, M, N, KW, k_bits, stride_om,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HW_POPC: tl.constexpr):
        # word-major operands: a (KW, M), w (KW, N); one outer product of XOR-popcounts per word
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, KW):
            a = tl.load(a_ptr + k * M + rm, mask=m_ok, other=0)
            w = tl.load(w_ptr + k * N + rn, mask=n_ok, other=0)
            acc += _popc32(a[:, None] ^ w[None, :], HW_POPC)
        out = (k_bits - 2 * acc).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _pack_kernel(x_ptr, out_ptr, P, C, CW, stride_outer, stride_inner, inner, stride_c,
                     BLOCK_P: tl.constexpr):
        # rows p = (outer, inner) pairs, e.g. (n, h*W + w) for images; 32 channels per word
        pid_p = tl.program_id(0)
        j = tl.program_id(1)  # word index along channels
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        ri = tl.arange(0, 32)
        c = j * 32 + ri
        p_ok = rp < P
        base = (rp // inner) * stride_outer + (rp % inner) * stride_inner
        v = tl.load(x_ptr + base[:, None] + c[None, :] * stride_c, mask=p_ok[:, None] & (c[None, :] < C), other=-1.0)
        bits = (v >= 0).to(tl.int32) << ri[None, :]
        word = tl.sum(bits, axis=1)  # distinct bits: the sum is their OR
        tl.store(out_ptr + rp * CW + j, word, mask=p_ok)


class _Kernels:
    def __init__(self) -> None:
        self.triton = triton
        self.gemm = _gemm_kernel
        self.gemm_kmajor = _gemm_kmajor_kernel
        self.pack = _pack_kernel
        self.hw_popc = libdevice is not None and not interpreting()


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Any, str]:
    """``(kernels, "")`` or ``(None, reason)``."""
    if triton is None:
        return None, _IMPORT_ERROR
    return _Kernels(), ""


def available() -> bool:
    """Triton is importable and its kernels are defined."""
    return _load()[0] is not None


_CHECKED: dict[tuple[str, int | None], str] = {}


def usable_on(device: torch.device | str) -> bool:
    """The kernels can run on ``device``: CUDA with Triton, or the CPU under the interpreter.

    The first call per device runs a small self-test (both kernels, ragged sizes, against the
    plain float product); if it fails, the kernels are reported unusable there (:func:`status`
    gives the reason, a warning is issued once) and the packed layers keep their other
    implementations instead of failing.
    """
    device = torch.device(device)
    if not available():
        return False
    if interpreting():
        if device.type != "cpu":
            return False
    elif device.type != "cuda" or not torch.cuda.is_available():
        return False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key not in _CHECKED:
        _CHECKED[key] = _self_test(device)
        if _CHECKED[key]:
            warnings.warn(f"flipnet: the Triton packed kernels are disabled on {device}: {_CHECKED[key]}", stacklevel=2)
    return not _CHECKED[key]


def _self_test(device: torch.device) -> str:
    """``""`` when both kernels reproduce the float reference on ``device``, else the reason."""
    from .pack import pack_words

    try:
        g = torch.Generator().manual_seed(0)
        for m, n, k in ((5, 7, 100), (100, 70, 129)):
            a = torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0)
            w = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0)
            aw = pack_signs(a.to(device))
            if not torch.equal(aw.cpu(), pack_words(a, dim=1)):
                return f"the pack kernel disagrees with pack_words at {(m, k)}"
            got = xnor_gemm(aw, pack_words(w, dim=1).to(device), k).cpu()
            if not torch.equal(got, a @ w.T):
                return f"the popcount GEMM disagrees with the float product at (M, N, K) = {(m, n, k)}"
        x = torch.randn(2, 70, 3, 4, generator=g)
        want = pack_words(torch.where(x >= 0, 1.0, -1.0).permute(0, 2, 3, 1), dim=-1)
        if not torch.equal(pack_signs(x.to(device)).cpu(), want):
            return "the pack kernel disagrees with pack_words on an image batch"
    except Exception as e:  # noqa: BLE001 - any failure (compilation, launch) disables the kernels here
        return f"self-test raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return ""


def status(device: torch.device | str) -> str:
    """One line on whether and how the kernels run on ``device``."""
    kern, reason = _load()
    if kern is None:
        return reason
    mode = "interpreter (SWAR bit count)" if interpreting() else ("hardware popc" if kern.hw_popc else "SWAR bit count")
    dev = torch.device(device)
    if usable_on(dev):
        where = "usable (self-test passed)"
    else:
        failed = [v for (t, _), v in _CHECKED.items() if t == dev.type and v]
        where = f"not usable on {dev.type}" + (f": {failed[0]}" if failed else "")
    return f"triton {kern.triton.__version__}, {mode}, {where}"


def _kernels() -> Any:
    kern, reason = _load()
    if kern is None:
        raise RuntimeError(f"the Triton kernels are unavailable: {reason}")
    return kern


def _as_words32(words: Tensor) -> Tensor:
    """int64 words ``(R, Kw)`` → contiguous int32 words ``(R, 2*Kw)`` (the same bits)."""
    if words.dtype != torch.int64:
        raise ValueError(f"expected int64 words, got {words.dtype}")
    return words.contiguous().view(torch.int32)


#: GEMM configurations ``(variant, BLOCK_M, BLOCK_N, BLOCK_K, num_warps)``. ``"bcast"`` reads
#: row-major words and sums a ``BLOCK_M x BLOCK_N x BLOCK_K`` broadcast over the words;
#: ``"kmajor"`` reads word-major (transposed) operands and adds one outer product per word
#: (``BLOCK_K`` unused). On CUDA the fastest for each shape is chosen by timing on first use.
CONFIGS: tuple[tuple[str, int, int, int, int], ...] = (
    ("bcast", 16, 64, 8, 4),
    ("bcast", 64, 64, 4, 4),
    ("kmajor", 32, 64, 1, 4),
    ("kmajor", 64, 64, 1, 4),
    ("kmajor", 128, 128, 1, 8),
)
#: (device, row bucket, N, words) -> the configuration chosen by timing
_TUNED: dict[tuple[Any, ...], tuple[str, int, int, int, int]] = {}
#: transposed (word-major) int32 weights, keyed on the weight view; the entry keeps the view alive
_WEIGHTS_T: dict[tuple[Any, ...], tuple[Tensor, int, Tensor]] = {}


def default_config(m: int) -> tuple[str, int, int, int, int]:
    """The configuration used without timing (the interpreter, or a forced choice): by row count."""
    return CONFIGS[0] if m <= 16 else CONFIGS[1]


def _candidates(m: int) -> list[tuple[str, int, int, int, int]]:
    return [c for c in CONFIGS if m > 64 or c[1] <= 64] if m > 16 else [c for c in CONFIGS if c[1] <= 32]


def _weights_t(w32: Tensor) -> Tensor:
    """``(N, KW)`` int32 weights → contiguous ``(KW, N)``, cached while the weights are unchanged."""
    key = (w32.data_ptr(), tuple(w32.shape), tuple(w32.stride()), w32.device)
    hit = _WEIGHTS_T.get(key)
    if hit is not None and hit[1] == w32._version:
        return hit[2]
    if len(_WEIGHTS_T) >= 64:
        _WEIGHTS_T.clear()
    wt = w32.t().contiguous()
    _WEIGHTS_T[key] = (w32, w32._version, wt)
    return wt


def _launch(config: tuple[str, int, int, int, int], a32: Tensor, w32: Tensor, out: Tensor, k_bits: int) -> None:
    kern = _kernels()
    variant, bm, bn, bk, warps = config
    m, kw = a32.shape
    n = w32.shape[0]
    grid = (kern.triton.cdiv(m, bm), kern.triton.cdiv(n, bn))
    if variant == "bcast":
        kern.gemm[grid](a32, w32, out, m, n, kw, int(k_bits), a32.stride(0), w32.stride(0), out.stride(0),
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HW_POPC=kern.hw_popc, num_warps=warps)
    elif variant == "kmajor":
        kern.gemm_kmajor[grid](a32.t().contiguous(), _weights_t(w32), out, m, n, kw, int(k_bits), out.stride(0),
                               BLOCK_M=bm, BLOCK_N=bn, HW_POPC=kern.hw_popc, num_warps=warps)
    else:
        raise ValueError(f"unknown GEMM variant {variant!r}")


def _tune(key: tuple[Any, ...], a32: Tensor, w32: Tensor, out: Tensor, k_bits: int) -> tuple[str, int, int, int, int]:
    """Time every candidate configuration on the real operands (CUDA events, best of 3 after a
    first call that compiles) and keep the fastest; a configuration that fails is skipped."""
    best, best_t = None, float("inf")
    for config in _candidates(a32.shape[0]):
        try:
            _launch(config, a32, w32, out, k_bits)  # compile + warm up
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _launch(config, a32, w32, out, k_bits)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for one block size: try the others
            continue
        if min(times) < best_t:
            best, best_t = config, min(times)
    if best is None:
        raise RuntimeError(f"no Triton GEMM configuration ran for {tuple(a32.shape)} x {tuple(w32.shape)}")
    _TUNED[key] = best
    return best


def xnor_gemm(a: Tensor, w: Tensor, k_bits: int, *, config: tuple[str, int, int, int, int] | None = None) -> Tensor:
    """``a``: (M, Kw) int64 words, ``w``: (N, Kw) int64 words → (M, N) float32 ``K - 2 popcount(a ^ w)``.

    Both operands must have zero padding bits beyond ``k_bits`` (as :func:`pack_words` writes
    them). Exact for ``k_bits < 2**24``. ``config`` (one of :data:`CONFIGS`) forces a kernel
    configuration; by default CUDA times the candidates once per (row bucket, N, Kw) and the
    interpreter uses :func:`default_config`.
    """
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"expected (M, Kw) and (N, Kw) word matrices, got {tuple(a.shape)} and {tuple(w.shape)}")
    a32, w32 = _as_words32(a), _as_words32(w.to(a.device))
    m, kw = a32.shape
    n = w32.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        if a.is_cuda and not interpreting():
            key = (a.device, 1 if m <= 1 else 1 << (m - 1).bit_length(), n, kw)
            config = _TUNED.get(key) or _tune(key, a32, w32, out, k_bits)
        else:
            config = default_config(m)
    _launch(config, a32, w32, out, k_bits)
    return out


def pack_signs(x: Tensor) -> Tensor:
    """Signs of ``x`` packed along dim 1, as int64 words in the :func:`pack_words` layout.

    ``(M, K)`` → ``(M, ceil(K/64))``; ``(N, C, H, W)`` (any memory format) → ``(N, H, W, ceil(C/64))``
    (per pixel along channels). Bit = ``x >= 0`` (``sign(0) = +1``; NaN packs as -1).
    """
    kern = _kernels()
    if not x.is_floating_point():
        x = x.float()
    if x.dim() == 2:
        p, c = x.shape
        inner = 1
        s_outer, s_inner, s_c = x.stride(0), 0, x.stride(1)
        shape: Sequence[int] = (p,)
    elif x.dim() == 4:
        n, c, h, w = x.shape
        if x.stride(2) != w * x.stride(3):  # pixels must be one strided run per image
            x = x.contiguous()
        p, inner = n * h * w, h * w
        s_outer, s_inner, s_c = x.stride(0), x.stride(3), x.stride(1)
        shape = (n, h, w)
    else:
        raise ValueError(f"expected a 2-d or 4-d input, got {x.dim()}-d")
    cw64 = -(-c // 64)
    out = torch.empty(p, 2 * cw64, dtype=torch.int32, device=x.device)
    if p == 0:
        return out.view(torch.int64).reshape(*shape, cw64)
    block_p = 128
    grid = (kern.triton.cdiv(p, block_p), 2 * cw64)
    kern.pack[grid](x, out, p, c, 2 * cw64, s_outer, s_inner, inner, s_c, BLOCK_P=block_p, num_warps=4)
    return out.view(torch.int64).reshape(*shape, cw64)


def linear(x2: Tensor, weight_words: Tensor, in_features: int) -> Tensor:
    """``(N, in)`` real input, ``(out, ceil(in/64))`` int64 weight words → ``(N, out)`` float32 sums."""
    return xnor_gemm(pack_signs(x2), weight_words, in_features)


def conv2d(
    x: Tensor,
    weight_words: Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pads: tuple[int, int, int, int],
    pad_words: tuple[int, int],
    out_size: tuple[int, int],
    correction: Tensor | None,
) -> Tensor:
    """Packed convolution ``(N, C, H, W)`` → ``(N, O, OH, OW)`` float32 sums (before scale and bias).

    ``weight_words``: ``(O, KH, KW, ceil(C/64))``; ``pads``: ``(left, right, top, bottom)``;
    ``pad_words``: the (full, last) int64 words that padded pixels hold (all-ones in the valid
    channel bits for pad value +1, zeros otherwise); ``correction``: ``(O, OH, OW)`` added for pad
    values other than ±1 (see :class:`flipnet.compress.packed.PackedBinaryConv2d`).
    """
    n, c, h, w = x.shape
    kh, kw = kernel_size
    oh, ow = out_size
    xp = pack_signs(x)  # (N, H, W, Cw)
    cw = xp.shape[-1]
    left, right, top, bottom = pads
    if any(pads):
        padded = torch.empty(n, h + top + bottom, w + left + right, cw, dtype=torch.int64, device=x.device)
        padded[..., :-1] = pad_words[0]
        padded[..., -1] = pad_words[1]
        padded[:, top:top + h, left:left + w] = xp
    else:
        padded = xp
    dh, dw = dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    p = padded.unfold(1, span_h, stride[0]).unfold(2, span_w, stride[1])  # N, OH', OW', Cw, span_h, span_w
    p = p[:, :oh, :ow, :, ::dh, ::dw].permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * cw)
    o = weight_words.shape[0]
    y = xnor_gemm(p, weight_words.reshape(o, -1), c * kh * kw).view(n, oh, ow, o).permute(0, 3, 1, 2)
    if correction is not None:
        y = y + correction
    return y
