r"""Binary layers: :class:`BinaryConv2d`, :class:`BinaryConv1d` and :class:`BinaryLinear`.

A binary layer computes

.. math:: y = \alpha \odot \big(q_w(W) \ast q_x(x)\big) + b

where :math:`q_x` is the ``input_quantizer`` (``None``: real inputs, e.g. the first layer of
a network), :math:`q_w` the ``weight_quantizer`` and :math:`\alpha` an optional per-output-channel
scale (``scale``). Padding uses ``pad_value`` instead of 0 when asked, since 0 is not a binary
value (larq's ``pad_values``).

Weight modes (per layer)
------------------------
``weight_mode="latent"`` (default)
    ``weight`` is a real tensor (the "latent weight"); the forward pass binarises it with the
    weight quantizer and the straight-through estimator carries the gradient back to it. Train it
    with Adam or SGD; ``weight_clip`` (larq's ``weight_clip`` constraint) clamps it to
    :math:`[-c, c]` after every optimizer step (:func:`apply_constraints`, or the routing optimizer).
``weight_mode="flip"``
    ``weight`` holds exactly ±1 and is used as it is. Flip optimizers (:class:`flipnet.optim.Bop`,
    :class:`~flipnet.optim.Bop2ndOrder`, :class:`~flipnet.optim.CEMA`) update it by flipping signs,
    following Helwegen et al. 2019, "Latent Weights Do Not Exist: Rethinking Binarized Neural
    Network Optimization". The weight mode is saved in the state dict (as extra state) and
    restored on loading; loading a weight that is not exactly ±1 in flip mode raises
    ``ValueError`` (build the model in latent mode, load, then :func:`set_weight_mode`).

Layers that keep real weights (``weight_quantizer=None``, binary inputs only) are binary layers
whose weight is not a binary parameter: :func:`binary_parameters` leaves it out and flip mode is
refused for them.

Scaling (``scale``)
-------------------
``"none"`` (default)
    :math:`\alpha = 1`.
``"xnor"``
    :math:`\alpha_c = \mathrm{mean}\,|W_c|`, the per-output-channel mean magnitude of the latent
    weight (Rastegari et al. 2016, XNOR-Net). Latent mode only: in flip mode :math:`|W| = 1`.
``"learnable"``
    :math:`\alpha` is a trainable per-channel parameter (``layer.scale``), initialised to
    :math:`\mathrm{mean}\,|W_c|` of the initial weight: the latent weight in latent mode, hence 1
    in flip mode (:meth:`BinaryLayer.reset_scale` re-initialises it). Trained with the real
    parameters, in the spirit of Zhang et al. 2018, "LQ-Nets: Learned Quantization for Highly
    Accurate and Compact Deep Neural Networks" (one learned basis coefficient per channel).

Since the scale multiplies the output channel, it is applied to the convolution output, which
is exactly :math:`(\alpha\,\mathrm{sign}(W)) \ast x`.

Exact int8 forward (``int8_forward``)
-------------------------------------
With ``layer.int8_forward = True`` (set for a whole model by ``train.precision=int8``, see
:class:`flipnet.train.fast.Precision`) a layer whose inputs *and* weights are signs computes
:math:`q_w(W) \ast q_x(x)` on the CPU as an int8 matrix product with int32 sums
(:func:`flipnet.functional.conv_nd_int8`): exact, equal to the fp32 result, and not rounded by
bf16 autocast. It applies where the input quantizer is ``ste_sign``, ``approx_sign``,
``swish_sign`` or ``ste_heaviside``, the weight is in flip mode or quantized by one of those
(not ``magnitude_aware_sign``, not parametrized), ``groups=1``, ``padding_mode='zeros'``,
``pad_value`` in {-1, 0, +1} and the input is a batch on the CPU; any other layer or call runs
the float path unchanged. The backward pass runs in bf16 (``int8_grad_dtype``).
"""

from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .functional import channel_mean_abs, conv_nd, conv_nd_int8, linear_int8
from .quantizers import (
    ApproxSign,
    QuantizerLike,
    SteHeaviside,
    SteSign,
    SwishSign,
    get_quantizer,
    is_binary_quantizer,
    quantizer_name,
    sign,
)

#: The public surface; ``WEIGHT_MODES`` and ``SCALES`` (the valid option values) stay importable for
#: the package's own validation.
__all__ = [
    "BinaryLayer",
    "BinaryConv1d",
    "BinaryConv2d",
    "BinaryLinear",
    "binary_modules",
    "binary_parameters",
    "named_binary_parameters",
    "real_parameters",
    "named_real_parameters",
    "apply_constraints",
    "set_weight_mode",
]

