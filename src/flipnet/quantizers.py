r"""Sign functions with surrogate gradients ("quantizers").

A quantizer maps a real tensor to a binary one in the forward pass and
replaces the (almost everywhere zero) derivative of the step function by a
surrogate in the backward pass. Every quantizer is available three ways,
mirroring larq:

* as a function: ``ste_sign(x, clip_value=1.0)``;
* as an :class:`torch.nn.Module`: ``SteSign(clip_value=1.0)``;
* by string alias: ``get_quantizer("ste_sign")``.

Conventions
-----------
``sign(0) = +1`` everywhere in flipnet, so that a binary tensor never holds a
zero. The surrogate gradients below are written for an upstream gradient
:math:`g = \partial L / \partial q(x)`.

===========================  ==============================  ===============================================
alias                        forward :math:`q(x)`             backward :math:`\partial L/\partial x`
===========================  ==============================  ===============================================
``ste_sign``                 :math:`\mathrm{sign}(x)`         :math:`g\cdot 1[|x|\le c]` (c = 1)
``approx_sign``              :math:`\mathrm{sign}(x)`         :math:`g\cdot \max(0, 2-2|x|)`
``swish_sign``               :math:`\mathrm{sign}(x)`         :math:`g\cdot \beta(2-\beta x\tanh(\beta x/2))/(1+\cosh(\beta x))` (β = 5)
``ste_heaviside``            :math:`1[x>0]` (0/1)             :math:`g\cdot 1[|x|\le c]` (c = 1)
``magnitude_aware_sign``     :math:`\bar{|x|}\,\mathrm{sign}(x)`   :math:`g\cdot \bar{|x|}\cdot 1[|x|\le c]` per output channel
``identity``                 :math:`x`                        :math:`g`
===========================  ==============================  ===============================================

References
----------
* Courbariaux et al. 2016, "Binarized Neural Networks" (straight-through estimator, ``ste_sign``).
* Liu et al. 2018, "Bi-Real Net" (``approx_sign``).
* Darabi et al. 2018, "BNN+: Improved binary network training" (``swish_sign``).
* Liu et al. 2018, Bi-Real Net, magnitude-aware gradient (``magnitude_aware_sign``).
* Rastegari et al. 2016, "XNOR-Net" and Zhang et al. 2018, "LQ-Nets" (weight scaling, see
  :mod:`flipnet.layers`).
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor, nn

__all__ = [
    "sign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "ste_heaviside",
    "magnitude_aware_sign",
    "identity",
    "Quantizer",
    "SteSign",
    "ApproxSign",
    "SwishSign",
    "SteHeaviside",
    "MagnitudeAwareSign",
    "Identity",
    "QUANTIZERS",
    "QuantizerLike",
    "get_quantizer",
    "quantizer_name",
]


def sign(x: Tensor) -> Tensor:
    """Sign with ``sign(0) = +1``; the result has the dtype of ``x`` and holds only ±1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _check_clip(clip_value: float | None) -> None:
    if clip_value is not None and not clip_value > 0:
        raise ValueError(f"clip_value must be a positive number or None (no clipping), got {clip_value!r}")


def _clip_mask(x: Tensor, clip_value: float | None) -> Tensor | None:
    if clip_value is None:
        return None
    return (x.abs() <= clip_value).to(x.dtype)


