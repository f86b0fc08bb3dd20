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
    Network Optimization". Loading a state dict with a non-binary weight into a flip-mode layer
    raises an error.

Scaling (``scale``)
-------------------
``"none"`` (default)
    :math:`\alpha = 1`.
``"xnor"``
    :math:`\alpha_c = \mathrm{mean}\,|W_c|`, the per-output-channel mean magnitude of the latent
    weight (Rastegari et al. 2016, XNOR-Net). Latent mode only: in flip mode :math:`|W| = 1`.
``"learnable"``
    :math:`\alpha` is a trainable per-channel parameter, initialised to :math:`\mathrm{mean}\,|W_c|`
    in latent mode and to 1 in flip mode (in the spirit of Zhang et al. 2018, LQ-Nets).

Since the scale multiplies the output channel, it is applied to the convolution output, which
is exactly :math:`(\alpha\,\mathrm{sign}(W)) \ast x`.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import QuantizerLike, get_quantizer, is_binary_quantizer, quantizer_name, sign

__all__ = [
    "BinaryLayer",
    "BinaryConv1d",
    "BinaryConv2d",
    "BinaryLinear",
    "WEIGHT_MODES",
    "SCALES",
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
SCALES: tuple[str, ...] = ("none", "xnor", "learnable")


def _channel_mean_abs(w: Tensor) -> Tensor:
    return w.detach().abs().flatten(1).mean(dim=1)


class BinaryLayer(nn.Module):
    """Behaviour shared by every binary layer (use the concrete classes).

    Attributes:
        input_quantizer: module applied to the input (``Identity`` for real inputs).
        weight_quantizer: module applied to latent weights (unused in flip mode).
        weight_mode: ``"latent"`` or ``"flip"``.
        scale_mode: ``"none"``, ``"xnor"`` or ``"learnable"``.
        weight_clip: clip value of latent weights, or ``None``.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

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
        if weight_clip is not None and not weight_clip > 0:
            raise ValueError(f"weight_clip must be positive or None, got {weight_clip!r}")
        if scale == "xnor" and weight_mode == "flip":
            raise ValueError(
                "scale='xnor' needs latent weights (mean |W| of ±1 weights is 1); "
                "use weight_mode='latent' or scale='learnable'"
            )
        self.input_quantizer = get_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)
        self.weight_mode: str = weight_mode
        self.scale_mode: str = scale
        self.weight_clip = weight_clip
        out_channels = self.weight.shape[0]
        if scale == "learnable":
            init = torch.ones(out_channels) if weight_mode == "flip" else _channel_mean_abs(self.weight)
            self.scale = nn.Parameter(init.clone())
        else:
            self.register_parameter("scale", None)
        if weight_mode == "flip":
            with torch.no_grad():
                self.weight.copy_(sign(self.weight))
        elif weight_clip is not None:
            with torch.no_grad():
                self.weight.clamp_(-weight_clip, weight_clip)

    # ------------------------------------------------------------------ weights
    @property
    def binary_inputs(self) -> bool:
        """True where the input quantizer produces 1-bit values."""
        return is_binary_quantizer(self.input_quantizer)

    def quantized_weight(self) -> Tensor:
        """The weight used by the forward pass, without the output scale."""
        if self.weight_mode == "flip":
            return self.weight
        return self.weight_quantizer(self.weight)

    def binary_weight(self) -> Tensor:
        """The ±1 signs of the weight (no gradient), whatever the mode."""
        return sign(self.weight.detach())

    def output_scale(self) -> Tensor | None:
        """Per-output-channel :math:`\\alpha`, or ``None`` for ``scale='none'``."""
        if self.scale_mode == "xnor":
            return self.weight.abs().flatten(1).mean(dim=1)
        if self.scale_mode == "learnable":
            return self.scale
        return None

    def _finish(self, out: Tensor) -> Tensor:
        alpha = self.output_scale()
        if alpha is not None:
            out = out * alpha.view((1, -1) + (1,) * (out.dim() - 2)).to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.view((1, -1) + (1,) * (out.dim() - 2)).to(out.dtype)
        return out

    @torch.no_grad()
    def apply_constraint(self) -> None:
        """Clamp latent weights to ``[-weight_clip, weight_clip]`` (no-op otherwise)."""
        if self.weight_mode == "latent" and self.weight_clip is not None:
            self.weight.clamp_(-self.weight_clip, self.weight_clip)

    @torch.no_grad()
    def set_weight_mode(self, mode: str) -> None:
        """Switch between ``"latent"`` and ``"flip"``; going to flip binarises the weight."""
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")
        if mode == "flip" and self.scale_mode == "xnor":
            raise ValueError("scale='xnor' needs latent weights; cannot switch this layer to flip mode")
        if mode == "flip":
            self.weight.copy_(sign(self.weight))
        self.weight_mode = mode

    def check_binary(self) -> None:
        """Raise ``ValueError`` if a flip-mode weight holds anything but ±1."""
        if self.weight_mode == "flip" and not bool((self.weight.detach().abs() == 1).all()):
            raise ValueError(
                f"{type(self).__name__} in flip mode holds non-binary weights; "
                "flip-mode weights must be exactly ±1 (use set_weight_mode('flip') to binarise)"
            )

    # ------------------------------------------------------------ persistence
    def get_extra_state(self) -> dict:
        return {"weight_mode": self.weight_mode}

    def set_extra_state(self, state: dict) -> None:
        mode = state.get("weight_mode", self.weight_mode) if isinstance(state, dict) else self.weight_mode
        self.weight_mode = mode
        self.check_binary()

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
            parts.append(f"weight_clip={self.weight_clip}")
        return ", ".join(parts)


def _explicit_padding(
    padding: str | int | Sequence[int], kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int]
) -> list[int]:
    """Padding as F.pad wants it (last dimension first, (left, right) pairs)."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            per_dim = [(0, 0)] * n
        elif padding == "same":
            per_dim = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                per_dim.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    else:
        pads = (padding,) * n if isinstance(padding, int) else tuple(padding)
        per_dim = [(p, p) for p in pads]
    flat: list[int] = []
    for left, right in reversed(per_dim):
        flat += [left, right]
    return flat


class _BinaryConvNd(BinaryLayer):
    _conv = staticmethod(F.conv2d)
    _explicit_pad: list[int]
    pad_value: float

    def _setup_padding(self, pad_value: float) -> None:
        self.pad_value = float(pad_value)
        self._explicit_pad = _explicit_padding(self.padding, self.kernel_size, self.dilation, self.stride)
        if self.pad_value != 0.0 and self.padding_mode != "zeros":
            raise ValueError("pad_value needs padding_mode='zeros'")

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        w = self.quantized_weight().to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            out = self._conv(x, w, None, self.stride, 0, self.dilation, self.groups)
        elif self.pad_value != 0.0 and any(self._explicit_pad):
            x = F.pad(x, self._explicit_pad, value=self.pad_value)
            out = self._conv(x, w, None, self.stride, 0, self.dilation, self.groups)
        else:
            out = self._conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)
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

    _conv = staticmethod(F.conv2d)

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

    _conv = staticmethod(F.conv1d)

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
        x = self.input_quantizer(x)
        out = F.linear(x, self.quantized_weight().to(x.dtype))
        return self._finish(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._binary_repr()


# ---------------------------------------------------------------------------- discovery
def binary_modules(model: nn.Module) -> Iterator[tuple[str, BinaryLayer]]:
    """Yield ``(name, module)`` for every binary layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, BinaryLayer):
            yield name, m


def named_binary_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(name, weight)`` for the weight of every binary layer (latent or flip mode)."""
    seen: set[int] = set()
    for name, m in binary_modules(model):
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            yield (f"{name}.weight" if name else "weight"), m.weight


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
    """Put every binary layer of ``model`` in ``mode`` (``"latent"`` or ``"flip"``)."""
    for _, m in binary_modules(model):
        m.set_weight_mode(mode)
    return model
