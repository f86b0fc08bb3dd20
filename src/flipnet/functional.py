r"""Small kernels shared by the layers, the float twins and packed inference.

Every copy of these computations in flipnet calls this module, so that a binary layer, its float
twin and its packed replacement pad and scale in exactly the same way.

Convolution with a padding value
--------------------------------
:func:`conv_nd` is :func:`torch.nn.functional.conv1d` / :func:`~torch.nn.functional.conv2d` with
two additions that binary networks need:

* ``pad_value``: the padded border holds :math:`v` instead of 0. Zero is not a binary value,
  so a binary network that pads with 0 feeds its next layer a third symbol; larq's
  ``pad_values=1.0`` pads with +1 instead. With padding :math:`p` (left/right per spatial
  dimension, from :func:`explicit_padding`) the result is

  .. math:: y = W \ast \mathrm{pad}_v(x) + b,\qquad
            \mathrm{pad}_v(x)_{i} = \begin{cases} x_{i - p} & \text{inside} \\ v & \text{outside} \end{cases}

  so the border taps contribute :math:`v \sum_{\text{outside taps}} W`.
* ``padding_mode`` (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``), as in
  :class:`torch.nn.Conv2d`; a non-zero ``pad_value`` needs ``"zeros"``.

``padding="same"`` puts an odd pixel on the right/bottom, as TensorFlow, larq and PyTorch do.

Per-channel mean magnitude
--------------------------
:func:`channel_mean_abs` is :math:`\alpha_c = \frac{1}{n}\sum_i |W_{c,i}|` over every dimension but
the first (the output channel), shape ``(out,)``: XNOR-Net's scale (Rastegari et al. 2016), the
initial value of a learnable scale, and Bi-Real Net's magnitude-aware sign (Liu et al. 2018).

Exact integer kernels for binary-by-binary layers
-------------------------------------------------
:func:`conv_nd_int8` and :func:`linear_int8` compute :math:`y = W \ast x` for inputs and weights
holding only -1, 0 or +1 as int8 matrix products with int32 sums (:func:`torch._int_mm`, the
CPU's VNNI/AMX-INT8 units): every product is exact and so is every sum, whatever its size, so
the float32 result equals the fp32 convolution bit for bit. A bf16 convolution rounds its
*output* to 8 significant bits, i.e. binary sums above 256 in magnitude (a 3×3 convolution over
128 channels sums 1,152 terms). The convolution is an im2col product on channels-last data:
:math:`\mathrm{cols}(x)_{(n,h,w),(i,j,c)} = \mathrm{pad}_v(x)_{n,c,sh+di,sw+dj}` times the
weight reshaped to :math:`(k_h k_w C) \times O`.

Their backward pass is a real computation (the incoming gradient :math:`g` is not binary):
:math:`\partial L/\partial x = g \star W` and :math:`\partial L/\partial W = x \star g`, run by
PyTorch's own convolution backward (or two matrix products) in ``grad_dtype``. With bf16 (the
default) the products of :math:`g` and ±1 are exact, the sums accumulate in fp32 inside oneDNN,
and two roundings remain: :math:`g` to bf16 (relative error :math:`\le 2^{-8}`) and the result to
bf16 (:math:`\le 2^{-8}`). ``grad_dtype=torch.float32`` gives the fp32 backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv_nd", "channel_mean_abs", "explicit_padding", "conv_nd_int8", "linear_int8", "PADDING_MODES"]

#: Values of ``padding_mode`` accepted by :func:`conv_nd` (those of :class:`torch.nn.Conv2d`).
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")

_CONV = {1: F.conv1d, 2: F.conv2d}


def _tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return out


def explicit_padding(
    padding: str | int | Sequence[int],
    kernel_size: Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
) -> list[int]:
    r"""A convolution's ``padding`` (``"same"``, ``"valid"``, an int or a tuple) in :func:`F.pad` order.

    Returns ``[left, right]`` pairs, the last spatial dimension first (``[left, right, top,
    bottom]`` in 2-D). ``"same"`` pads :math:`d (k - 1)` in total per dimension, the odd pixel on
    the right, as TensorFlow/larq do. ``stride`` is accepted for symmetry with the layers' own
    attributes; "same" with a stride other than 1 is refused by PyTorch's layers before this
    is reached.

    Example:
        >>> explicit_padding("same", (2, 4))
        [1, 2, 0, 1]
    """
    del stride  # the amount of padding does not depend on it for the modes accepted here
    n = len(kernel_size)
    dil = _tuple(dilation, n, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            per_dim = [(0, 0)] * n
        elif padding == "same":
            per_dim = []
            for k, d in zip(kernel_size, dil):
                total = d * (k - 1)
                per_dim.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    else:
        per_dim = [(p, p) for p in _tuple(padding, n, "padding")]
    flat: list[int] = []
    for left, right in reversed(per_dim):
        flat += [left, right]
    return flat


def conv_nd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    pad_value: float = 0.0,
) -> Tensor:
    r"""1-D or 2-D convolution (by ``weight.dim()``: 3 or 4) whose padding holds ``pad_value``.

    :math:`y = W \ast \mathrm{pad}(x) + b`, where ``pad`` is zero padding (the default),
    padding with the constant ``pad_value`` (binary networks use -1 or +1 to keep the input
    binary), or ``padding_mode`` ``"reflect"``/``"replicate"``/``"circular"``. Arguments are those
    of :func:`torch.nn.functional.conv2d` plus ``padding_mode`` and ``pad_value`` (default 0:
    exactly :func:`F.conv2d`).

    Raises:
        ValueError: a ``weight`` that is not 3-D or 4-D, an unknown ``padding_mode``, or a
            non-zero ``pad_value`` with a ``padding_mode`` other than ``"zeros"``.
    """
    conv = _CONV.get(weight.dim() - 2)
    if conv is None:
        raise ValueError(f"conv_nd needs a 3-D (1-d conv) or 4-D (2-d conv) weight, got shape {tuple(weight.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if padding_mode == "zeros" and pad_value == 0.0:
        return conv(x, weight, bias, stride, padding, dilation, groups)  # type: ignore[arg-type]
    if pad_value != 0.0 and padding_mode != "zeros":
        raise ValueError(f"pad_value={pad_value:g} needs padding_mode='zeros' (got {padding_mode!r})")
    pads = explicit_padding(padding, weight.shape[2:], dilation)
    if not any(pads):
        return conv(x, weight, bias, stride, 0, dilation, groups)  # type: ignore[arg-type]
    if padding_mode == "zeros":
        x = F.pad(x, pads, value=float(pad_value))
    else:
        x = F.pad(x, pads, mode=padding_mode)
    return conv(x, weight, bias, stride, 0, dilation, groups)  # type: ignore[arg-type]


def channel_mean_abs(w: Tensor) -> Tensor:
    r"""Per-output-channel mean magnitude :math:`\alpha_c = \mathrm{mean}_i |W_{c,i}|`, shape ``(out,)``.

    The mean runs over every dimension but the first: a convolution weight ``(out, in, *k)`` or a
    dense weight ``(out, in)`` gives one value per output channel; a 1-D tensor gives its own
    magnitudes. The gradient flows (:math:`\partial\alpha_c/\partial W_{ci} = \mathrm{sign}(W_{ci})/n`);
    call ``.detach()`` where a constant is wanted. Reshape with ``.view(-1, 1, ...)`` to broadcast.

    Raises:
        ValueError: for a 0-d tensor (it has no channel dimension).
    """
    if w.dim() == 0:
        raise ValueError("channel_mean_abs needs a tensor with a channel dimension, got a 0-d tensor")
    if w.dim() == 1:
        return w.abs()
    return w.abs().flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------- int8 kernels
def _im2col_nhwc(xp: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                 out_hw: tuple[int, int]) -> Tensor:
    """Rows ``(n, h, w)``, columns ``(i, j, c)`` of a padded NHWC tensor, as one contiguous matrix."""
    n, _, _, c = xp.shape
    s = xp.stride()
    view = xp.as_strided(
        (n, out_hw[0], out_hw[1], kernel[0], kernel[1], c),
        (s[0], stride[0] * s[1], stride[1] * s[2], dilation[0] * s[1], dilation[1] * s[2], s[3]),
    )
    return view.reshape(n * out_hw[0] * out_hw[1], kernel[0] * kernel[1] * c)


class _Int8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: tuple[int, int], pads: list[int],  # type: ignore[override]
                dilation: tuple[int, int], pad_value: float, grad_dtype: torch.dtype) -> Tensor:
        n, c, _, _ = x.shape
        o, _, kh, kw = weight.shape
        xi = x.detach().permute(0, 2, 3, 1).to(torch.int8)  # NHWC (a free view for channels-last x)
        xp = F.pad(xi, [0, 0] + pads, value=int(pad_value)) if any(pads) else xi
        xp = xp.contiguous()
        hp, wp = xp.shape[1], xp.shape[2]
        ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        cols = _im2col_nhwc(xp, (kh, kw), stride, dilation, (ho, wo))
        wi = weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * c, o).to(torch.int8)
        out = torch._int_mm(cols, wi).to(torch.float32)
        ctx.save_for_backward(xi, weight)
        ctx.conf = (stride, pads, dilation, float(pad_value), grad_dtype, x.dtype)
        # (N*Ho*Wo, O) is NHWC: hand it out as an NCHW tensor in channels-last memory format
        return out.view(n, ho, wo, o).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xi, weight = ctx.saved_tensors
        stride, pads, dilation, pad_value, grad_dtype, x_dtype = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fmt = torch.channels_last
        x = xi.permute(0, 3, 1, 2).to(grad_dtype)
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        if pad_value != 0.0 or not symmetric:
            x = F.pad(x, pads, value=pad_value)
            padding = [0, 0]
        else:
            padding = [pads[2], pads[0]]
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g.to(grad_dtype).contiguous(memory_format=fmt), x.contiguous(memory_format=fmt),
            weight.detach().to(grad_dtype).contiguous(memory_format=fmt), None,
            list(stride), padding, list(dilation), False, [0, 0], 1, [need_x, need_w, False],
        )
        if need_x:
            if padding == [0, 0] and any(pads):
                gx = gx[:, :, pads[2]:gx.shape[2] - pads[3], pads[0]:gx.shape[3] - pads[1]]
            gx = gx.to(x_dtype)
        if need_w:
            gw = gw.to(weight.dtype)
        return gx, gw, None, None, None, None, None


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, grad_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        xi = x.detach().reshape(-1, x.shape[-1]).to(torch.int8)
        out = torch._int_mm(xi, weight.detach().t().to(torch.int8)).to(torch.float32)
        ctx.save_for_backward(xi, weight)
        ctx.conf = (grad_dtype, x.dtype, x.shape)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xi, weight = ctx.saved_tensors
        grad_dtype, x_dtype, x_shape = ctx.conf
        g2 = g.reshape(-1, g.shape[-1]).to(grad_dtype)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight.detach().to(grad_dtype)).to(x_dtype).view(x_shape)
        if ctx.needs_input_grad[1]:
            gw = (g2.t() @ xi.to(grad_dtype)).to(weight.dtype)
        return gx, gw, None


def _check_int8_operands(x: Tensor, weight: Tensor) -> None:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("the int8 kernels run on the CPU (torch._int_mm); use conv_nd / F.linear on other devices")


def conv_nd_int8(
    x: Tensor,
    weight: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    pad_value: float = 0.0,
    grad_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""Exact convolution of a {-1, 0, +1} input with a {-1, 0, +1} weight: int8 products, int32 sums.

    Equals ``conv_nd(x, weight, stride=..., padding=..., dilation=..., pad_value=...)`` in fp32 bit
    for bit (float32 output; :math:`|y| \le k_h k_w C < 2^{24}`); ``groups=1`` and zero padding
    mode only, ``pad_value`` in {-1, 0, +1}. The values are *not* checked (that would cost a pass
    over the data): an input or weight with other values gives wrong results; the binary layers
    only call this for sign quantizers and flip-mode or sign-quantized weights. 1-D convolutions
    run as 2-D ones of height 1. The backward pass runs in ``grad_dtype`` (see the module notes).
    CPU only.
    """
    _check_int8_operands(x, weight)
    if pad_value not in (-1.0, 0.0, 1.0):
        raise ValueError(f"conv_nd_int8 pads with -1, 0 or +1 only (int8 exact), got pad_value={pad_value!r}")
    one_d = weight.dim() == 3
    if weight.dim() not in (3, 4) or x.dim() != weight.dim():
        raise ValueError(
            f"conv_nd_int8 needs a batched input and a 3-D or 4-D weight of the same rank, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    n_sp = weight.dim() - 2
    pads = explicit_padding(padding, weight.shape[2:], dilation)
    st, dil = _tuple(stride, n_sp, "stride"), _tuple(dilation, n_sp, "dilation")
    if one_d:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
        pads, st, dil = pads + [0, 0], (1,) + st, (1,) + dil
    out = _Int8Conv2d.apply(x, weight, st, pads, dil, float(pad_value), grad_dtype)
    return out.squeeze(2) if one_d else out


def linear_int8(x: Tensor, weight: Tensor, *, grad_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    r"""Exact ``F.linear(x, weight)`` for {-1, 0, +1} inputs and weights: int8 products, int32 sums.

    float32 output, equal to the fp32 product bit for bit (``in_features < 2**24``); values are not
    checked (see :func:`conv_nd_int8`). The backward pass is two matrix products in ``grad_dtype``.
    CPU only.
    """
    _check_int8_operands(x, weight)
    return _Int8Linear.apply(x, weight, grad_dtype)
