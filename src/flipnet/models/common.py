r"""Building blocks shared by the model zoo.

Every model in :mod:`flipnet.models` is written once, against a :class:`ModelSpec`, and the spec
decides what each *binary position* (a binarisable convolution or dense layer) becomes:

* ``bnn``: a :class:`~flipnet.layers.BinaryConv2d` / :class:`~flipnet.layers.BinaryLinear` whose
  input goes through ``activation``, a sign quantizer (default per model): binary weights and
  binary activations;
* ``bwn``: the same binary layers, with a real ``activation`` (default ReLU) at their input:
  binary weights, real activations;
* ``float``: a :class:`FloatConv2d` / :class:`FloatLinear` (subclasses of ``nn.Conv2d`` /
  ``nn.Linear``) with ``activation`` (default ReLU, or a sign for an exact twin) at its input.

The activation that replaces the binary input quantizer lives *inside* the layer, as its
``input_quantizer`` module, so the three modes have the same module tree and the same
parameter names and shapes: a binary model's ``state_dict`` loads into its float twin and back
(see :func:`flipnet.models.float_twin`).

Layers that are full precision in every mode (the first and last layers of the ResNets and the
U-Net, the 1×1 shortcut convolutions) are plain :class:`torch.nn.Conv2d` / :class:`torch.nn.Linear`.

BatchNorm follows the Keras conventions the Bop reference code relies on when asked:
:class:`BatchNorm2d` ``(gamma=False)`` has a learned shift but no scale (Keras
``BatchNormalization(scale=False)``), and Keras ``momentum=0.99`` is PyTorch ``momentum=0.01``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Callable, Literal, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import channel_mean_abs, conv_nd
from ..layers import SCALES, WEIGHT_MODES, BinaryConv2d, BinaryLinear
from ..quantizers import QUANTIZERS, get_quantizer

__all__ = [
    "MODES",
    "REAL_ACTIVATIONS",
    "BINARY_ACTIVATIONS",
    "Mode",
    "BatchNorm1d",
    "BatchNorm2d",
    "FloatConv2d",
    "FloatLinear",
    "ModelSpec",
    "SequentialModel",
    "make_activation",
    "pair",
    "check_image_input",
    "conv_out",
    "count_parameters",
]

Mode = Literal["bnn", "bwn", "float"]
MODES: tuple[str, ...] = ("bnn", "bwn", "float")

#: Real-valued activations, by name (none of them has parameters, so the twins stay compatible).
REAL_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "hardtanh": nn.Hardtanh,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

_BINARY_QUANTIZERS: tuple[str, ...] = tuple(
    sorted(a for a, cls in QUANTIZERS.items() if getattr(cls, "precision", 32) == 1)
)
#: Binary activations: the 1-bit quantizers of :mod:`flipnet.quantizers`, plus ``"sign"``
#: (an alias of ``"ste_sign"``).
BINARY_ACTIVATIONS: tuple[str, ...] = ("sign",) + _BINARY_QUANTIZERS


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as ``(height, width)``; one positive int means a square."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    else:
        try:
            out = tuple(int(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) != 2 or any(o != v for o, v in zip(out, value)):  # type: ignore[arg-type]
            raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return out  # type: ignore[return-value]


def make_activation(name: str, mode: str) -> nn.Module:
    """A fresh activation module for ``name`` in ``mode``.

    ``bnn`` accepts the binary activations (:data:`BINARY_ACTIVATIONS`), ``bwn`` the real ones
    (:data:`REAL_ACTIVATIONS`), ``float`` both (a float twin may use sign activations).
    """
    key = name.strip().lower()
    binary_ok = mode in ("bnn", "float")
    real_ok = mode in ("bwn", "float")
    if binary_ok and key in BINARY_ACTIVATIONS:
        return get_quantizer("ste_sign" if key == "sign" else key)
    if real_ok and key in REAL_ACTIVATIONS:
        return REAL_ACTIVATIONS[key]()
    valid = (list(BINARY_ACTIVATIONS) if binary_ok else []) + (sorted(REAL_ACTIVATIONS) if real_ok else [])
    hint = {
        "bnn": " (mode='bnn' binarises activations; use mode='bwn' for real ones)",
        "bwn": " (mode='bwn' keeps activations real; use mode='bnn' for binary ones)",
    }.get(mode, "")
    raise ConfigError(f"unknown activation {name!r} for mode={mode!r}; valid: {', '.join(valid)}{hint}")


# ----------------------------------------------------------------------------- BatchNorm
class _ShiftableBatchNorm:
    """Mixin: BatchNorm whose scale (γ) and/or shift (β) can be left out, as in Keras."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    num_features: int

    def _drop_affine(self, gamma: bool, beta: bool) -> None:
        if not gamma:
            self.register_parameter("weight", None)  # type: ignore[attr-defined]
        if not beta:
            self.register_parameter("bias", None)  # type: ignore[attr-defined]

    def reset_parameters(self) -> None:
        self.reset_running_stats()  # type: ignore[attr-defined]
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "  # type: ignore[attr-defined]
            f"gamma={self.weight is not None}, beta={self.bias is not None}"
        )