WeightMode = Literal["latent", "flip"]
Scale = Literal["none", "xnor", "learnable"]
WEIGHT_MODES: tuple[str, ...] = ("latent", "flip")
# Quantizers whose outputs are exactly -1, 0 or +1 (int8-exact); magnitude_aware_sign scales them.
_SIGN_VALUED = (SteSign, ApproxSign, SwishSign, SteHeaviside)
SCALES: tuple[str, ...] = ("none", "xnor", "learnable")


class BinaryLayer(nn.Module):
    """Behaviour shared by every binary layer (use the concrete classes).

    Attributes:
        input_quantizer: module applied to the input (``Identity`` for real inputs).
        weight_quantizer: module applied to latent weights (unused in flip mode).
        weight_mode: ``"latent"`` or ``"flip"``.
        scale_mode: ``"none"``, ``"xnor"`` or ``"learnable"``.
        scale: the learnable per-output-channel scale (``scale_mode="learnable"``), else ``None``.
        weight_clip: clip value of latent weights, or ``None``.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    scale: nn.Parameter | None
    #: compute the forward product as an exact int8 GEMM where the layer allows it (module notes).
    int8_forward: bool = False
    #: dtype of the backward products of the int8 path (bf16: exact products, rounded results).
    int8_grad_dtype: torch.dtype = torch.bfloat16

    def _init_binary(
        self,
        input_quantizer: QuantizerLike,
        weight_quantizer: QuantizerLike,
        weight_mode: str,
        scale: str,
        weight_clip: float | None,
    ) -> None:
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if weight_clip is not None and (
            isinstance(weight_clip, bool)
            or not isinstance(weight_clip, (int, float))
            or not (weight_clip > 0 and math.isfinite(weight_clip))
        ):
            raise ValueError(f"weight_clip must be a positive finite number or None, got {weight_clip!r}")
        if scale == "xnor" and weight_mode == "flip":
            raise ValueError(
                "scale='xnor' needs latent weights (mean |W| of ±1 weights is 1); "
                "use weight_mode='latent' or scale='learnable'"
            )
        self.input_quantizer = get_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)
        if weight_mode == "flip" and not is_binary_quantizer(self.weight_quantizer):
            raise ValueError(
                "weight_mode='flip' needs binary weights but the weight quantizer "
                f"{quantizer_name(self.weight_quantizer)!r} is not 1-bit; pass weight_quantizer='ste_sign' "
                "or use weight_mode='latent'"
            )
        self.weight_mode: str = weight_mode
        self.scale_mode: str = scale
        self.weight_clip = None if weight_clip is None else float(weight_clip)
        if weight_mode == "flip":
            with torch.no_grad():
                self.weight.copy_(sign(self.weight))
        elif self.weight_clip is not None:
            with torch.no_grad():
                self.weight.clamp_(-self.weight_clip, self.weight_clip)
        if scale == "learnable":
            self.scale = nn.Parameter(channel_mean_abs(self.weight.detach()))
        else:
            self.register_parameter("scale", None)

    # ------------------------------------------------------------------ weights
    @property
    def binary_inputs(self) -> bool:
        """True where the input quantizer produces 1-bit values."""
        return is_binary_quantizer(self.input_quantizer)

    @property
    def has_binary_weight(self) -> bool:
        """True where the forward pass uses 1-bit weights: flip mode, or a 1-bit weight quantizer.

        A layer with ``weight_quantizer=None`` (real weights, e.g. binary activations only) is
        a binary layer whose weight is *not* a binary parameter.
        """
        return self.weight_mode == "flip" or is_binary_quantizer(self.weight_quantizer)

    def quantized_weight(self) -> Tensor:
        """The weight used by the forward pass, without the output scale."""
        if self.weight_mode == "flip":
            return self.weight
        return self.weight_quantizer(self.weight)

    def binary_weight(self) -> Tensor:
        """The ±1 signs of the weight (no gradient), whatever the mode."""
        return sign(self.weight.detach())

    def output_scale(self) -> Tensor | None:
        r"""Per-output-channel :math:`\alpha` of shape ``(out,)``, or ``None`` for ``scale='none'``.

        For ``"xnor"`` it is computed from the latent weight on every call and the gradient
        flows through it, as in XNOR-Net (:math:`\partial\alpha_c/\partial W_{ci} =
        \mathrm{sign}(W_{ci})/n`).
        """
        if self.scale_mode == "xnor":
            return channel_mean_abs(self.weight)
        if self.scale_mode == "learnable":
            return self.scale
        return None

    @torch.no_grad()
    def reset_scale(self, weight: Tensor | None = None) -> None:
        """Set the learnable scale to the per-channel mean |W| of ``weight`` (default: own weight).

        In flip mode the own weight is ±1, so the scale becomes 1; :func:`flipnet.convert.binarize`
        passes the float weight it converts so that the output magnitude is kept.
        """
        if self.scale is None:
            raise ValueError(f"{type(self).__name__} has no learnable scale; construct it with scale='learnable'")
        source = self.weight if weight is None else weight
        if source.shape != self.weight.shape:
            raise ValueError(
                f"weight of shape {tuple(source.shape)} does not match the layer's {tuple(self.weight.shape)}"
            )
        self.scale.copy_(channel_mean_abs(source.detach()).to(self.scale))

    def _channel_view(self, t: Tensor, out: Tensor) -> Tensor:
        return t.to(out.dtype)

    def _int8_applies(self, x: Tensor) -> bool:
        """True where this call may use the exact int8 product (see the module notes)."""
        return (
            self.int8_forward
            and x.device.type == "cpu"
            and isinstance(self.input_quantizer, _SIGN_VALUED)
            and (self.weight_mode == "flip" or isinstance(self.weight_quantizer, _SIGN_VALUED))
            and not parametrize.is_parametrized(self, "weight")
        )

    def _finish(self, out: Tensor) -> Tensor:
        alpha = self.output_scale()
        if alpha is not None:
            out = out * self._channel_view(alpha, out)
        if self.bias is not None:
            out = out + self._channel_view(self.bias, out)
        return out

    @torch.no_grad()
    def apply_constraint(self) -> None:
        """Clamp latent weights to ``[-weight_clip, weight_clip]`` (no-op otherwise)."""
        if self.weight_mode == "latent" and self.weight_clip is not None:
            _weight_parameter(self).clamp_(-self.weight_clip, self.weight_clip)

    @torch.no_grad()
    def set_weight_mode(self, mode: str) -> None:
        """Switch between ``"latent"`` and ``"flip"``; going to flip replaces the weight by its signs.

        Going back to latent keeps the ±1 values as latent weights. The weight quantizer is not
        used in flip mode (a ``magnitude_aware_sign`` factor is dropped; use
        ``scale='learnable'`` to keep a magnitude).
        """
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")
        if mode == "flip" and self.scale_mode == "xnor":
            raise ValueError("scale='xnor' needs latent weights; cannot switch this layer to flip mode")
        if mode == "flip" and not is_binary_quantizer(self.weight_quantizer):
            raise ValueError(
                f"this {type(self).__name__} keeps real weights (weight quantizer "
                f"{quantizer_name(self.weight_quantizer)!r}); it cannot be put in flip mode"
            )
        if mode == "flip":
            w = _weight_parameter(self)
            w.copy_(sign(w))
        self.weight_mode = mode

    def check_binary(self) -> None:
        """Raise ``ValueError`` if a flip-mode weight holds anything but ±1."""
        if self.weight_mode == "flip" and not bool((self.weight.detach().abs() == 1).all()):
            raise ValueError(
                f"{type(self).__name__} in flip mode holds non-binary weights; "
                "flip-mode weights must be exactly ±1 (use set_weight_mode('flip') to binarise)"
            )

    # ------------------------------------------------------------ persistence
    # The weight mode travels with the state dict as "extra state" (key ``<prefix>_extra_state``,
    # a dict ``{"weight_mode": ...}``), so a checkpoint restores the mode it was saved in. The
    # key is optional when loading: a state dict of a plain nn.Conv2d/nn.Linear loads strictly.
    def get_extra_state(self) -> dict:
        """``{"weight_mode": mode}``, stored in the state dict."""
        return {"weight_mode": self.weight_mode}

    def set_extra_state(self, state: dict) -> None:
        """Restore the weight mode saved by :meth:`get_extra_state` (other keys are ignored)."""
        mode = state.get("weight_mode", self.weight_mode) if isinstance(state, dict) else self.weight_mode
        if mode not in WEIGHT_MODES:
            raise ValueError(f"the state dict holds an unknown weight_mode {mode!r}; expected one of {WEIGHT_MODES}")
        if mode == "flip" and self.scale_mode == "xnor":
            raise ValueError(
                "the state dict is in flip mode but this layer uses scale='xnor', which needs latent weights; "
                "build the layer with scale='learnable' or 'none'"
            )
        self.weight_mode = mode
        self.check_binary()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A flip-mode weight must stay exactly ±1: refuse real weights before anything is copied.
        extra_key = prefix + "_extra_state"
        extra = state_dict.get(extra_key)
        mode = extra.get("weight_mode", self.weight_mode) if isinstance(extra, dict) else self.weight_mode
        incoming = state_dict.get(prefix + "weight")
        if mode == "flip" and isinstance(incoming, Tensor) and not bool((incoming.detach().abs() == 1).all()):
            name = prefix[:-1] or type(self).__name__
            raise ValueError(
                f"layer {name!r} loads in flip mode but the state dict's weight holds values other "
                "than ±1; load it into a model built with weight_mode='latent' and then call "
                "flipnet.set_weight_mode(model, 'flip') to binarise it"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if extra_key not in state_dict and extra_key in missing_keys:
            missing_keys.remove(extra_key)

    def _binary_repr(self) -> str:
        parts = [
            f"input_quantizer={quantizer_name(self.input_quantizer)}",
            f"weight_mode={self.weight_mode}",
        ]
        if self.weight_mode == "latent":
            parts.append(f"weight_quantizer={quantizer_name(self.weight_quantizer)}")
        if self.scale_mode != "none":
            parts.append(f"scale={self.scale_mode}")
        if self.weight_clip is not None and self.weight_mode == "latent":
            parts.append(f"weight_clip={self.weight_clip:g}")
        return ", ".join(parts)


class _BinaryConvNd(BinaryLayer):
    pad_value: float

    def _setup_padding(self, pad_value: float) -> None:
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not math.isfinite(pad_value):
            raise ValueError(f"pad_value must be a finite number (usually -1, 0 or +1), got {pad_value!r}")
        self.pad_value = float(pad_value)
        if self.pad_value != 0.0 and self.padding_mode != "zeros":
            raise ValueError(
                f"pad_value={pad_value:g} needs padding_mode='zeros' (got {self.padding_mode!r}); "
                "use one or the other"
            )

    def _channel_view(self, t: Tensor, out: Tensor) -> Tensor:
        # channel dim is the one before the spatial dims, batched (N, C, ...) or not (C, ...)
        return t.to(out.dtype).view((-1,) + (1,) * len(self.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        if (
            self._int8_applies(x)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and self.pad_value in (-1.0, 0.0, 1.0)
            and x.dim() == self.weight.dim()
        ):
            out = conv_nd_int8(
                self.input_quantizer(x), self.quantized_weight(), stride=self.stride, padding=self.padding,
                dilation=self.dilation, pad_value=self.pad_value, grad_dtype=self.int8_grad_dtype,
            )
            return self._finish(out)
        x = self.input_quantizer(x)
        w = self.quantized_weight().to(x.dtype)
        out = conv_nd(
            x, w, None, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            padding_mode=self.padding_mode, pad_value=self.pad_value,
        )
        return self._finish(out)

    def extra_repr(self) -> str:
        s = super().extra_repr() + ", " + self._binary_repr()
        if self.pad_value != 0.0:
            s += f", pad_value={self.pad_value:g}"
        return s


class BinaryConv2d(_BinaryConvNd, nn.Conv2d):
    r"""2-D convolution with binary weights and (optionally) binary inputs.

    Args are those of :class:`torch.nn.Conv2d` (``bias`` defaults to ``False``, as is usual
    before BatchNorm) plus:

    Args:
        input_quantizer: quantizer for the inputs; ``None`` (default) keeps them real.
        weight_quantizer: quantizer for latent weights (default ``"ste_sign"``).
        weight_mode: ``"latent"`` (default) or ``"flip"``.
        scale: ``"none"`` (default), ``"xnor"`` or ``"learnable"``.
        weight_clip: clip latent weights to ``[-c, c]`` after each step (default ``None``).
        pad_value: value used for padding (default 0; use -1 or +1 to stay binary).

    Example:
        >>> conv = BinaryConv2d(64, 128, 3, padding=1, input_quantizer="ste_sign", pad_value=1.0)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        input_quantizer: QuantizerLike = None,
        weight_quantizer: QuantizerLike = "ste_sign",
        weight_mode: WeightMode = "latent",
        scale: Scale = "none",
        weight_clip: float | None = None,
        pad_value: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )
        self._init_binary(input_quantizer, weight_quantizer, weight_mode, scale, weight_clip)
        self._setup_padding(pad_value)