class _SteSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clip_value: float | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip_value = clip_value
        return sign(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        mask = _clip_mask(x, ctx.clip_value)
        return (g if mask is None else g * mask), None


def ste_sign(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    r"""Sign with the straight-through estimator.

    Forward: :math:`q(x) = +1` if :math:`x \ge 0` else :math:`-1`.

    Backward: :math:`\partial q/\partial x = 1[|x| \le c]` with ``clip_value`` :math:`c = 1`
    by default; ``clip_value=None`` passes the gradient through unchanged (the pure STE).

    Reference: Courbariaux et al. 2016, "Binarized Neural Networks".
    """
    _check_clip(clip_value)
    return _SteSignFn.apply(x, clip_value)


class _ApproxSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


def approx_sign(x: Tensor) -> Tensor:
    r"""Sign with Bi-Real Net's piecewise-polynomial gradient.

    The forward pass is :math:`\mathrm{sign}(x)`; the backward pass is the derivative of the
    piecewise quadratic :math:`F(x) = 2x + x^2` on :math:`[-1, 0)`, :math:`2x - x^2` on
    :math:`[0, 1)` and :math:`\pm 1` outside, i.e. :math:`\partial q/\partial x = \max(0, 2 - 2|x|)`.

    Reference: Liu et al. 2018, "Bi-Real Net: Enhancing the Performance of 1-bit CNNs".
    """
    return _ApproxSignFn.apply(x)


class _SwishSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.beta = beta
        return sign(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        b = ctx.beta
        bx = b * x
        grad = b * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))
        return g * grad, None


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    r"""Sign with the SignSwish gradient.

    Forward :math:`\mathrm{sign}(x)`; backward the derivative of
    :math:`SS_\beta(x) = 2\sigma(\beta x)(1 + \beta x(1 - \sigma(\beta x))) - 1`:

    .. math:: \frac{\partial q}{\partial x} = \frac{\beta\,(2 - \beta x \tanh(\beta x / 2))}{1 + \cosh(\beta x)}

    ``beta = 5`` by default. Reference: Darabi et al. 2018, "BNN+".
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    return _SwishSignFn.apply(x, float(beta))


class _SteHeavisideFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clip_value: float | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip_value = clip_value
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        mask = _clip_mask(x, ctx.clip_value)
        return (g if mask is None else g * mask), None


def ste_heaviside(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    r"""Heaviside step (0/1 output) with the straight-through estimator.

    Forward :math:`q(x) = 1[x > 0]`; backward :math:`1[|x| \le c]` (``clip_value`` c = 1).
    Used for binary activations in {0, 1} (e.g. in larq's ``ste_heaviside``).
    """
    _check_clip(clip_value)
    return _SteHeavisideFn.apply(x, clip_value)


def _channel_mean_abs(x: Tensor) -> Tensor:
    """Mean |x| over every dimension but the first (per output channel for weights)."""
    if x.dim() <= 1:
        return x.abs().mean().expand_as(x) if x.dim() == 1 else x.abs()
    dims = tuple(range(1, x.dim()))
    return x.abs().mean(dim=dims, keepdim=True)


def magnitude_aware_sign(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    r"""Magnitude-aware sign for weights (Bi-Real Net).

    Forward :math:`q(x) = \alpha\,\mathrm{sign}(x)` with :math:`\alpha = \mathrm{mean}|x|` per
    output channel (over every dimension but the first; the scalar mean for 1-D tensors). The
    scale is treated as a constant in the backward pass, which is the STE scaled by
    :math:`\alpha`: :math:`\partial q/\partial x = \alpha\,1[|x| \le c]`.

    Reference: Liu et al. 2018, "Bi-Real Net", section 3.3.
    """
    _check_clip(clip_value)
    alpha = _channel_mean_abs(x).detach()
    return alpha * ste_sign(x, clip_value)


def identity(x: Tensor) -> Tensor:
    """The identity: no quantization (full precision)."""
    return x


class Quantizer(nn.Module):
    """Base class of quantizer modules. Subclasses set :attr:`alias` and :attr:`precision`."""

    alias: str = ""
    #: bits per element of the output (32 for identity); used by :func:`flipnet.summary`.
    precision: int = 1

    def extra_repr(self) -> str:
        return ""


class SteSign(Quantizer):
    """Module form of :func:`ste_sign`."""

    alias = "ste_sign"

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__()
        _check_clip(clip_value)
        self.clip_value = clip_value

    def forward(self, x: Tensor) -> Tensor:
        return ste_sign(x, self.clip_value)

    def extra_repr(self) -> str:
        return f"clip_value={self.clip_value}"


class ApproxSign(Quantizer):
    """Module form of :func:`approx_sign`."""

    alias = "approx_sign"

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x)


class SwishSign(Quantizer):
    """Module form of :func:`swish_sign`."""

    alias = "swish_sign"

    def __init__(self, beta: float = 5.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta!r}")
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return swish_sign(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class SteHeaviside(Quantizer):
    """Module form of :func:`ste_heaviside`."""

    alias = "ste_heaviside"

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__()
        _check_clip(clip_value)
        self.clip_value = clip_value

    def forward(self, x: Tensor) -> Tensor:
        return ste_heaviside(x, self.clip_value)

    def extra_repr(self) -> str:
        return f"clip_value={self.clip_value}"


class MagnitudeAwareSign(Quantizer):
    """Module form of :func:`magnitude_aware_sign`."""

    alias = "magnitude_aware_sign"

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__()
        _check_clip(clip_value)
        self.clip_value = clip_value

    def forward(self, x: Tensor) -> Tensor:
        return magnitude_aware_sign(x, self.clip_value)

    def extra_repr(self) -> str:
        return f"clip_value={self.clip_value}"


class Identity(Quantizer):
    """Module form of :func:`identity` (full precision, 32 bits)."""

    alias = "identity"
    precision = 32

    def forward(self, x: Tensor) -> Tensor:
        return x


#: String aliases, as in larq. ``None`` and ``"identity"`` both mean full precision.
QUANTIZERS: dict[str, type[Quantizer]] = {
    cls.alias: cls
    for cls in (SteSign, ApproxSign, SwishSign, SteHeaviside, MagnitudeAwareSign, Identity)
}

QuantizerLike = Union[str, nn.Module, Callable[[Tensor], Tensor], None]


class _CallableQuantizer(Quantizer):
    alias = "custom"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


_FUNCTIONS: dict[Callable, str] = {
    ste_sign: "ste_sign",
    approx_sign: "approx_sign",
    swish_sign: "swish_sign",
    ste_heaviside: "ste_heaviside",
    magnitude_aware_sign: "magnitude_aware_sign",
    identity: "identity",
}


def get_quantizer(q: QuantizerLike) -> nn.Module:
    """Resolve a quantizer given by alias, module, function or ``None`` to an ``nn.Module``.

    ``None`` and ``"identity"`` give :class:`Identity`. Strings are looked up in
    :data:`QUANTIZERS`; an unknown alias raises ``ValueError`` listing the valid ones.
    Modules are returned as they are; plain callables are wrapped.
    """
    if q is None:
        return Identity()
    if isinstance(q, str):
        key = q.strip().lower()
        if key not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {q!r}; valid aliases: {', '.join(sorted(QUANTIZERS))}")
        return QUANTIZERS[key]()
    if isinstance(q, nn.Module):
        return q
    if q in _FUNCTIONS:
        return QUANTIZERS[_FUNCTIONS[q]]()
    if callable(q):
        return _CallableQuantizer(q)
    raise TypeError(f"a quantizer must be an alias string, an nn.Module, a callable or None, got {type(q).__name__}")


def quantizer_name(q: nn.Module) -> str:
    """The alias of a quantizer module (``"identity"`` for full precision, ``"custom"`` else)."""
    return getattr(q, "alias", "") or type(q).__name__


def is_binary_quantizer(q: nn.Module) -> bool:
    """True where the quantizer produces 1-bit values (anything but identity)."""
    return getattr(q, "precision", 32) == 1