class BatchNorm2d(_ShiftableBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` whose scale γ (``gamma``) and shift β (``beta``) are optional.

    ``BatchNorm2d(c, gamma=False)`` is Keras ``BatchNormalization(scale=False)``: it has a
    ``bias`` parameter and ``weight is None``. It is still an ``nn.BatchNorm2d`` (exporters that
    fold BatchNorm treat a missing ``weight`` as γ = 1).

    Note ``momentum`` is PyTorch's (weight of the new batch statistic): Keras ``momentum=0.99``
    is ``momentum=0.01`` here.
    """

    def __init__(
        self, num_features: int, *, gamma: bool = True, beta: bool = True, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        nn.BatchNorm2d.__init__(self, num_features, eps=eps, momentum=momentum, affine=gamma or beta)
        self._drop_affine(gamma, beta)


class BatchNorm1d(_ShiftableBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with optional γ and β; see :class:`BatchNorm2d`."""

    def __init__(
        self, num_features: int, *, gamma: bool = True, beta: bool = True, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        nn.BatchNorm1d.__init__(self, num_features, eps=eps, momentum=momentum, affine=gamma or beta)
        self._drop_affine(gamma, beta)


# ----------------------------------------------------------------------------- float twins
class _FloatTwinMixin:
    """What a float layer needs to mirror a binary layer's interface and state dict."""

    weight: nn.Parameter

    def _init_twin(self, input_quantizer: nn.Module | None, learnable_scale: bool) -> None:
        self.input_quantizer = input_quantizer if input_quantizer is not None else nn.Identity()
        if learnable_scale:
            self.scale = nn.Parameter(channel_mean_abs(self.weight.detach()).clone())
        else:
            self.register_parameter("scale", None)  # type: ignore[attr-defined]

    def _apply_scale(self, out: Tensor) -> Tensor:
        if self.scale is not None:
            out = out * self.scale.view((1, -1) + (1,) * (out.dim() - 2)).to(out.dtype)
        return out

    # A binary layer stores its weight mode as "extra state"; accept it (and give an empty one)
    # so that state dicts load strictly in both directions.
    def get_extra_state(self) -> dict:
        return {}

    def set_extra_state(self, state: Any) -> None:
        return None


class FloatConv2d(_FloatTwinMixin, nn.Conv2d):
    """Full-precision twin of :class:`~flipnet.layers.BinaryConv2d`.

    An :class:`torch.nn.Conv2d` that applies ``input_quantizer`` (here: a real activation, or a
    sign for an exact twin) to its input, pads with ``pad_value`` and, with
    ``learnable_scale=True``, multiplies each output channel by a ``scale`` parameter, exactly
    where the binary layer does. Its parameter names and shapes are those of the binary layer
    built with the same arguments.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        bias: bool = False,
        *,
        input_quantizer: nn.Module | None = None,
        learnable_scale: bool = False,
        pad_value: float = 0.0,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self._init_twin(input_quantizer, learnable_scale)
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not math.isfinite(pad_value):
            raise ValueError(f"pad_value must be a finite number (usually -1, 0 or +1), got {pad_value!r}")
        self.pad_value = float(pad_value)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        out = conv_nd(
            x, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, pad_value=self.pad_value,
        )
        return self._apply_scale(out)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.scale is not None:
            s += ", scale=learnable"
        if self.pad_value != 0.0:
            s += f", pad_value={self.pad_value:g}"
        return s


class FloatLinear(_FloatTwinMixin, nn.Linear):
    """Full-precision twin of :class:`~flipnet.layers.BinaryLinear`; see :class:`FloatConv2d`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_quantizer: nn.Module | None = None,
        learnable_scale: bool = False,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_twin(input_quantizer, learnable_scale)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(self.input_quantizer(x), self.weight, self.bias)
        return self._apply_scale(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", scale=learnable" if self.scale is not None else "")


# ----------------------------------------------------------------------------- the spec
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Options shared by every model, resolved and validated; a factory for its layers.

    Built by :func:`flipnet.models.create_model` (use :meth:`create` to build one directly).

    Attributes:
        num_classes: outputs of the model (classes, or segmentation classes per pixel).
        in_channels: channels of the input image.
        mode: ``"bnn"`` (binary weights and activations), ``"bwn"`` (binary weights, real
            activations) or ``"float"`` (the full-precision twin).
        weight_mode: ``"latent"`` or ``"flip"`` for every binary layer.
        scale: ``"none"``, ``"xnor"`` or ``"learnable"`` per-channel output scaling of binary layers.
        dropout: dropout probability (where each model places it is in its docstring).
        weight_clip: latent-weight clip value of binary layers, or ``None``.
        weight_quantizer: quantizer alias for latent weights.
        activation: what sits at the input of each binary position: a sign quantizer alias in
            ``bnn`` mode, a real activation in ``bwn`` mode, either in ``float`` mode.
        twin_of: in ``float`` mode, the binary mode whose architecture is mirrored (``"bnn"``
            or ``"bwn"``; they differ for the ResNets); ``None`` otherwise.
        pad_value: padding value of convolutions whose input is binary in ``bnn`` mode (and of
            the same convolutions in its float twin).
        bn_momentum: PyTorch BatchNorm momentum (Keras ``1 - momentum``).
        bn_eps: BatchNorm epsilon.
    """

    num_classes: int
    in_channels: int
    mode: str = "bnn"
    weight_mode: str = "latent"
    scale: str = "none"
    dropout: float = 0.0
    weight_clip: float | None = None
    weight_quantizer: str = "ste_sign"
    activation: str = "ste_sign"
    twin_of: str | None = None
    pad_value: float = 0.0
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        *,
        num_classes: int,
        in_channels: int,
        mode: str = "bnn",
        weight_mode: str = "latent",
        scale: str = "none",
        dropout: float = 0.0,
        weight_clip: float | None = None,
        weight_quantizer: str | None = None,
        activation: str | None = None,
        twin_of: str | None = None,
        pad_value: float = 0.0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        binary_activation: str = "ste_sign",
    ) -> "ModelSpec":
        """Validate the options and fill in the defaults that depend on ``mode``.

        ``activation=None`` means ``binary_activation`` (the model's default sign) in ``bnn``
        mode, ``"relu"`` otherwise. Invalid options raise :class:`~flipnet.errors.ConfigError`.
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if weight_mode not in WEIGHT_MODES:
            raise ConfigError(f"weight_mode must be one of {', '.join(WEIGHT_MODES)}, got {weight_mode!r}")
        if scale not in SCALES:
            raise ConfigError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if weight_clip is not None and (
            isinstance(weight_clip, bool) or not isinstance(weight_clip, (int, float)) or not 0 < weight_clip < math.inf
        ):
            raise ConfigError(f"weight_clip must be a positive number or None, got {weight_clip!r}")
        for name, value in (("pad_value", pad_value), ("bn_momentum", bn_momentum), ("bn_eps", bn_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum must be in [0, 1] (PyTorch convention), got {bn_momentum!r}")
        if not bn_eps > 0:
            raise ConfigError(f"bn_eps must be positive, got {bn_eps!r}")
        if mode == "float":
            twin_of = "bnn" if twin_of is None else twin_of
            if twin_of not in ("bnn", "bwn"):
                raise ConfigError(f"twin_of must be 'bnn' or 'bwn', got {twin_of!r}")
            if weight_mode != "latent" or weight_clip is not None or scale == "xnor" or weight_quantizer is not None:
                raise ConfigError(
                    "mode='float' has no binary weights: leave weight_mode, weight_clip and weight_quantizer "
                    "at their defaults and use scale 'none' or 'learnable' (flipnet.models.float_twin "
                    "builds the float twin of a binary model)"
                )
        else:
            if twin_of is not None:
                raise ConfigError(f"twin_of is an option of mode='float' only (got mode={mode!r})")
            if scale == "xnor" and weight_mode == "flip":
                raise ConfigError("scale='xnor' needs latent weights; use weight_mode='latent' or scale='learnable'")
        weight_quantizer = "ste_sign" if weight_quantizer is None else weight_quantizer
        if not isinstance(weight_quantizer, str) or weight_quantizer.strip().lower() not in _BINARY_QUANTIZERS:
            raise ConfigError(
                f"unknown weight_quantizer {weight_quantizer!r}; valid (1-bit quantizers): "
                f"{', '.join(_BINARY_QUANTIZERS)}"
            )
        if activation is None:
            activation = binary_activation if mode == "bnn" else "relu"
        if not isinstance(activation, str):
            raise ConfigError(f"activation must be a name (a string), got {type(activation).__name__}")
        make_activation(activation, mode)  # validates
        return cls(
            num_classes=num_classes,
            in_channels=in_channels,
            mode=mode,
            weight_mode=weight_mode,
            scale=scale,
            dropout=float(dropout),
            weight_clip=None if weight_clip is None else float(weight_clip),
            weight_quantizer=weight_quantizer.strip().lower(),
            activation=activation.strip().lower(),
            twin_of=twin_of,
            pad_value=float(pad_value),
            bn_momentum=float(bn_momentum),
            bn_eps=float(bn_eps),
        )

    def as_options(self) -> dict[str, Any]:
        """The spec as keyword arguments of :func:`flipnet.models.create_model`."""
        out = dataclasses.asdict(self)
        if self.mode == "float":
            out["weight_quantizer"] = None  # not an option of float models
        return out

    # ------------------------------------------------------------------ queries
    @property
    def arch(self) -> str:
        """The binary mode whose architecture is built: ``mode``, or ``twin_of`` for a float twin."""
        return self.twin_of if self.mode == "float" else self.mode  # type: ignore[return-value]

    @property
    def binary(self) -> bool:
        """True where binary positions hold binary layers (``bnn`` and ``bwn``)."""
        return self.mode != "float"

    # ------------------------------------------------------------------ factories
    def input_activation(self) -> nn.Module:
        """A fresh module for the input of a binary position (sign in bnn, real otherwise)."""
        return make_activation(self.activation, self.mode)

    def act(self) -> nn.Module:
        """A real activation for explicit positions (blocks whose activations are always real).

        In ``bnn`` mode (where ``activation`` is a sign) this is ReLU.
        """
        if self.mode == "bnn":
            return nn.ReLU()
        return make_activation(self.activation, self.mode)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: str | int = 0,
        *,
        quantize_input: bool = True,
    ) -> nn.Module:
        """A convolution at a binary position (no bias).

        ``quantize_input=True``: its input is binarised in ``bnn`` mode (and goes through the real
        ``activation`` in ``bwn``/``float`` mode); ``False``: its input is used as it is (the
        first layer, or blocks that apply their activations explicitly).
        """
        pad_value = self.pad_value if (quantize_input and self.arch == "bnn") else 0.0
        in_q = self.input_activation() if quantize_input else None
        if self.binary:
            return BinaryConv2d(
                in_channels, out_channels, kernel_size, stride, padding,
                input_quantizer=in_q,
                weight_quantizer=self.weight_quantizer,
                weight_mode=self.weight_mode,  # type: ignore[arg-type]
                scale=self.scale,  # type: ignore[arg-type]
                weight_clip=self.weight_clip,
                pad_value=pad_value,
            )
        return FloatConv2d(
            in_channels, out_channels, kernel_size, stride, padding,
            input_quantizer=in_q, learnable_scale=self.scale == "learnable", pad_value=pad_value,
        )

    def linear(self, in_features: int, out_features: int, *, quantize_input: bool = True) -> nn.Module:
        """A fully connected layer at a binary position (no bias); see :meth:`conv`."""
        in_q = self.input_activation() if quantize_input else None
        if self.binary:
            return BinaryLinear(
                in_features, out_features,
                input_quantizer=in_q,
                weight_quantizer=self.weight_quantizer,
                weight_mode=self.weight_mode,  # type: ignore[arg-type]
                scale=self.scale,  # type: ignore[arg-type]
                weight_clip=self.weight_clip,
            )
        return FloatLinear(in_features, out_features, input_quantizer=in_q, learnable_scale=self.scale == "learnable")

    def bn2d(self, num_features: int, *, gamma: bool = True) -> BatchNorm2d:
        """BatchNorm over channels with the spec's momentum and epsilon."""
        return BatchNorm2d(num_features, gamma=gamma, momentum=self.bn_momentum, eps=self.bn_eps)

    def bn1d(self, num_features: int, *, gamma: bool = True) -> BatchNorm1d:
        """BatchNorm over features with the spec's momentum and epsilon."""
        return BatchNorm1d(num_features, gamma=gamma, momentum=self.bn_momentum, eps=self.bn_eps)

    def dropout_layer(self) -> nn.Module | None:
        """``nn.Dropout(dropout)``, or ``None`` when ``dropout == 0``."""
        return nn.Dropout(self.dropout) if self.dropout > 0 else None


# ----------------------------------------------------------------------------- sequential models
class SequentialModel(nn.Sequential):
    """A flat :class:`torch.nn.Sequential` that checks the shape of its input.

    The layers are named (``conv1``, ``bn1``, ...), so parameter names do not depend on options
    such as dropout. ``input_shape`` is the expected ``(C, H, W)`` of one sample; a batch of
    another shape raises ``ValueError`` naming the expected one instead of a shape mismatch deep
    inside the network.
    """

    input_shape: tuple[int, ...] | None

    def __init__(
        self, layers: Mapping[str, nn.Module], *, input_shape: tuple[int, ...] | None = None, name: str = "model"
    ) -> None:
        super().__init__(OrderedDict(layers))
        # a slice (model[2:5]) is built from the layers alone and checks nothing
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self._model_name = name

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self._model_name} expects input of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}; build it with matching in_channels/input_size"
            )
        return super().forward(x)


def add_stages(
    model: nn.Module,
    units: Sequence[int],
    widths: Sequence[int],
    c_in: int,
    make_block: Callable[[int, int, int], nn.Module],
) -> int:
    """Add the residual stages ``layer1, layer2, ...`` of a ResNet-style network to ``model``.

    Stage ``i`` holds ``units[i]`` blocks ``make_block(c_in, c_out, stride)`` with
    ``c_out = widths[i]``; the first block of every stage after the first has stride 2. The stage
    names are listed in ``model.stages``. Returns the channel count of the last stage.
    """
    model.stages = []
    for i, (n, c_out) in enumerate(zip(units, widths), start=1):
        blocks = [make_block(c_in if j == 0 else c_out, c_out, 2 if (j == 0 and i > 1) else 1) for j in range(n)]
        setattr(model, f"layer{i}", nn.Sequential(*blocks))
        model.stages.append(f"layer{i}")
        c_in = c_out
    return c_in


def check_image_input(x: Tensor, in_channels: int, name: str, *, multiple_of: int = 1, min_size: int = 1) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(N, in_channels, H, W)`` with H, W fit for the model."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name} expects input of shape (N, {in_channels}, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple_of or w % multiple_of or h < min_size or w < min_size:
        need = f"multiples of {multiple_of}" if multiple_of > 1 else f"at least {min_size}"
        raise ValueError(f"{name} expects H and W to be {need}, got {h}×{w}")


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one dimension."""
    return math.floor((size + 2 * padding - kernel) / stride) + 1


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"binary": n, "real": n, "total": n}``: element counts of binary weights and the rest."""
    from ..layers import binary_parameters

    binary = sum(p.numel() for p in binary_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return {"binary": binary, "real": total - binary, "total": total}
