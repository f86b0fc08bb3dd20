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
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv_nd", "channel_mean_abs", "explicit_padding", "PADDING_MODES"]

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
