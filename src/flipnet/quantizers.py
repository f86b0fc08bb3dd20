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
* Liu et al. 2018, Bi-Real Net, magnitude-aware sign of the weights (``magnitude_aware_sign``).
* Rastegari et al. 2016, "XNOR-Net" and Zhang et al. 2018, "LQ-Nets" (weight scaling, see
  :mod:`flipnet.layers`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Union

import torch
from torch import Tensor, nn

from .functional import channel_mean_abs

#: The public surface. ``identity``, ``QuantizerLike``, ``quantizer_name`` and
#: ``is_binary_quantizer`` stay importable for the package's layers, converter and summaries.
__all__ = [
    "Quantizer",
    "SteSign",
    "ApproxSign",
    "SwishSign",
    "SteHeaviside",
    "MagnitudeAwareSign",
    "Identity",
    "QUANTIZERS",
    "get_quantizer",
    "sign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "ste_heaviside",
    "magnitude_aware_sign",
]


def sign(x: Tensor) -> Tensor:
    """Sign with ``sign(0) = +1``; the result has the dtype of ``x`` and holds only ±1."""
    # 0-d operands of x's dtype: one comparison and one select, no full-size ones tensors
    return torch.where(x >= 0, x.new_ones(()), x.new_full((), -1))


def _check_clip(clip_value: float | None) -> None:
    if clip_value is None:
        return
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)) or not clip_value > 0:
        raise ValueError(f"clip_value must be a positive number or None (no clipping), got {clip_value!r}")


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return float(beta)


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

    The surrogate gradient peaks at :math:`\beta` in 0 and changes sign at
    :math:`|x| \approx 2.4/\beta`; a larger ``beta`` approaches the STE without clipping.
    ``beta = 5`` by default. Reference: Darabi et al. 2018, "BNN+: Improved Binary Network
    Training".
    """
    return _SwishSignFn.apply(x, _check_beta(beta))


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


def magnitude_aware_sign(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    r"""Magnitude-aware sign for weights (Bi-Real Net).

    Forward :math:`q(x) = \alpha\,\mathrm{sign}(x)` with :math:`\alpha = \mathrm{mean}|x|` per
    slice along the first dimension (the output channel of a weight ``(out, in, *k)``; a 0-d or
    1-d tensor has one scalar :math:`\alpha`). The scale is a constant in the backward pass, so
    the gradient is the clipped STE scaled by :math:`\alpha`:
    :math:`\partial L/\partial x = g\,\alpha\,1[|x| \le c]` (``clip_value`` c = 1).

    The output is 1-bit up to one real factor per channel, which is how
    :mod:`flipnet.compress.summary` counts it (1-bit weights plus one float per channel).

    Reference: Liu et al. 2018, "Bi-Real Net: Enhancing the Performance of 1-bit CNNs with
    Improved Representational Capability and Advanced Training Algorithm", section 3.3.
    """
    _check_clip(clip_value)
    with torch.no_grad():
        if x.dim() <= 1:
            alpha = x.abs().mean().expand_as(x)
        else:
            alpha = channel_mean_abs(x).view((-1,) + (1,) * (x.dim() - 1))
    return alpha * _SteSignFn.apply(x, clip_value)


def identity(x: Tensor) -> Tensor:
    """The identity: no quantization (full precision)."""
    return x


class Quantizer(nn.Module):
    """Base class of quantizer modules. Subclasses set :attr:`alias` and :attr:`precision`.

    A quantizer module holds no parameters or state of its own here, so it can be shared,
    copied and pickled freely.
    """

    #: the string alias (key of :data:`QUANTIZERS`).
    alias: str = ""
    #: bits per element of the output (1 for the sign functions, 32 for identity); read by
    #: :func:`is_binary_quantizer` and :func:`flipnet.compress.summary.summary`.
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
        self.beta = _check_beta(beta)

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
    """Wraps a plain function; ``precision`` comes from the function's own ``precision``
    attribute where it has one, else it is 32 (a summary never counts unknown code as 1-bit)."""

    alias = "custom"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        bits = getattr(fn, "precision", 32)
        self.precision = int(bits) if isinstance(bits, int) and not isinstance(bits, bool) and bits > 0 else 32

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


def _normalise_alias(name: str) -> str:
    key = name.strip().replace("-", "_")
    if key in _CLASS_NAMES:
        return _CLASS_NAMES[key]
    return key.lower()


_CLASS_NAMES: dict[str, str] = {cls.__name__: alias for alias, cls in QUANTIZERS.items()}


def get_quantizer(q: QuantizerLike) -> nn.Module:
    """Resolve a quantizer given by alias, class name, module, function or ``None`` to a module.

    * ``None`` and ``"identity"`` give :class:`Identity` (full precision).
    * A string is an alias of :data:`QUANTIZERS` (``"ste_sign"``; case, surrounding spaces and
      ``-`` for ``_`` do not matter) or a class name (``"SteSign"``); anything else raises
      ``ValueError`` listing the valid aliases.
    * A module is returned as it is (not copied).
    * One of this module's functions, or a ``functools.partial`` of one with keyword arguments
      only (``partial(ste_sign, clip_value=0.5)``), gives the matching module with those
      arguments.
    * Any other callable is wrapped in a module; it counts as full precision (32 bits) in
      summaries unless it has an integer ``precision`` attribute (bits per output element).
      Lambdas cannot be pickled; prefer a module or a named function.
    """
    if q is None:
        return Identity()
    if isinstance(q, str):
        key = _normalise_alias(q)
        if key not in QUANTIZERS:
            raise ValueError(
                f"unknown quantizer {q!r}; valid aliases: {', '.join(sorted(QUANTIZERS))} (or None for full precision)"
            )
        return QUANTIZERS[key]()
    if isinstance(q, nn.Module):
        return q
    if isinstance(q, functools.partial) and not q.args and _known_function(q.func):
        return QUANTIZERS[_FUNCTIONS[q.func]](**q.keywords)
    if _known_function(q):
        return QUANTIZERS[_FUNCTIONS[q]]()  # type: ignore[index]
    if callable(q):
        return _CallableQuantizer(q)
    raise TypeError(
        f"a quantizer must be an alias string, an nn.Module, a callable or None, got {type(q).__name__}"
    )


def _known_function(fn: object) -> bool:
    try:
        return fn in _FUNCTIONS
    except TypeError:  # unhashable callable object
        return False


def quantizer_name(q: nn.Module) -> str:
    """The alias of a quantizer module: ``"ste_sign"``, ..., ``"identity"``, ``"custom"`` for a
    wrapped function, the class name for any other module."""
    return getattr(q, "alias", "") or type(q).__name__


def is_binary_quantizer(q: nn.Module) -> bool:
    """True where the quantizer's output is 1-bit: its ``precision`` attribute is 1.

    Every sign quantizer here is 1-bit; :class:`Identity`, wrapped functions without a
    ``precision`` attribute and modules that are not :class:`Quantizer` count as 32-bit.
    """
    return getattr(q, "precision", 32) == 1
