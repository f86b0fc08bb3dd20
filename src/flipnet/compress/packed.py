r"""Packed inference layers: XNOR-popcount convolution and dense layers, and integer thresholds.

A layer whose inputs **and** weights are ±1 computes, per output,

.. math:: y = \sum_{i=1}^{K} a_i w_i = K - 2\,\mathrm{popcount}(a \oplus w)

on 64-bit words (see :mod:`flipnet.compress.pack` for the word layout). :math:`y` is an integer
with :math:`|y| \le K`, so it is held exactly in float32 for :math:`K < 2^{24}`.

Convolution follows the design of Larq Compute Engine's binary convolution: the input is packed
per pixel along channels (NHWC, ``ceil(C/64)`` words per pixel), a packed im2col gathers the
``KH*KW*ceil(C/64)`` words of each output pixel, and a binary GEMM against the packed weights
(blocked by 16 output channels) does the XNOR-popcount.

Padding
    ``pad_value=+1`` pads with all-ones words and ``pad_value=-1`` with zero words, both exact.
    Zero padding is not binary: padded taps are packed as -1, which adds
    :math:`-\sum_{\text{out-of-bounds taps}} w` to :math:`y`; a per-(channel, output pixel)
    correction :math:`(p + 1)\sum_{\text{oob}} w` (``p`` the pad value, 0 here) computed once per
    input size restores the exact result. Any other pad value uses the same correction.

Layout
    The C path returns convolution outputs of shape ``(N, O, OH, OW)`` in ``torch.channels_last``
    memory (contiguous per-pixel stores); packed layers, :class:`ThresholdSign` and
    :class:`MaxPool2d` accept either layout and keep channels last, other PyTorch modules accept it
    as usual. Packed input and im2col words live in a per-thread scratch buffer that is reused.

Implementations (``impl``)
    ``"c"``: the C kernels of ``csrc/bgemm.c`` (CPU; compiled on first use, AVX-512 VPOPCNTDQ
    where the CPU has it, OpenMP threads = ``torch.get_num_threads()``). ``"torch"``: the same
    arithmetic in PyTorch ops on int64 words (XOR and a SWAR popcount; any device). ``"float"``:
    ``F.linear`` / ``F.conv2d`` on the ±1 input and cached float32 ±1 weights (the products and
    sums are small integers, exact in float32). All give identical outputs.

    ``impl="auto"`` (the default) picks per layer by measurement on CPU: the first call with a
    new (batch-size bucket, input size, layout, thread count) runs the popcount kernel (C, or
    torch without a compiler) and the float path on the real input, keeps ``"float"`` as a
    candidate only if its output equals the popcount output, times the candidates a few times
    (interleaved, fastest call each) and stores the winner in ``layer.tuned``; later calls look
    the choice up. Batch sizes are bucketed by powers of two. CUDA tensors choose the same way
    between ``"triton"`` (the Triton XNOR-popcount kernels of :mod:`flipnet.compress._triton`) and
    ``"float"`` where Triton is importable, else use ``"torch"``; ``impl="triton"`` forces them.
    ``impl=`` in the constructor (or setting ``layer.impl``) forces one implementation; so does
    :func:`~flipnet.compress.set_kernel_mode` (or ``FLIPNET_KERNELS=c|torch|float``, read at
    import) for layers left on ``"auto"``.

Layers whose inputs are real (the first layer) keep float arithmetic:
:class:`BinaryWeightConv` / :class:`BinaryWeightLinear` hold ±1 weights as floats (they are
stored bit-packed in exports).
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import conv_nd, explicit_padding
from ..layers import BinaryConv1d, BinaryConv2d, BinaryLinear
from ..quantizers import sign
from . import _kernels
from .pack import check_binary, pack_words, packed_size, unpack_words

__all__ = [
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "BinaryWeightConv",
    "BinaryWeightLinear",
    "ThresholdSign",
    "MaxPool2d",
]

_OBLOCK = 16  # output channels per weight block of the C kernel

#: Implementations a packed layer can run (see the module docstring); ``"auto"`` picks one.
IMPLS = ("c", "torch", "float")
#: Timed calls per candidate when autotuning (the fastest counts).
AUTOTUNE_REPS = 5

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def popcount64(x: Tensor) -> Tensor:
    """Bit count of each int64 word (SWAR; works on any device), as int64."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _H01) >> 56  # the top byte holds a count <= 64, so the arithmetic shift is exact