class BinaryConv1d(_BinaryConvNd, nn.Conv1d):
    """1-D convolution with binary weights; arguments as :class:`BinaryConv2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: str | int | tuple[int] = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        input_quantizer: QuantizerLike = None,
        weight_quantizer: QuantizerLike = "ste_sign",
        weight_mode: WeightMode = "latent",
        scale: Scale = "none",
        weight_clip: float | None = None,
        pad_value: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Conv1d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )
        self._init_binary(input_quantizer, weight_quantizer, weight_mode, scale, weight_clip)
        self._setup_padding(pad_value)


class BinaryLinear(BinaryLayer, nn.Linear):
    """Fully connected layer with binary weights and (optionally) binary inputs.

    Args are those of :class:`torch.nn.Linear` (``bias`` defaults to ``False``) plus
    ``input_quantizer``, ``weight_quantizer``, ``weight_mode``, ``scale`` and ``weight_clip``
    as in :class:`BinaryConv2d`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_quantizer: QuantizerLike = None,
        weight_quantizer: QuantizerLike = "ste_sign",
        weight_mode: WeightMode = "latent",
        scale: Scale = "none",
        weight_clip: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_binary(input_quantizer, weight_quantizer, weight_mode, scale, weight_clip)

    def forward(self, x: Tensor) -> Tensor:
        if self._int8_applies(x) and x.dim() >= 2:
            out = linear_int8(self.input_quantizer(x), self.quantized_weight(), grad_dtype=self.int8_grad_dtype)
            return self._finish(out)
        x = self.input_quantizer(x)
        out = F.linear(x, self.quantized_weight().to(x.dtype))
        return self._finish(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._binary_repr()


# ---------------------------------------------------------------------------- discovery
def _weight_parameter(m: nn.Module) -> nn.Parameter:
    """The weight parameter itself: under a ``torch.nn.utils.parametrize`` parametrization (QBN's
    projection) ``m.weight`` is computed and the parameter is ``m.parametrizations.weight.original``."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations["weight"].original  # type: ignore[union-attr,return-value]
    return m.weight  # type: ignore[return-value]


def binary_modules(model: nn.Module) -> Iterator[tuple[str, BinaryLayer]]:
    """Yield ``(name, module)`` for every binary layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, BinaryLayer):
            yield name, m


def named_binary_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(name, weight)`` for the weight of every binary layer with 1-bit weights.

    Both weight modes count (latent weights are the real proxies of binary weights); a binary
    layer built with ``weight_quantizer=None`` keeps real weights and is left out. A weight
    shared by several layers is yielded once.
    """
    seen: set[int] = set()
    for name, m in binary_modules(model):
        w = _weight_parameter(m)
        if m.has_binary_weight and id(w) not in seen:
            seen.add(id(w))
            yield (f"{name}.weight" if name else "weight"), w


def binary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The binary weights of ``model``: what a flip optimizer (or a latent baseline) trains.

    Every other parameter (BatchNorm, biases, scales, full-precision layers) is in
    :func:`real_parameters`.
    """
    return [p for _, p in named_binary_parameters(model)]


def named_real_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(name, parameter)`` for every parameter that is not a binary weight."""
    binary = {id(p) for p in binary_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) not in binary:
            yield name, p


def real_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not a binary weight."""
    return [p for _, p in named_real_parameters(model)]


@torch.no_grad()
def apply_constraints(model: nn.Module) -> None:
    """Apply every binary layer's ``weight_clip`` (call after ``optimizer.step()``)."""
    for _, m in binary_modules(model):
        m.apply_constraint()


def set_weight_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put every binary layer with 1-bit weights in ``mode`` (``"latent"`` or ``"flip"``).

    Layers that keep real weights (``weight_quantizer=None``) are left alone. Returns ``model``.
    Raises ``ValueError`` for an unknown mode, or for flip mode with an ``scale='xnor'`` layer,
    before any layer is changed.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")
    layers = [(name, m) for name, m in binary_modules(model) if m.has_binary_weight]
    if mode == "flip":
        xnor = [name or type(m).__name__ for name, m in layers if m.scale_mode == "xnor"]
        if xnor:
            raise ValueError(
                f"layers {xnor} use scale='xnor', which needs latent weights; "
                "rebuild them with scale='learnable' or 'none' to train in flip mode"
            )
    for _, m in layers:
        m.set_weight_mode(mode)
    return model