def _pack_channels(x: Tensor) -> Tensor:
    """``(N, C, *spatial)`` real → int64 words ``(N, *spatial, ceil(C/64))`` of ``x >= 0``."""
    bits = (x >= 0).movedim(1, -1)
    c = bits.shape[-1]
    groups = packed_size(c, 64)
    b = bits.to(torch.int64)
    if groups * 64 != c:
        b = F.pad(b, (0, groups * 64 - c))
    b = b.reshape(*bits.shape[:-1], groups, 64)
    w = torch.ones(64, dtype=torch.int64, device=x.device) << torch.arange(64, dtype=torch.int64, device=x.device)
    return (b * w).sum(-1)


def _pad_words(c: int) -> tuple[int, int]:
    """(full word, last word) holding +1 in every valid channel bit, as signed int64."""
    rem = c % 64
    last = -1 if rem == 0 else (1 << rem) - 1
    return -1, last


def _to_u64(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def _xnor_gemm_torch(a: Tensor, w: Tensor, k_bits: int) -> Tensor:
    """``a``: (M, Kw) words, ``w``: (O, Kw) words → (M, O) float ``K - 2 popcount(a ^ w)``."""
    m, kw = a.shape
    o = w.shape[0]
    out = torch.empty(m, o, dtype=torch.float32, device=a.device)
    step = max(1, (1 << 22) // max(1, o * kw))
    for i in range(0, m, step):
        cnt = popcount64(a[i : i + step, None, :] ^ w[None, :, :]).sum(-1)
        out[i : i + step] = (k_bits - 2 * cnt).to(torch.float32)
    return out


def _block_weights(words: Tensor) -> Tensor:
    """(O, Kw) words → (ceil(O/16), Kw, 16) blocks for the C kernel (zero words beyond O)."""
    o, kw = words.shape
    ob = packed_size(o, _OBLOCK)
    padded = torch.zeros(ob * _OBLOCK, kw, dtype=torch.int64)
    padded[:o] = words.cpu()
    return padded.view(ob, _OBLOCK, kw).permute(0, 2, 1).contiguous()


_SCRATCH = threading.local()
_ONES: dict[torch.device, Tensor] = {}


def _sign(x: Tensor) -> Tensor:
    """float32 ±1 with the packing rule: +1 where ``x >= 0`` (``sign(0) = sign(-0.0) = +1``), -1
    elsewhere (NaN included). ``copysign`` of a NaN-free ``x + 0.0`` (which turns -0.0 into +0.0) is
    several times faster than ``torch.where(x >= 0, 1, -1)`` on CPU."""
    one = _ONES.get(x.device)
    if one is None:
        one = _ONES[x.device] = torch.ones((), device=x.device)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return torch.copysign(one, torch.nan_to_num(x, nan=-1.0).add_(0.0))


def _bucket(n: int) -> int:
    """Batch-size bucket: ``n`` rounded up to a power of two."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _time_impl(run: Callable[[], object], impl: str) -> float:
    """Seconds one call of ``run`` (implementation ``impl``) takes; the tests replace this hook to
    make autotuning deterministic."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()  # time the device work, not the launch
    t = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _triton_usable(x: Tensor) -> bool:
    """The Triton kernels of :mod:`flipnet.compress._triton` can run on ``x``'s device."""
    from . import _triton

    return _triton.usable_on(x.device)


def _check_impl(impl: str) -> str:
    impl = str(impl).lower()
    if impl not in IMPLS + ("triton", "auto"):
        raise ValueError(f"impl must be one of 'auto', 'c', 'torch', 'float', 'triton', got {impl!r}")
    return impl


def _scratch(words: int) -> Tensor:
    """A per-thread int64 buffer of at least ``words`` words for the C kernels' packed input and
    im2col matrix; reused across calls (and layers) so that each call does not page-fault fresh memory."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < words:
        buf = torch.empty(max(int(words), 1), dtype=torch.int64)
        _SCRATCH.buf = buf
    return buf


def _channels_last_only(x: Tensor) -> bool:
    """True for a 4-d tensor laid out channels last (NHWC) and not also plain contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


class _PackedBase(nn.Module):
    weight_words: Tensor
    scale: Tensor | None
    bias: Tensor | None
    _impl: str = "auto"

    # ------------------------------------------------------------------ implementation choice
    @property
    def impl(self) -> str:
        """``"auto"`` (pick by measurement) or the forced implementation ``"c"``, ``"torch"``, ``"float"``."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.__dict__["_impl"] = _check_impl(value)

    #: per-process caches (ctypes objects cannot be pickled; float weights are rebuilt on demand)
    _TRANSIENT = ("_cargs", "_c_calls", "_float_cache")

    def __getstate__(self) -> dict:  # type: ignore[type-arg]
        state = self.__dict__.copy()
        for k in self._TRANSIENT:
            state.pop(k, None)
        return state

    def _init_impl(self, impl: str) -> None:
        self.impl = impl
        #: choices made by autotuning: (batch bucket, *input size, layout, threads) → impl
        self.tuned: dict[tuple[int, ...], str] = {}

    def _resolve(self, x: Tensor, shape_key: tuple[int, ...]) -> str:
        """The implementation for input ``x``; ``shape_key[0]`` is the batch (row) count."""
        impl = self._impl
        if impl == "auto":
            impl = _kernels.mode()
        if impl == "auto":
            if not x.is_cpu and not _triton_usable(x):
                return "torch"
            key = (_bucket(shape_key[0]),) + shape_key[1:] + (torch.get_num_threads(),) + ((x.device.type,) if not x.is_cpu else ())
            choice = self.tuned.get(key)
            return choice if choice is not None else self._autotune(key, x)
        if impl == "c":
            if not x.is_cpu:
                return "torch"  # the C kernels are CPU-only
            if _kernels._LIB is None and _kernels.load_library() is None:
                raise _kernels.KernelBuildError(
                    "impl='c' needs the C kernels, which could not be built (or FLIPNET_KERNELS=torch disables them)"
                )
        if impl == "triton" and not _triton_usable(x):
            raise RuntimeError(f"impl='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU), got a {x.device.type} tensor")
        return impl

    def selected_impl(self, x: Tensor) -> str:
        """The implementation a call on ``x`` uses (autotuning first if that is still to do)."""
        with torch.no_grad():
            return self._resolve(x, self._shape_key(x))

    def _float_exact(self) -> bool:
        return True

    def _autotune(self, key: tuple[int, ...], x: Tensor) -> str:
        popcount = "triton" if not x.is_cpu else ("c" if _kernels.load_library() is not None else "torch")
        choice = popcount
        if self._float_exact():
            outs: dict[str, Tensor] = {}

            def call(c: str) -> None:
                outs[c] = self._run(c, x)

            with torch.no_grad():
                # first calls: warm-up (scratch growth, float weights, primitive creation) and the
                # exactness check; a float path 10x slower even here is not timed further
                first = {popcount: _time_impl(lambda: call(popcount), popcount)}
                try:
                    first["float"] = _time_impl(lambda: call("float"), "float")
                    ok = torch.equal(outs["float"], outs[popcount]) and first["float"] <= 10 * first[popcount]
                except RuntimeError:  # e.g. out of memory for the float weights
                    ok = False
                outs.clear()
                if ok:
                    cands = [popcount, "float"]
                    best = {c: math.inf for c in cands}
                    for r in range(AUTOTUNE_REPS):
                        for c in cands:
                            best[c] = min(best[c], _time_impl(lambda: self._run(c, x), c))
                        if r == 0:  # stop timing a candidate that is already far behind
                            fastest = min(best.values())
                            cands = [c for c in cands if best[c] <= 3 * fastest]
                            if len(cands) == 1:
                                break
                    choice = min(cands, key=best.__getitem__)
        self.tuned[key] = choice
        if choice != "float" and "float" not in self.tuned.values() and self._impl != "float":
            self.__dict__.pop("_float_cache", None)  # the float weights are 32x the packed ones
        return choice

    def _float_weight(self, device: torch.device) -> Tensor:
        """The ±1 weights as float32 (for ``impl="float"``), rebuilt when ``weight_words`` changes."""
        words = self._buffers["weight_words"]
        cached = self.__dict__.get("_float_cache")
        if cached is None or cached[0] is not words or cached[1] != words._version or cached[2] != device:
            cached = (words, words._version, device, self.signs().to(device))
            self.__dict__["_float_cache"] = cached
        return cached[3]

    def _shape_key(self, x: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _run(self, impl: str, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _init_affine(self, scale: Tensor | None, bias: Tensor | None, out: int) -> None:
        for name, t in (("scale", scale), ("bias", bias)):
            if t is not None:
                t = torch.as_tensor(t, dtype=torch.float32).detach().reshape(-1)
                if t.numel() != out:
                    raise ValueError(f"{name} must have {out} entries (one per output channel), got {t.numel()}")
            self.register_buffer(name, t)
        self._affine = scale is not None or bias is not None

    def _finish(self, y: Tensor) -> Tensor:
        if not self._affine:
            return y
        if self.scale is not None:
            y = y * _channel_view(self.scale, y.dim())
        if self.bias is not None:
            y = y + _channel_view(self.bias, y.dim())
        return y

    def _blocked(self) -> Tensor:
        """The weights in the C kernel's block layout, rebuilt when ``weight_words`` changes."""
        words = self._buffers["weight_words"]
        cached = self.__dict__.get("_blocked_cache")
        if cached is None or cached[0] is not words or cached[1] != words._version:
            cached = (words, words._version, _block_weights(words.reshape(words.shape[0], -1)))
            self.__dict__["_blocked_cache"] = cached
        return cached[2]



class PackedBinaryLinear(_PackedBase):
    r"""Dense layer on packed ±1 inputs and weights: :math:`y = K - 2\,\mathrm{popcount}(x \oplus w)`.

    The input is binarised with :math:`\mathrm{sign}` (``sign(0) = +1``), as a binary layer's
    ``ste_sign`` input quantizer does, then packed 64 per word. The output is float32 with
    integer values, times ``scale`` plus ``bias`` when given.

    Args:
        weight_words: ``(out_features, ceil(in_features/64))`` int64 words (:func:`pack_words`).
        in_features: number of input features ``K``.
        scale, bias: optional per-output-feature float tensors.
        impl: ``"auto"`` (pick by timing, per batch-size bucket), ``"c"``, ``"torch"`` or
            ``"float"`` (see the module docstring); also settable later as ``layer.impl``.
    """

    def __init__(self, weight_words: Tensor, in_features: int, scale: Tensor | None = None, bias: Tensor | None = None,
                 impl: str = "auto") -> None:
        super().__init__()
        if weight_words.dtype != torch.int64 or weight_words.dim() != 2:
            raise ValueError("weight_words must be a 2-d int64 tensor from pack_words(weight, dim=1)")
        if weight_words.shape[1] != packed_size(in_features, 64):
            raise ValueError(f"weight_words has {weight_words.shape[1]} words per row; in_features={in_features} needs {packed_size(in_features, 64)}")
        self.in_features = int(in_features)
        self.out_features = int(weight_words.shape[0])
        self.register_buffer("weight_words", weight_words.contiguous())
        self._init_affine(scale, bias, self.out_features)
        self._init_impl(impl)

    @classmethod
    def from_signs(cls, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None,
                   impl: str = "auto") -> "PackedBinaryLinear":
        """Build from a ``(out, in)`` ±1 weight."""
        check_binary(weight, "weight")
        return cls(pack_words(weight.detach().cpu(), dim=1), weight.shape[1], scale, bias, impl)

    @classmethod
    def from_binary(cls, layer: BinaryLinear) -> "PackedBinaryLinear":
        """Packed copy of a :class:`~flipnet.layers.BinaryLinear` with binary inputs."""
        if not layer.binary_inputs:
            raise ValueError("PackedBinaryLinear needs a layer with binary inputs; use BinaryWeightLinear for real inputs")
        alpha = layer.output_scale()
        return cls.from_signs(
            layer.binary_weight(),
            None if alpha is None else alpha.detach(),
            None if layer.bias is None else layer.bias.detach(),
        )

    def signs(self) -> Tensor:
        """The ±1 weight as float32 ``(out, in)``."""
        return unpack_words(self.weight_words, self.in_features, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got shape {tuple(x.shape)}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._run(self._resolve(x2, (x2.shape[0],)), x2)
        if self._affine:
            y = self._finish(y)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _shape_key(self, x: Tensor) -> tuple[int, ...]:
        return (x.reshape(-1, self.in_features).shape[0],)

    def _run(self, impl: str, x2: Tensor) -> Tensor:
        """``(N, in)`` → ``(N, out)`` integer sums, before scale and bias."""
        if impl == "c":
            return self._forward_c(x2)
        if impl == "float":
            return F.linear(_sign(x2), self._float_weight(x2.device))
        if impl == "triton":
            from . import _triton

            return _triton.linear(x2, self.weight_words, self.in_features)
        a = _pack_channels(x2)
        return _xnor_gemm_torch(a, self.weight_words.to(a.device), self.in_features)

    def _forward_c(self, x2: Tensor) -> Tensor:
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        n = x2.shape[0]
        y = torch.empty(n, self.out_features)
        if y.dtype != torch.float32:  # a changed default dtype
            y = y.float()
        # ready-made ctypes arguments (weight pointer, sizes), rebuilt when the weights change
        blocked = self._blocked()
        cargs = self.__dict__.get("_cargs")
        if cargs is None or cargs[0] is not blocked:
            lib = _kernels.load_library()
            cargs = (blocked, _kernels.fast_function(lib, "fn_linear"), ctypes.c_int64(self.in_features),
                     ctypes.c_void_p(blocked.data_ptr()), ctypes.c_int64(self.out_features))
            self.__dict__["_cargs"] = cargs
        rc = cargs[1](ctypes.c_void_p(x2.data_ptr()), ctypes.c_int64(n), cargs[2], cargs[3], cargs[4],
                      ctypes.c_void_p(y.data_ptr()), ctypes.c_int(torch.get_num_threads()))
        if rc != 0:
            raise MemoryError("PackedBinaryLinear: the C kernel could not allocate its scratch memory")
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale is not None}, bias={self.bias is not None}"


class PackedBinaryConv2d(_PackedBase):
    r"""2-D convolution on packed ±1 inputs and weights (XNOR-popcount), ``groups=1``.

    The input (``N, C, H, W``, real) is binarised with ``sign`` (``sign(0) = +1``) and packed per
    pixel along channels. The output is float32 ``(N, O, OH, OW)`` (channels-last memory on the C
    path) holding
    :math:`\sum a w` exactly (integers for pad values 0 and ±1), then times ``scale`` plus ``bias``.

    Args:
        weight_words: ``(O, KH, KW, ceil(C/64))`` int64 words: the ±1 weight packed along input
            channels (``pack_words(w.permute(0, 2, 3, 1), dim=-1)``).
        in_channels: ``C``.
        stride, dilation: as in :class:`torch.nn.Conv2d`.
        padding: ``(left, right, top, bottom)`` explicit padding, or an int / pair (symmetric),
            or ``"same"`` / ``"valid"``.
        pad_value: value of padded pixels (0, -1 or +1 are exact; others use a float correction).
        scale, bias: optional per-output-channel float tensors.
        impl: ``"auto"`` (pick by timing, per batch-size bucket and input size), ``"c"``,
            ``"torch"`` or ``"float"`` (see the module docstring); also settable as ``layer.impl``.
            Autotuning considers ``"float"`` only for pad values 0 and ±1.
    """

    def __init__(
        self,
        weight_words: Tensor,
        in_channels: int,
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        pad_value: float = 0.0,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if weight_words.dtype != torch.int64 or weight_words.dim() != 4:
            raise ValueError("weight_words must be a 4-d int64 tensor (O, KH, KW, ceil(C/64))")
        if weight_words.shape[3] != packed_size(in_channels, 64):
            raise ValueError(f"weight_words has {weight_words.shape[3]} words per tap; in_channels={in_channels} needs {packed_size(in_channels, 64)}")
        self.in_channels = int(in_channels)
        self.out_channels = int(weight_words.shape[0])
        self.kernel_size = (int(weight_words.shape[1]), int(weight_words.shape[2]))
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, (list, tuple)) and len(padding) == 4:
            pads = [int(p) for p in padding]
        else:
            pads = explicit_padding(padding, self.kernel_size, self.dilation, self.stride)  # type: ignore[arg-type]
        if any(p < 0 for p in pads):
            raise ValueError(f"padding must be non-negative, got {pads}")
        self.pads = tuple(pads)  # (left, right, top, bottom)
        self.pad_value = float(pad_value)
        self.register_buffer("weight_words", weight_words.contiguous())
        self._init_affine(scale, bias, self.out_channels)
        self._corr_cache: dict[tuple[int, int, str], Tensor | None] = {}
        self._init_impl(impl)

    @classmethod
    def from_signs(
        cls,
        weight: Tensor,
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        pad_value: float = 0.0,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
        impl: str = "auto",
    ) -> "PackedBinaryConv2d":
        """Build from an ``(O, C, KH, KW)`` ±1 weight."""
        check_binary(weight, "weight")
        words = pack_words(weight.detach().cpu().permute(0, 2, 3, 1), dim=-1)
        return cls(words, weight.shape[1], stride, padding, dilation, pad_value, scale, bias, impl)

    @classmethod
    def from_binary(cls, layer: BinaryConv2d) -> "PackedBinaryConv2d":
        """Packed copy of a :class:`~flipnet.layers.BinaryConv2d` with binary inputs, ``groups=1``
        and ``padding_mode='zeros'``."""
        if not layer.binary_inputs:
            raise ValueError("PackedBinaryConv2d needs a layer with binary inputs; use BinaryWeightConv for real inputs")
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("PackedBinaryConv2d supports groups=1 and padding_mode='zeros' only; use BinaryWeightConv")
        alpha = layer.output_scale()
        return cls.from_signs(
            layer.binary_weight(),
            layer.stride,
            explicit_padding(layer.padding, layer.kernel_size, layer.dilation, layer.stride),
            layer.dilation,
            layer.pad_value,
            None if alpha is None else alpha.detach(),
            None if layer.bias is None else layer.bias.detach(),
        )

    def signs(self) -> Tensor:
        """The ±1 weight as float32 ``(O, C, KH, KW)``."""
        return unpack_words(self.weight_words, self.in_channels, dim=-1).permute(0, 3, 1, 2).contiguous()

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        left, right, top, bottom = self.pads
        kh, kw = self.kernel_size
        oh = (h + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(f"input {h}x{w} is too small for kernel {self.kernel_size} with padding {self.pads}")
        return oh, ow

    def _correction(self, h: int, w: int, device: torch.device) -> Tensor | None:
        """``(pad_value + 1) * sum of w over out-of-bounds taps``, shape (O, OH, OW), or None."""
        if self.pad_value in (1.0, -1.0) or not any(self.pads):
            return None
        key = (h, w, str(device))
        if key not in self._corr_cache:
            ind = F.pad(torch.zeros(1, self.in_channels, h, w, device=device), list(self.pads), value=1.0)
            s = F.conv2d(ind, self.signs().to(device), None, self.stride, 0, self.dilation)
            self._corr_cache[key] = ((self.pad_value + 1.0) * s[0]).contiguous()
        return self._corr_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        y = self._run(self._resolve(x, self._shape_key(x)), x)
        return self._finish(y) if self._affine else y

    def _shape_key(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[0], x.shape[2], x.shape[3], int(_channels_last_only(x)))

    def _float_exact(self) -> bool:
        return self.pad_value in (0.0, 1.0, -1.0) or not any(self.pads)

    def _run(self, impl: str, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` → ``(N, O, OH, OW)`` sums, before scale and bias."""
        if impl == "c":
            return self._forward_c(x)
        if impl == "float":
            return self._forward_float(x)
        oh, ow = self.output_size(x.shape[2], x.shape[3])
        if impl == "triton":
            from . import _triton

            return _triton.conv2d(x, self.weight_words, kernel_size=self.kernel_size, stride=self.stride,
                                  dilation=self.dilation, pads=self.pads, out_size=(oh, ow),
                                  pad_words=_pad_words(self.in_channels) if self.pad_value == 1.0 else (0, 0),
                                  correction=self._correction(x.shape[2], x.shape[3], x.device))
        return self._forward_torch(x, oh, ow, self._correction(x.shape[2], x.shape[3], x.device))

    def _forward_float(self, x: Tensor) -> Tensor:
        self.output_size(x.shape[2], x.shape[3])  # the size check
        xs = _sign(x)
        w = self._float_weight(x.device)
        left, right, top, bottom = self.pads
        if self.pad_value == 0.0 and left == right and top == bottom:
            return F.conv2d(xs, w, None, self.stride, (top, left), self.dilation)
        if any(self.pads):
            xs = F.pad(xs, list(self.pads), value=self.pad_value)
        return F.conv2d(xs, w, None, self.stride, 0, self.dilation)

    def _c_call(self, n: int, h: int, w: int, in_nhwc: bool) -> tuple:  # type: ignore[type-arg]
        """Per input size: output size, scratch words and the ready-made ctypes arguments of
        ``fn_conv2d`` except the input, output and scratch pointers (cached)."""
        blocked = self._blocked()
        key = (n, h, w, in_nhwc)
        cache = self.__dict__.get("_c_calls")
        if cache is None or cache[0] is not blocked:
            cache = (blocked, {})
            self.__dict__["_c_calls"] = cache
        entry = cache[1].get(key)
        if entry is None:
            lib = _kernels.load_library()
            c = self.in_channels
            oh, ow = self.output_size(h, w)
            kh, kw = self.kernel_size
            left, _, top, _ = self.pads
            full, last = _pad_words(c) if self.pad_value == 1.0 else (0, 0)
            corr = self._correction(h, w, torch.device("cpu"))
            if corr is not None:  # the kernel writes channels last, so it wants the correction as (OH, OW, O)
                corr = corr.permute(1, 2, 0).contiguous()
            i64, vp = ctypes.c_int64, ctypes.c_void_p
            mid = tuple(i64(v) for v in (n, c, h, w)) + (vp(blocked.data_ptr()),) + tuple(
                i64(v) for v in (self.out_channels, kh, kw, self.stride[0], self.stride[1], top, left,
                                 self.dilation[0], self.dilation[1], oh, ow)
            ) + (ctypes.c_uint64(_to_u64(full)), ctypes.c_uint64(_to_u64(last)), vp(None if corr is None else corr.data_ptr()))
            words = int(lib.fn_conv2d_scratch(n, c, h, w, kh, kw, oh, ow))
            entry = (oh, ow, words, corr, _kernels.fast_function(lib, "fn_conv2d"), mid,
                     (ctypes.c_int(int(in_nhwc)), ctypes.c_int(1)))
            if len(cache[1]) > 64:
                cache[1].clear()
            cache[1][key] = entry
        return entry

    def _forward_c(self, x: Tensor) -> Tensor:
        in_nhwc = _channels_last_only(x)
        if in_nhwc:
            x = x if x.dtype == torch.float32 else x.to(torch.float32)
        elif x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        n, _, h, w = x.shape
        oh, ow, words, _corr, fn, mid, flags = self._c_call(n, h, w, in_nhwc)
        out = torch.empty(n, self.out_channels, oh, ow, dtype=torch.float32, memory_format=torch.channels_last)
        scratch = _scratch(words)
        vp = ctypes.c_void_p
        rc = fn(vp(x.data_ptr()), *mid, vp(out.data_ptr()), *flags, vp(scratch.data_ptr()),
                ctypes.c_int64(scratch.numel()), ctypes.c_int(torch.get_num_threads()))
        if rc != 0:
            raise MemoryError("PackedBinaryConv2d: the C kernel could not allocate its scratch memory")
        return out

    def _forward_torch(self, x: Tensor, oh: int, ow: int, corr: Tensor | None) -> Tensor:
        n, c, h, w = x.shape
        cw = packed_size(c, 64)
        kh, kw = self.kernel_size
        xp = _pack_channels(x)  # (N, H, W, Cw)
        left, right, top, bottom = self.pads
        full, last = _pad_words(c) if self.pad_value == 1.0 else (0, 0)
        padded = torch.empty(n, h + top + bottom, w + left + right, cw, dtype=torch.int64, device=x.device)
        padded[..., :-1] = full
        padded[..., -1] = last
        padded[:, top : top + h, left : left + w] = xp
        dh, dw = self.dilation
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        p = padded.unfold(1, span_h, self.stride[0]).unfold(2, span_w, self.stride[1])  # N,OH,OW,Cw,sh,sw
        p = p[:, :oh, :ow, :, ::dh, ::dw].permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * cw)
        wflat = self.weight_words.reshape(self.out_channels, -1).to(x.device)
        y = _xnor_gemm_torch(p, wflat, c * kh * kw).view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)
        if corr is not None:
            y = y + corr
        return y.contiguous()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"pads={self.pads}, dilation={self.dilation}, pad_value={self.pad_value:g}"
        )


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != 2 or any(i < 1 for i in t):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return t  # type: ignore[return-value]


class BinaryWeightConv(nn.Module):
    """Convolution (1-d or 2-d) with ±1 weights held as floats: for real inputs, ``groups > 1`` or
    non-zero padding modes. Reproduces :class:`~flipnet.layers.BinaryConv2d` /
    :class:`~flipnet.layers.BinaryConv1d` in eval mode; ``binarize_input`` applies ``sign`` to the
    input first (for binary-input layers the packed kernels do not cover)."""

    weight: Tensor

    def __init__(
        self,
        weight: Tensor,
        stride: Sequence[int],
        padding: Sequence[int] | int | str,
        dilation: Sequence[int],
        groups: int = 1,
        padding_mode: str = "zeros",
        pad_value: float = 0.0,
        binarize_input: bool = False,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_binary(weight, "weight")
        if weight.dim() not in (3, 4):
            raise ValueError(f"weight must be 3-d (conv1d) or 4-d (conv2d), got {weight.dim()}-d")
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous())
        nd = weight.dim() - 2
        self.stride = tuple(int(s) for s in stride)
        self.dilation = tuple(int(d) for d in dilation)
        self.padding = padding if isinstance(padding, str) else (tuple(int(p) for p in padding) if not isinstance(padding, int) else (padding,) * nd)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.pad_value = float(pad_value)
        self.binarize_input = bool(binarize_input)
        for name, t in (("scale", scale), ("bias", bias)):
            self.register_buffer(name, None if t is None else torch.as_tensor(t, dtype=torch.float32).detach().reshape(-1))

    @classmethod
    def from_binary(cls, layer: BinaryConv1d | BinaryConv2d) -> "BinaryWeightConv":
        alpha = layer.output_scale()
        return cls(
            layer.binary_weight(), layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode,
            layer.pad_value, layer.binary_inputs, None if alpha is None else alpha.detach(),
            None if layer.bias is None else layer.bias.detach(),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.binarize_input:
            x = sign(x)
        out = conv_nd(x, self.weight.to(x.dtype), None, stride=self.stride, padding=self.padding, dilation=self.dilation,
                      groups=self.groups, padding_mode=self.padding_mode, pad_value=self.pad_value)
        if self.scale is not None:
            out = out * _channel_view(self.scale, out.dim()).to(out.dtype)
        if self.bias is not None:
            out = out + _channel_view(self.bias, out.dim()).to(out.dtype)
        return out


class BinaryWeightLinear(nn.Module):
    """Dense layer with ±1 weights held as floats (real inputs, e.g. a first or last layer)."""

    weight: Tensor

    def __init__(self, weight: Tensor, binarize_input: bool = False, scale: Tensor | None = None, bias: Tensor | None = None) -> None:
        super().__init__()
        check_binary(weight, "weight")
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous())
        self.binarize_input = bool(binarize_input)
        for name, t in (("scale", scale), ("bias", bias)):
            self.register_buffer(name, None if t is None else torch.as_tensor(t, dtype=torch.float32).detach().reshape(-1))

    @classmethod
    def from_binary(cls, layer: BinaryLinear) -> "BinaryWeightLinear":
        alpha = layer.output_scale()
        return cls(layer.binary_weight(), layer.binary_inputs, None if alpha is None else alpha.detach(), None if layer.bias is None else layer.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.binarize_input:
            x = sign(x)
        out = F.linear(x, self.weight.to(x.dtype))
        if self.scale is not None:
            out = out * self.scale.to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


class ThresholdSign(nn.Module):
    r"""Per-channel integer threshold that replaces BatchNorm followed by ``sign``.

    ``out = +1`` where :math:`(y \ge t_c)` XOR :math:`\mathrm{flip}_c`, else :math:`-1`, for the
    channel :math:`c` along dim 1. See :func:`flipnet.compress.export.fold_bn_threshold` for how
    ``t`` and ``flip`` are derived from BatchNorm statistics.
    """

    threshold: Tensor
    flip: Tensor

    def __init__(self, threshold: Tensor, flip: Tensor) -> None:
        super().__init__()
        if threshold.shape != flip.shape or threshold.dim() != 1:
            raise ValueError("threshold and flip must be 1-d tensors of the same length")
        self.register_buffer("threshold", threshold.detach().to(torch.float32).contiguous())
        self.register_buffer("flip", flip.detach().to(torch.bool).contiguous())

    def forward(self, y: Tensor) -> Tensor:
        lib = _kernels.load_library() if y.is_cpu and y.dtype == torch.float32 and y.dim() >= 2 else None
        if lib is not None and y.shape[1] == self.threshold.numel():
            thr, flip = self._c_params()
            if _channels_last_only(y):
                out = torch.empty_like(y)  # keeps the channels-last layout
                lib.fn_threshold_nhwc(y.data_ptr(), y.shape[0] * y.shape[2] * y.shape[3], y.shape[1],
                                      thr.data_ptr(), flip.data_ptr(), out.data_ptr(), torch.get_num_threads())
                return out
            y = y.contiguous()
            out = torch.empty_like(y)
            hw = y[0, 0].numel() if y.shape[0] and y.shape[1] else 0
            lib.fn_threshold(y.data_ptr(), y.shape[0], y.shape[1], hw, thr.data_ptr(), flip.data_ptr(),
                             out.data_ptr(), torch.get_num_threads())
            return out
        t = _channel_view(self.threshold, y.dim()).to(y.dtype)
        f = _channel_view(self.flip, y.dim())
        one = torch.ones((), dtype=y.dtype, device=y.device)
        return torch.where((y >= t) ^ f, one, -one)

    def _c_params(self) -> tuple[Tensor, Tensor]:
        """float32 thresholds and uint8 flips for the C kernel, rebuilt when either buffer is replaced
        or changed in place (``load_state_dict``, ``.double()``)."""
        t, f = self.threshold, self.flip
        key = (t, t._version, f, f._version)
        cached = self.__dict__.get("_c_params_cache")
        if cached is None or any(a is not b if isinstance(a, Tensor) else a != b for a, b in zip(cached[0], key)):
            cached = (key, t.to(torch.float32).contiguous(), f.to(torch.uint8).contiguous())
            self.__dict__["_c_params_cache"] = cached
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}, flipped={int(self.flip.sum())}"



class MaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` whose CPU float32 forward uses a C kernel when it has no padding,
    dilation 1 and floor mode (PyTorch's channels-first max-pool is slow at batch 1). Same results,
    NaN included; any other configuration or device uses PyTorch."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        lib = _kernels.load_library() if x.is_cpu and x.dtype == torch.float32 and x.dim() == 4 else None
        if lib is None or self.return_indices or self.ceil_mode or self.padding not in (0, (0, 0)) \
                or self.dilation not in (1, (1, 1)):
            return super().forward(x)
        kh, kw = _pair(self.kernel_size, "kernel_size")
        sh, sw = _pair(self.stride if self.stride is not None else self.kernel_size, "stride")
        n, c, h, w = x.shape
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        if oh <= 0 or ow <= 0:
            return super().forward(x)
        if _channels_last_only(x):
            out = torch.empty(n, c, oh, ow, dtype=torch.float32, memory_format=torch.channels_last)
            lib.fn_maxpool2d_nhwc(x.data_ptr(), n, h, w, c, kh, kw, sh, sw, oh, ow, out.data_ptr(), torch.get_num_threads())
            return out
        x = x.contiguous()
        out = torch.empty(n, c, oh, ow, dtype=torch.float32)
        lib.fn_maxpool2d(x.data_ptr(), n, c, h, w, kh, kw, sh, sw, oh, ow, out.data_ptr(), torch.get_num_threads())
        return out
