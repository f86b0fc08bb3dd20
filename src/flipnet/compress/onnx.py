r"""ONNX and QONNX export of trained binary networks.

:func:`export_onnx` writes the eval-mode computation of a flipnet model as an ONNX graph, built
node by node with :mod:`onnx.helper` (no tracing), in one of two dialects:

``format="onnx"`` — standard ONNX that ONNX Runtime (or any ONNX backend) runs as it is:

* a sign quantizer (``ste_sign``, ``approx_sign``, ``swish_sign``: all are
  :math:`\mathrm{sign}(x)` in the forward pass, with flipnet's convention
  :math:`\mathrm{sign}(0) = +1`) becomes ``Where(GreaterOrEqual(x, 0), 1, -1)`` (ONNX ``Sign``
  maps 0 to 0, so it is not used); ``ste_heaviside`` becomes ``Cast(Greater(x, 0))``;
* a binary convolution or dense layer becomes ``Conv`` / ``Gemm`` with its ±1 weights
  (:math:`\mathrm{sign}(W)`, ``sign(0) = +1``), followed by a ``Mul`` with the per-channel scale
  :math:`s = \alpha\,a` (output scale α of ``scale="xnor"|"learnable"``, magnitude ``a`` of
  ``magnitude_aware_sign`` weights) and an ``Add`` of the bias, where the layer has them;
* padding of binary inputs with ``pad_value`` (+1 or -1, since 0 is not binary) is an explicit
  ``Pad`` with that constant before an unpadded ``Conv``; ``"same"`` padding puts the odd pixel
  on the right/bottom, as the layer does; ``padding_mode`` reflect / replicate / circular become
  ``Pad`` modes ``reflect`` / ``edge`` / ``wrap`` (``wrap`` needs opset 19);
* with ``fold_batchnorm=True`` (default) a BatchNorm between a binary layer with binary inputs
  and the next sign is folded into one integer threshold per channel,
  ``Where(GreaterOrEqual(y, t), p, -p)`` with ``p = ±1``, using
  :func:`flipnet.compress.export.fold_bn_threshold`: exact for every integer pre-activation ``y``
  (see ``docs/deployment.md``, "BatchNorm folding"), so the following sign is dropped. Where that
  is not exact (real inputs, a max-pool after a layer with a scale ``s <= 0``, no sign after the
  BatchNorm, BatchNorm without running statistics) the BatchNorm stays a ``BatchNormalization``;
* everything real (the first and last layers, shortcut convolutions, BatchNorm of the logits,
  pooling, ReLU, ...) is the standard operator with the trained float32 parameters.

``format="qonnx"`` — the QONNX dialect that FINN reads (Pappalardo et al. 2022, "QONNX:
Representing Arbitrary-Precision Quantized Neural Networks"): 1-bit tensors are produced by
``BipolarQuant`` nodes (domain ``qonnx.custom_op.general``; ``BipolarQuant(x, scale) =
scale * (x >= 0 ? +1 : -1)``), on activations (scale 1) and on weights (the ±1 weights as
float32 initializers, the per-output-channel magnitude ``a`` as the scale, 1 otherwise);
BatchNorm stays ``BatchNormalization`` (FINN's streamlining turns BatchNorm + sign into
``MultiThreshold`` itself), the output scale α and the bias are ``Mul``/``Add`` nodes. Everything
else is as in ``"onnx"``. The graph runs with QONNX's executor
(``qonnx.core.onnx_exec.execute_onnx`` on a ``ModelWrapper``); ONNX Runtime alone does not know
``BipolarQuant``.

Both dialects carry a ``value_info`` (shape) for every tensor; the batch dimension is the
symbol ``N`` unless ``batch_size`` fixes it (FINN wants fixed shapes: ``qonnx`` defaults to 1).

Numerics: integer pre-activations of binary layers with binary inputs are exact in float32
(``|y| <= K < 2^24``), so the binary part matches flipnet exactly; float layers (the first layer,
BatchNorms that are not folded, the classifier) agree to float32 rounding — except that a value
within rounding of 0 just before a sign can come out of the sign differently in two float
implementations (PyTorch itself does this between batch sizes), which the tests measure.

Supported modules: flat ``nn.Sequential`` models (``binarynet``, ``binary_mlp``, their float
twins), the ResNets (:class:`~flipnet.models.resnet.ResNet` with Bi-Real or basic blocks),
ReActNet-A, Bi-Real Net 18/34 and the U-Net; layers as listed in ``docs/deployment.md``. Handlers for further module types are added with
:func:`register_onnx_handler`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import explicit_padding
from ..layers import BinaryLayer
from ..quantizers import Quantizer, quantizer_name, sign
from ..utils import atomic_path

__all__ = [
    "ONNX_FORMATS",
    "DEFAULT_OPSET",
    "QONNX_DOMAIN",
    "IMAGE_INPUT_QUANT",
    "export_onnx",
    "export_run_onnx",
    "default_onnx_path",
    "register_onnx_handler",
    "OnnxGraph",
]

#: The dialects :func:`export_onnx` writes.
ONNX_FORMATS: tuple[str, ...] = ("onnx", "qonnx")
#: Default ONNX opset (ONNX 1.14+, ONNX Runtime 1.16+).
DEFAULT_OPSET = 19
MIN_OPSET = 13
#: Domain of QONNX's custom operators (``BipolarQuant``, ``Quant``).
QONNX_DOMAIN = "qonnx.custom_op.general"
#: ``input_quant`` for flipnet's image inputs: the loaders feed ``x = u/127.5 - 1`` for 8-bit
#: pixels ``u``, which is ``(2u - 255)/255``, a signed 9-bit integer times 1/255.
IMAGE_INPUT_QUANT: tuple[float, int] = (1.0 / 255.0, 9)

_SIGN_ALIASES = {"ste_sign", "approx_sign", "swish_sign"}
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


# ============================================================================ graph builder
@dataclass
class Value:
    """A tensor of the graph being built: its ONNX name, an example value (batch 1) for shapes,
    and whether it holds only ±1 (so that a following sign is the identity)."""

    name: str
    example: Tensor
    binary: bool = False


@dataclass
class OnnxGraph:
    """Nodes, initializers and shapes of the graph being built (used by the handlers)."""

    fmt: str
    opset: int
    fold_batchnorm: bool
    batch: int | None
    weight_storage: str = "float"
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    value_info: list[Any] = field(default_factory=list)
    folds: list[dict[str, Any]] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _consts: dict[tuple, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ naming
    def fresh(self, hint: str) -> str:
        base = (hint or "t").replace("/", ".")
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def const(self, hint: str, array: Tensor | Sequence[Any], dtype: torch.dtype | None = None) -> str:
        """An initializer holding ``array`` (float32 unless ``dtype``/int64 given).

        Small graph constants (hints without a dot: ``"zero"``, ``"slice_start"``, ...) with equal
        values are shared; a layer's tensors (``"<layer>.<role>"``) never are, even when equal
        (a fresh BatchNorm's mean and shift are both zeros): runtimes that fuse layers rewrite a
        layer's initializers, which must then belong to that layer alone."""
        from onnx import numpy_helper

        t = torch.as_tensor(array).detach().cpu()
        if dtype is not None:
            t = t.to(dtype)
        elif t.is_floating_point():
            t = t.to(torch.float32)
        key = None
        if t.numel() <= 8 and "." not in hint:
            key = (str(t.dtype), tuple(t.shape), tuple(t.reshape(-1).tolist()))
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(t.contiguous().numpy(), name))
        if key is not None:
            self._consts[key] = name
        return name

    def _shape_info(self, name: str, example: Tensor, batched: bool = True) -> Any:
        from onnx import TensorProto, helper

        dims: list[Any] = list(example.shape)
        if dims and batched:
            dims[0] = self.batch if self.batch is not None else "N"
        elem = {torch.float32: TensorProto.FLOAT, torch.bool: TensorProto.BOOL, torch.int64: TensorProto.INT64,
                torch.uint8: TensorProto.UINT8}[example.dtype]
        return helper.make_tensor_value_info(name, elem, dims)

    def node(self, op: str, inputs: Sequence[str], hint: str, example: Tensor, *, domain: str = "",
             binary: bool = False, batched: bool = True, **attrs: Any) -> Value:
        """Append one node with one output; ``example`` is that output for a batch of one
        (``batched=False``: a tensor without batch dimension, e.g. a quantized weight)."""
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh("n:" + hint), domain=domain, **attrs))
        self.value_info.append(self._shape_info(out, example, batched))
        return Value(out, example, binary)

    # ------------------------------------------------------------------ shared pieces
    def sign(self, v: Value, hint: str) -> Value:
        """``sign(x)`` with ``sign(0) = +1``: ``Where(x >= 0, 1, -1)`` or ``BipolarQuant(x, 1)``."""
        if v.binary:
            return v
        ex = sign(v.example)
        if self.fmt == "qonnx":
            return self.node("BipolarQuant", [v.name, self.const("one", 1.0)], hint, ex, domain=QONNX_DOMAIN, binary=True)
        ge = self.node("GreaterOrEqual", [v.name, self.const("zero", 0.0)], hint + ".ge", v.example >= 0)
        return self.node("Where", [ge.name, self.const("one", 1.0), self.const("minus_one", -1.0)], hint, ex, binary=True)

    def channel(self, t: Tensor, v_example: Tensor) -> Tensor:
        """``t`` of shape ``(C,)`` viewed to broadcast over ``(N, C, ...)``."""
        return t.detach().reshape((1, -1) + (1,) * (v_example.dim() - 2))

    def mul_add(self, v: Value, scale: Tensor | None, bias: Tensor | None, hint: str) -> Value:
        if scale is not None:
            s = self.channel(scale.float(), v.example)
            v = self.node("Mul", [v.name, self.const(hint + ".scale", s)], hint + ".scaled", v.example * s)
        if bias is not None:
            b = self.channel(bias.float(), v.example)
            v = self.node("Add", [v.name, self.const(hint + ".bias", b)], hint + ".biased", v.example + b)
        return v

    def pad(self, v: Value, pads_torch: Sequence[int], mode: str, value: float, hint: str) -> Value:
        """``F.pad`` (last dim first, (left, right) pairs) as an ONNX ``Pad`` (begins, then ends)."""
        n = v.example.dim()
        k = len(pads_torch) // 2
        begins, ends = [0] * n, [0] * n
        for i in range(k):
            axis = n - 1 - i
            begins[axis], ends[axis] = int(pads_torch[2 * i]), int(pads_torch[2 * i + 1])
        onnx_mode = "constant" if mode == "zeros" else _PAD_MODES[mode]
        if onnx_mode == "wrap" and self.opset < 19:
            raise ValueError(f"{hint}: circular padding needs opset >= 19 (ONNX Pad mode 'wrap'), got opset {self.opset}")
        inputs = [v.name, self.const(hint + ".pads", begins + ends, torch.int64)]
        if onnx_mode == "constant":
            inputs.append(self.const(hint + ".pad_value", float(value)))
            ex = F.pad(v.example, list(pads_torch), value=float(value))
        else:
            ex = F.pad(v.example, list(pads_torch), mode=mode)
        return self.node("Pad", inputs, hint + ".pad", ex, mode=onnx_mode, binary=v.binary and value in (-1.0, 1.0))


Handler = Callable[[OnnxGraph, nn.Module, Value, str], Value]
_HANDLERS: dict[type, Handler] = {}


def register_onnx_handler(*types: type) -> Callable[[Handler], Handler]:
    """Register ``fn(graph, module, value, name) -> value`` as the ONNX emitter of ``types``.

    The most specific registered class in a module's MRO wins, so a subclass can override the
    handler of its base (e.g. :class:`~flipnet.layers.BinaryConv2d` over ``nn.Conv2d``).
    """

    def decorate(fn: Handler) -> Handler:
        for t in types:
            _HANDLERS[t] = fn
        return fn

    return decorate


def _handler(m: nn.Module) -> Handler | None:
    for cls in type(m).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def emit(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    """Emit module ``m`` applied to ``v``."""
    h = _handler(m)
    if h is None:
        raise ValueError(
            f"layer {name or type(m).__name__!r}: cannot export a {type(m).__name__} to ONNX "
            "(supported layers are listed in docs/deployment.md)"
        )
    return h(g, m, v, name)


# ============================================================================ activations
@register_onnx_handler(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
def _identity(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    return v


@register_onnx_handler(Quantizer)
def _quantizer(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    alias = quantizer_name(m)
    if alias == "identity":
        return v
    if alias in _SIGN_ALIASES:
        return g.sign(v, name or "sign")
    if alias == "ste_heaviside":
        gt = g.node("Greater", [v.name, g.const("zero", 0.0)], name + ".gt", v.example > 0)
        return g.node("Cast", [gt.name], name, (v.example > 0).float(), to=1)
    raise ValueError(f"layer {name!r}: the quantizer {alias!r} cannot be exported to ONNX "
                     "(supported: ste_sign, approx_sign, swish_sign, ste_heaviside)")


@register_onnx_handler(nn.ReLU)
def _relu(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    return g.node("Relu", [v.name], name, F.relu(v.example))


@register_onnx_handler(nn.Tanh)
def _tanh(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    return g.node("Tanh", [v.name], name, torch.tanh(v.example))


@register_onnx_handler(nn.Sigmoid)
def _sigmoid(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    return g.node("Sigmoid", [v.name], name, torch.sigmoid(v.example))


@register_onnx_handler(nn.SiLU)
def _silu(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    s = g.node("Sigmoid", [v.name], name + ".sigmoid", torch.sigmoid(v.example))
    return g.node("Mul", [v.name, s.name], name, F.silu(v.example))


@register_onnx_handler(nn.Hardtanh)
def _hardtanh(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    lo, hi = float(m.min_val), float(m.max_val)  # type: ignore[attr-defined]
    return g.node("Clip", [v.name, g.const("clip_min", lo), g.const("clip_max", hi)], name, v.example.clamp(lo, hi),
                  binary=v.binary and lo <= -1 and hi >= 1)


@register_onnx_handler(nn.GELU)
def _gelu(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    approx = str(m.approximate)  # type: ignore[attr-defined]
    ex = F.gelu(v.example, approximate=approx)
    if g.opset >= 20:
        return g.node("Gelu", [v.name], name, ex, approximate=approx)
    if approx != "none":
        raise ValueError(f"layer {name!r}: GELU(approximate={approx!r}) needs opset >= 20")
    # 0.5 x (1 + erf(x / sqrt 2))
    d = g.node("Div", [v.name, g.const("sqrt2", math.sqrt(2.0))], name + ".div", v.example / math.sqrt(2.0))
    e = g.node("Erf", [d.name], name + ".erf", torch.erf(d.example))
    a = g.node("Add", [e.name, g.const("one", 1.0)], name + ".add", e.example + 1)
    h = g.node("Mul", [v.name, a.name], name + ".mul", v.example * a.example)
    return g.node("Mul", [h.name, g.const("half", 0.5)], name, ex)


@register_onnx_handler(nn.Softmax, nn.LogSoftmax)
def _softmax(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    dim = m.dim  # type: ignore[attr-defined]
    if dim is None:
        raise ValueError(f"layer {name!r}: {type(m).__name__} needs an explicit dim to export")
    op = "Softmax" if isinstance(m, nn.Softmax) else "LogSoftmax"
    return g.node(op, [v.name], name, m(v.example), axis=int(dim))


# ============================================================================ pooling, reshaping
def _pair(x: Any) -> list[int]:
    return [int(x), int(x)] if isinstance(x, int) else [int(i) for i in x]


@register_onnx_handler(nn.MaxPool2d)
def _maxpool(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    if getattr(m, "return_indices", False):
        raise ValueError(f"layer {name!r}: MaxPool2d(return_indices=True) cannot be exported")
    k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)  # type: ignore[attr-defined]
    p, d = _pair(m.padding), _pair(m.dilation)  # type: ignore[attr-defined]
    return g.node("MaxPool", [v.name], name, m(v.example), kernel_shape=k, strides=s, pads=p + p, dilations=d,
                  ceil_mode=int(bool(m.ceil_mode)), binary=v.binary)  # type: ignore[attr-defined]


@register_onnx_handler(nn.AvgPool2d)
def _avgpool(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    if m.divisor_override is not None:  # type: ignore[attr-defined]
        raise ValueError(f"layer {name!r}: AvgPool2d(divisor_override=...) cannot be exported")
    k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)  # type: ignore[attr-defined]
    return g.node("AveragePool", [v.name], name, m(v.example), kernel_shape=k, strides=s, pads=p + p,
                  ceil_mode=int(bool(m.ceil_mode)), count_include_pad=int(bool(m.count_include_pad)))  # type: ignore[attr-defined]


@register_onnx_handler(nn.AdaptiveAvgPool2d)
def _adaptive_avgpool(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    h, w = v.example.shape[-2:]
    out = m.output_size  # type: ignore[attr-defined]
    oh, ow = (out, out) if isinstance(out, int) else (out[0] or h, out[1] or w)
    ex = m(v.example)
    if (oh, ow) == (1, 1):
        return g.node("GlobalAveragePool", [v.name], name, ex)
    if h % oh or w % ow:
        raise ValueError(f"layer {name!r}: AdaptiveAvgPool2d from {h}x{w} to {oh}x{ow} is not a fixed pooling; cannot export")
    kh, kw = h // oh, w // ow
    return g.node("AveragePool", [v.name], name, ex, kernel_shape=[kh, kw], strides=[kh, kw])


@register_onnx_handler(nn.Flatten)
def _flatten(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    start, end = m.start_dim, m.end_dim  # type: ignore[attr-defined]
    if start != 1 or end not in (-1, v.example.dim() - 1):
        raise ValueError(f"layer {name!r}: only Flatten(start_dim=1, end_dim=-1) can be exported")
    return g.node("Flatten", [v.name], name, m(v.example), axis=1, binary=v.binary)


# ============================================================================ BatchNorm
def _bn_params(m: _BatchNorm, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if m.running_mean is None or m.running_var is None:
        raise ValueError(f"layer {name!r}: BatchNorm without running statistics uses batch statistics in eval mode; "
                         "it cannot be exported")
    n = m.num_features
    gamma = m.weight.detach() if m.weight is not None else torch.ones(n)
    beta = m.bias.detach() if m.bias is not None else torch.zeros(n)
    return gamma.float(), beta.float(), m.running_mean.detach().float(), m.running_var.detach().float()


@register_onnx_handler(_BatchNorm)
def _batchnorm(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    gamma, beta, mean, var = _bn_params(m, name)  # type: ignore[arg-type]
    ins = [v.name] + [g.const(f"{name}.{r}", t) for r, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
    return g.node("BatchNormalization", ins, name, m(v.example), epsilon=float(m.eps))  # type: ignore[attr-defined]


# ============================================================================ convolutions, dense
@dataclass
class _Weights:
    """A layer's weight as the graph uses it: ``w`` (±1 where ``binary``), a per-output-channel
    magnitude folded out of the weight (``None``: 1), the output scale and bias."""

    w: Tensor
    binary: bool
    magnitude: Tensor | None
    scale: Tensor | None
    bias: Tensor | None

    def channel_scale(self) -> Tensor | None:
        """``magnitude * scale`` (``None`` when both are 1)."""
        if self.magnitude is None:
            return self.scale
        return self.magnitude if self.scale is None else self.magnitude * self.scale


def _split_sign_magnitude(q: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """``q = a_c * s`` with ±1 ``s`` and one ``a_c > 0`` per output channel? ``(s, a or None)``."""
    a = q.abs().flatten(1)
    a0 = a[:, :1]
    if not bool((a == a0).all()) or not bool((a0 > 0).all()):
        return None
    s = sign(q)
    mag = a0.reshape(-1)
    return s, (None if bool((mag == 1).all()) else mag)


def _layer_weights(m: nn.Module, name: str) -> _Weights:
    bias = m.bias.detach().float() if getattr(m, "bias", None) is not None else None
    if isinstance(m, BinaryLayer):
        scale = m.output_scale()
        scale = None if scale is None else scale.detach().float()
        if m.has_binary_weight:
            q = m.quantized_weight().detach().float()
            split = _split_sign_magnitude(q)
            if split is None:
                raise ValueError(f"layer {name!r}: its quantized weight is not ±1 times one magnitude per output channel")
            return _Weights(split[0], True, split[1], scale, bias)
        return _Weights(m.weight.detach().float(), False, None, scale, bias)
    scale = getattr(m, "scale", None)  # float twins' learnable scale
    scale = scale.detach().float() if isinstance(scale, Tensor) else None
    return _Weights(m.weight.detach().float(), False, None, scale, bias)


def _weight_input(g: OnnxGraph, wt: _Weights, name: str, transpose: bool = False) -> str:
    """The weight tensor name for Conv/Gemm: the ±1 initializer (``onnx``), or ``BipolarQuant``
    of it with the magnitude as scale (``qonnx``; the magnitude is then not in ``channel_scale``)."""
    w = wt.w
    if g.fmt == "qonnx" and wt.binary:
        init = g.const(name + ".weight", w)
        mag = wt.magnitude
        scale = g.const("one", 1.0) if mag is None else g.const(name + ".weight_scale", mag.reshape((-1,) + (1,) * (w.dim() - 1)))
        ex = w if mag is None else w * mag.reshape((-1,) + (1,) * (w.dim() - 1))
        return g.node("BipolarQuant", [init, scale], name + ".weight_q", ex, domain=QONNX_DOMAIN, binary=mag is None,
                      batched=False).name
    if wt.binary and g.weight_storage == "bits":
        return _unpacked_weight(g, w, name)
    return g.const(name + ".weight", w)


def _unpacked_weight(g: OnnxGraph, w: Tensor, name: str) -> str:
    """±1 weight stored as bits (``numpy.packbits`` order along each output channel, bit 1 = +1,
    as in the safetensors export) and unpacked by the graph: ``BitShift`` by 7..0, ``Mod 2``,
    ``Cast``, ``2b - 1``. Every input is an initializer, so runtimes fold it once at load time."""
    import numpy as np

    o = w.shape[0]
    m = w[0].numel()
    bits = np.packbits((w.reshape(o, m) > 0).numpy().astype(np.uint8), axis=1)  # (O, ceil(M/8))
    nbytes = bits.shape[1]
    c = g.const(name + ".weight_bits", torch.from_numpy(bits).reshape(o, nbytes, 1), torch.uint8)
    shifts = g.const("bit_shifts", torch.arange(7, -1, -1, dtype=torch.uint8), torch.uint8)
    ex_u8 = torch.zeros((o, nbytes, 8), dtype=torch.uint8)
    sh = g.node("BitShift", [c, shifts], name + ".weight_shift", ex_u8, batched=False, direction="RIGHT")
    bit = g.node("Mod", [sh.name, g.const("two_u8", torch.tensor([2], dtype=torch.uint8), torch.uint8)], name + ".weight_bit",
                 ex_u8, batched=False)
    flat = g.node("Reshape", [bit.name, g.const(f"shape_{o}x{nbytes * 8}", [o, nbytes * 8], torch.int64)], name + ".weight_flat",
                  torch.zeros((o, nbytes * 8), dtype=torch.uint8), batched=False)
    if nbytes * 8 != m:
        flat = g.node("Slice", [flat.name, g.const("zero_i64", [0], torch.int64), g.const(f"end_{m}", [m], torch.int64),
                                g.const("one_i64", [1], torch.int64)], name + ".weight_cut",
                      torch.zeros((o, m), dtype=torch.uint8), batched=False)
    f = g.node("Cast", [flat.name], name + ".weight_float", torch.zeros((o, m)), batched=False, to=1)
    two = g.node("Mul", [f.name, g.const("two", 2.0)], name + ".weight_2b", torch.zeros((o, m)), batched=False)
    pm = g.node("Sub", [two.name, g.const("one", 1.0)], name + ".weight_pm1", torch.zeros((o, m)), batched=False)
    out = g.node("Reshape", [pm.name, g.const("wshape_" + "x".join(map(str, w.shape)), list(w.shape), torch.int64)],
                 name + ".weight", w, batched=False)
    return out.name


def _post_scale(g: OnnxGraph, wt: _Weights) -> Tensor | None:
    # in QONNX the weight magnitude is inside BipolarQuant; only the output scale is left
    return wt.scale if (g.fmt == "qonnx" and wt.binary) else wt.channel_scale()


def _graph_weight(g: OnnxGraph, wt: _Weights) -> Tensor:
    """The weight the Conv/Gemm node multiplies with: ±1, or ``a·sign(W)`` where the QONNX
    ``BipolarQuant`` carries the magnitude ``a``."""
    if g.fmt == "qonnx" and wt.binary and wt.magnitude is not None:
        return wt.w * wt.magnitude.reshape((-1,) + (1,) * (wt.w.dim() - 1))
    return wt.w


def _input_of(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    q = getattr(m, "input_quantizer", None)
    return v if q is None else emit(g, q, v, f"{name}.input")


def _linear_core(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> tuple[Value, _Weights]:
    """``x W^T`` (no scale, no bias) of a dense layer, after its input quantizer."""
    if v.example.dim() != 2:
        raise ValueError(f"layer {name!r}: dense layers on inputs of rank {v.example.dim()} cannot be exported (rank 2 only)")
    x = _input_of(g, m, v, name)
    wt = _layer_weights(m, name)
    w_name = _weight_input(g, wt, name)
    y = g.node("Gemm", [x.name, w_name], name + ".matmul", F.linear(x.example, _graph_weight(g, wt)), transB=1)
    return y, wt


def _conv_core(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> tuple[Value, _Weights]:
    """The convolution (no scale, no bias) of a conv layer, after its input quantizer and padding."""
    x = _input_of(g, m, v, name)
    wt = _layer_weights(m, name)
    nd = len(m.kernel_size)  # type: ignore[attr-defined]
    stride, dilation = list(m.stride), list(m.dilation)  # type: ignore[attr-defined]
    kernel, groups = list(m.kernel_size), int(m.groups)  # type: ignore[attr-defined]
    pads = explicit_padding(m.padding, kernel, dilation, stride)  # type: ignore[attr-defined]
    pad_value = float(getattr(m, "pad_value", 0.0))
    mode = str(m.padding_mode)  # type: ignore[attr-defined]
    conv_pads = [0] * (2 * nd)
    if any(pads):
        if mode != "zeros" or pad_value != 0.0:
            x = g.pad(x, pads, mode, pad_value, name)
        else:  # ONNX Conv pads: begins of every spatial axis, then ends
            for i in range(nd):
                axis = nd - 1 - i
                conv_pads[axis], conv_pads[nd + axis] = pads[2 * i], pads[2 * i + 1]
    w_name = _weight_input(g, wt, name)
    w_ref = _graph_weight(g, wt)
    conv = F.conv1d if nd == 1 else F.conv2d
    ex_in = x.example
    if any(conv_pads):
        ex_in = F.pad(ex_in, pads)
    ex = conv(ex_in, w_ref, None, stride, 0, dilation, groups)
    y = g.node("Conv", [x.name, w_name], name + ".conv", ex, kernel_shape=kernel, strides=stride, pads=conv_pads,
               dilations=dilation, group=groups)
    return y, wt


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d))


@register_onnx_handler(nn.Conv1d, nn.Conv2d, nn.Linear)
def _conv_or_linear(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    y, wt = (_conv_core if _is_conv(m) else _linear_core)(g, m, v, name)
    return g.mul_add(y, _post_scale(g, wt), wt.bias, name)


def _integer_output(m: nn.Module, x_binary: bool) -> int | None:
    """``K`` (number of ±1 terms per output) where ``m`` computes an integer pre-activation
    ``y`` from ±1 inputs and ±1 weights (pad value 0 or ±1), else ``None``."""
    if not isinstance(m, BinaryLayer) or not m.has_binary_weight:
        return None
    q = getattr(m, "input_quantizer", None)
    binary_in = x_binary or (q is not None and isinstance(q, Quantizer) and quantizer_name(q) in _SIGN_ALIASES)
    if not binary_in:
        return None
    if _is_conv(m):
        if float(getattr(m, "pad_value", 0.0)) not in (0.0, 1.0, -1.0) or m.padding_mode != "zeros":  # type: ignore[attr-defined]
            return None
        k = m.weight.shape[1]
        for s in m.kernel_size:  # type: ignore[attr-defined]
            k *= int(s)
        return int(k)
    return int(m.weight.shape[1])


def _commutes_with_sign(m: nn.Module) -> bool:
    return isinstance(m, (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d))


def _starts_with_sign(m: nn.Module) -> bool:
    q = m if isinstance(m, Quantizer) else getattr(m, "input_quantizer", None)
    return isinstance(q, Quantizer) and quantizer_name(q) in _SIGN_ALIASES


def _try_fold(g: OnnxGraph, children: list[tuple[str, nn.Module]], i: int, v: Value) -> tuple[Value, int] | None:
    """Fold ``children[i]`` (binary layer) + max-pools + BatchNorm + ... + sign into a threshold.

    Returns the thresholded ±1 value and the index of the first child not consumed, or ``None``
    where folding would not be exact (then nothing was emitted)."""
    name, layer = children[i]
    k = _integer_output(layer, v.binary)
    if k is None:
        return None
    j = i + 1
    pools: list[tuple[str, nn.Module]] = []
    while j < len(children) and isinstance(children[j][1], nn.MaxPool2d):
        pools.append(children[j])
        j += 1
    if j >= len(children) or not isinstance(children[j][1], _BatchNorm):
        return None
    bn_name, bn = children[j]
    after = j + 1
    while after < len(children) and _commutes_with_sign(children[after][1]):
        after += 1
    if after >= len(children) or not _starts_with_sign(children[after][1]):
        return None
    if bn.running_mean is None or bn.running_var is None:
        return None
    wt = _layer_weights(layer, name)
    s = wt.channel_scale()
    if pools and s is not None and not bool((s > 0).all()):
        return None
    gamma, beta, mean, var = _bn_params(bn, bn_name)
    from .export import fold_bn_threshold  # the folding of the safetensors export, shared

    try:
        t, flip = fold_bn_threshold(k, bn.weight, bn.bias, mean, var, float(bn.eps), scale=s, bias=wt.bias)
    except ValueError:
        return None
    y, _ = (_conv_core if _is_conv(layer) else _linear_core)(g, layer, v, name)
    for pname, pool in pools:
        y = emit(g, pool, y, pname)
    # reference example: the real chain, to keep shapes and values honest
    ref = bn(_scale_bias(y.example, s, wt.bias))
    p = torch.where(flip, -torch.ones(len(flip)), torch.ones(len(flip)))
    tt = g.channel(t.float(), y.example)
    pp = g.channel(p, y.example)
    ge = g.node("GreaterOrEqual", [y.name, g.const(bn_name + ".threshold", tt)], bn_name + ".ge", y.example >= tt)
    out = g.node("Where", [ge.name, g.const(bn_name + ".pos", pp), g.const(bn_name + ".neg", -pp)], bn_name + ".sign",
                 sign(ref), binary=True)
    g.folds.append({"layer": name, "batchnorm": bn_name})
    return out, j + 1


def _scale_bias(y: Tensor, s: Tensor | None, b: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if s is not None:
        y = y * s.view(shape)
    if b is not None:
        y = y + b.view(shape)
    return y


def _plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward only chains its children (flipnet's ``SequentialModel``
    adds an input-shape check, which changes nothing for valid inputs)."""
    from ..models.common import SequentialModel

    return type(m).forward in (nn.Sequential.forward, SequentialModel.forward)


@register_onnx_handler(nn.Sequential)
def _sequential(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    if not _plain_sequential(m):
        raise ValueError(f"layer {name or type(m).__name__!r}: a {type(m).__name__} with its own forward cannot be exported")
    prefix = f"{name}." if name else ""
    children = [(prefix + n, c) for n, c in m.named_children()]
    i = 0
    while i < len(children):
        folded = _try_fold(g, children, i, v) if (g.fold_batchnorm and g.fmt == "onnx") else None
        if folded is not None:
            v, i = folded
            continue
        cname, child = children[i]
        v = emit(g, child, v, cname)
        i += 1
    return v


# ============================================================================ ResNets
def _register_resnets() -> None:
    from ..models.resnet import BasicBlock, BiRealBlock, PadShortcut, ResNet

    @register_onnx_handler(PadShortcut)
    def _pad_shortcut(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        x = v
        s = int(m.stride)  # type: ignore[attr-defined]
        if s > 1:
            ex = x.example[:, :, ::s, ::s]
            ins = [x.name, g.const("slice_start", [0, 0], torch.int64), g.const("slice_end", [2**62, 2**62], torch.int64),
                   g.const("slice_axes", [2, 3], torch.int64), g.const(f"slice_step{s}", [s, s], torch.int64)]
            x = g.node("Slice", ins, name + ".subsample", ex)
        extra = int(m.extra)  # type: ignore[attr-defined]
        if extra:
            before = extra // 2
            x = g.pad(x, [0, 0, 0, 0, before, extra - before], "zeros", 0.0, name)
        return x

    @register_onnx_handler(BiRealBlock)
    def _bireal(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        a = emit(g, m.bn1, emit(g, m.conv1, v, name + ".conv1"), name + ".bn1")  # type: ignore[arg-type]
        d = emit(g, m.downsample, v, name + ".downsample")  # type: ignore[arg-type]
        out = g.node("Add", [a.name, d.name], name + ".add1", a.example + d.example)
        b = emit(g, m.bn2, emit(g, m.conv2, out, name + ".conv2"), name + ".bn2")  # type: ignore[arg-type]
        return g.node("Add", [b.name, out.name], name + ".add2", b.example + out.example)

    @register_onnx_handler(BasicBlock)
    def _basic(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        a = emit(g, m.bn1, emit(g, m.conv1, v, name + ".conv1"), name + ".bn1")  # type: ignore[arg-type]
        a = emit(g, m.act1, a, name + ".act1")  # type: ignore[arg-type]
        b = emit(g, m.bn2, emit(g, m.conv2, a, name + ".conv2"), name + ".bn2")  # type: ignore[arg-type]
        d = emit(g, m.downsample, v, name + ".downsample")  # type: ignore[arg-type]
        out = g.node("Add", [b.name, d.name], name + ".add", b.example + d.example)
        return emit(g, m.act2, out, name + ".act2")  # type: ignore[arg-type]

    @register_onnx_handler(ResNet)
    def _resnet(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        x = emit(g, m.stem, v, "stem")  # type: ignore[arg-type]
        for stage in m.stages:  # type: ignore[attr-defined]
            x = emit(g, getattr(m, stage), x, stage)
        x = emit(g, m.pool, x, "pool")  # type: ignore[arg-type]
        x = g.node("Flatten", [x.name], "flatten", x.example.flatten(1), axis=1)
        x = emit(g, m.dropout, x, "dropout")  # type: ignore[arg-type]
        return emit(g, m.fc, x, "fc")  # type: ignore[arg-type]


_register_resnets()


@register_onnx_handler(nn.PReLU)
def _prelu(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    w = m.weight.detach().float()  # type: ignore[attr-defined]
    slope = w.reshape((-1,) + (1,) * (v.example.dim() - 2)) if w.numel() > 1 else w.reshape(1)
    return g.node("PRelu", [v.name, g.const(name + ".slope", slope)], name, m(v.example))


def _register_reactnets() -> None:
    """ReActNet-A and Bi-Real Net 18/34 (:mod:`flipnet.models.reactnet`, :mod:`flipnet.models.bireal`)."""
    from ..models.bireal import BiRealNet, BiRealUnit
    from ..models.reactnet import LearnableBias, ReActBlock, ReActNet, RPReLU

    @register_onnx_handler(LearnableBias)
    def _bias(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        b = m.bias.detach().float().reshape((1, -1) + (1,) * (v.example.dim() - 2))  # type: ignore[attr-defined]
        return g.node("Add", [v.name, g.const(name + ".bias", b)], name, v.example + b)

    @register_onnx_handler(RPReLU)
    def _rprelu(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        for part in ("move_in", "prelu", "move_out"):
            v = emit(g, getattr(m, part), v, f"{name}.{part}")
        return v

    @register_onnx_handler(ReActBlock)
    def _react_block(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        a = emit(g, m.bn1, emit(g, m.conv3x3, emit(g, m.move1, v, name + ".move1"), name + ".conv3x3"), name + ".bn1")  # type: ignore[arg-type]
        p = emit(g, m.pool, v, name + ".pool")  # type: ignore[arg-type]
        y1 = emit(g, m.act1, g.node("Add", [a.name, p.name], name + ".add1", a.example + p.example), name + ".act1")  # type: ignore[arg-type]
        z = emit(g, m.move2, y1, name + ".move2")  # type: ignore[arg-type]
        if m.duplicate:  # type: ignore[attr-defined]
            halves = []
            for h in ("a", "b"):
                c = emit(g, getattr(m, f"bn2{h}"), emit(g, getattr(m, f"conv1x1{h}"), z, f"{name}.conv1x1{h}"), f"{name}.bn2{h}")
                halves.append(g.node("Add", [c.name, y1.name], f"{name}.add2{h}", c.example + y1.example))
            y2 = g.node("Concat", [h.name for h in halves], name + ".cat", torch.cat([h.example for h in halves], dim=1), axis=1)
        else:
            c = emit(g, m.bn2, emit(g, m.conv1x1, z, name + ".conv1x1"), name + ".bn2")  # type: ignore[arg-type]
            y2 = g.node("Add", [c.name, y1.name], name + ".add2", c.example + y1.example)
        return emit(g, m.act2, y2, name + ".act2")  # type: ignore[arg-type]

    @register_onnx_handler(BiRealUnit)
    def _bireal_unit(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        a = emit(g, m.bn, emit(g, m.conv, emit(g, m.move, v, name + ".move"), name + ".conv"), name + ".bn")  # type: ignore[arg-type]
        sc = emit(g, m.shortcut, v, name + ".shortcut")  # type: ignore[arg-type]
        return emit(g, m.act, g.node("Add", [a.name, sc.name], name + ".add", a.example + sc.example), name + ".act")  # type: ignore[arg-type]

    def _head(g: OnnxGraph, m: nn.Module, x: Value) -> Value:
        x = emit(g, m.pool, x, "pool")  # type: ignore[arg-type]
        x = g.node("Flatten", [x.name], "flatten", x.example.flatten(1), axis=1)
        x = emit(g, m.dropout, x, "dropout")  # type: ignore[arg-type]
        return emit(g, m.fc, x, "fc")  # type: ignore[arg-type]

    @register_onnx_handler(ReActNet)
    def _reactnet(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        return _head(g, m, emit(g, m.blocks, emit(g, m.stem, v, "stem"), "blocks"))  # type: ignore[arg-type]

    @register_onnx_handler(BiRealNet)
    def _birealnet(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        x = emit(g, m.stem, v, "stem")  # type: ignore[arg-type]
        for stage in m.stages:  # type: ignore[attr-defined]
            x = emit(g, getattr(m, stage), x, stage)
        return _head(g, m, x)


_register_reactnets()


@register_onnx_handler(nn.Upsample)
def _upsample(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
    sf = m.scale_factor  # type: ignore[attr-defined]
    if m.mode != "nearest" or sf is None or m.size is not None:  # type: ignore[attr-defined]
        raise ValueError(f"layer {name!r}: only Upsample(scale_factor=..., mode='nearest') can be exported")
    nd = v.example.dim() - 2
    factors = [float(f) for f in (sf if isinstance(sf, tuple) else (sf,) * nd)]
    scales = g.const(name + ".scales", [1.0, 1.0, *factors])
    # PyTorch's nearest: source index floor(dst / scale), i.e. ONNX "asymmetric" + "floor"
    return g.node("Resize", [v.name, "", scales], name, m(v.example), mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor", binary=v.binary)


def _register_unet() -> None:
    from ..models.unet import BinaryUnit, UNet

    @register_onnx_handler(BinaryUnit)
    def _unit(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        out = emit(g, m.bn, emit(g, m.conv, v, name + ".conv"), name + ".bn")  # type: ignore[arg-type]
        if m.residual:  # type: ignore[attr-defined]
            out = g.node("Add", [out.name, v.name], name + ".add", out.example + v.example)
        return out

    @register_onnx_handler(UNet)
    def _unet(g: OnnxGraph, m: nn.Module, v: Value, name: str) -> Value:
        x = emit(g, m.stem, v, "stem")  # type: ignore[arg-type]
        skips = []
        for i, enc in enumerate(m.encoder):  # type: ignore[arg-type]
            x = emit(g, enc, x, f"encoder.{i}")
            skips.append(x)
        x = emit(g, m.dropout, skips.pop(), "dropout")  # type: ignore[arg-type]
        for i in reversed(range(m.depth)):  # type: ignore[attr-defined]
            up = emit(g, m.up[i], x, f"up.{i}")  # type: ignore[index]
            cat = g.node("Concat", [up.name, skips[i].name], f"cat.{i}", torch.cat([up.example, skips[i].example], dim=1), axis=1)
            x = emit(g, m.decoder[i], cat, f"decoder.{i}")  # type: ignore[index]
        return emit(g, m.head, x, "head")  # type: ignore[arg-type]


_register_unet()


# ============================================================================ entry point
def export_onnx(
    model: nn.Module,
    path: str | Path | None,
    *,
    input_shape: Sequence[int],
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    fold_batchnorm: bool = True,
    batch_size: int | None = None,
    metadata: dict[str, Any] | None = None,
    weight_storage: str = "float",
    input_quant: tuple[float, int] | None = None,
) -> Any:
    """Write ``model`` (its eval-mode forward pass) as an ONNX or QONNX graph.

    Args:
        model: a flipnet model (flat ``nn.Sequential`` zoo models, the ResNets) or any module
            built from the supported layers. It is not changed (its mode is restored).
        path: output file (``.onnx``), written atomically; ``None`` only builds the graph.
        input_shape: shape of one sample, ``(C, H, W)`` (or ``(F,)`` for dense inputs).
        format: ``"onnx"`` (standard operators, runs in ONNX Runtime) or ``"qonnx"``
            (``BipolarQuant`` nodes for every 1-bit tensor, for FINN and QONNX's executor).
        opset: ONNX opset of the default domain (13 to the installed ONNX's latest; default 19).
        fold_batchnorm: ``"onnx"`` only: fold BatchNorm + sign after binary layers into integer
            thresholds where exact (default ``True``); ``False`` keeps every ``BatchNormalization``.
        batch_size: fixed batch dimension; ``None`` (default) makes it the symbol ``N`` for
            ``"onnx"`` and 1 for ``"qonnx"`` (FINN needs fixed shapes).
        metadata: extra JSON-serialisable entries stored under the model's ``metadata_props``
            key ``flipnet`` (next to ``format``, ``opset``, ``input_shape`` and the folds).
        weight_storage: ``"onnx"`` only: ``"float"`` (default) stores ±1 weights as float32
            initializers; ``"bits"`` stores them packed 8 per byte (like the safetensors export)
            and unpacks them with ``BitShift``/``Mod``/``Cast`` nodes that ONNX Runtime folds into
            constants when the session is created (a ~32× smaller file, the same outputs).
        input_quant: ``"qonnx"`` only: ``(scale, bits)`` puts a QONNX ``Quant`` node (signed,
            narrow range, zero point 0, round to nearest) on the input, so that FINN sees an
            integer input: :data:`IMAGE_INPUT_QUANT` is exact for flipnet's 8-bit image data.
            Inputs off that grid are rounded to it. Default ``None``: the input stays float.

    Returns:
        The ``onnx.ModelProto`` (checked with ``onnx.checker`` for ``"onnx"``).

    Raises:
        ValueError: an unknown format, an opset out of range, a bad input shape, or a layer that
            cannot be exported (the message names it).
    """
    import onnx
    from onnx import TensorProto, helper

    if format not in ONNX_FORMATS:
        raise ValueError(f"format must be one of {', '.join(ONNX_FORMATS)}, got {format!r}")
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {latest} (this onnx's latest), got {opset!r}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be the positive shape of one sample, e.g. (3, 32, 32), got {tuple(input_shape)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if batch_size is None and format == "qonnx":
        batch_size = 1
    if weight_storage not in ("float", "bits") or (weight_storage == "bits" and format != "onnx"):
        raise ValueError(f"weight_storage must be 'float' or 'bits' ('bits' for format='onnx' only), got {weight_storage!r}")
    if input_quant is not None:
        if format != "qonnx":
            raise ValueError("input_quant needs format='qonnx' (ONNX has no integer Quant node of this kind)")
        try:
            q_scale, q_bits = float(input_quant[0]), input_quant[1]
        except (TypeError, IndexError, ValueError):
            raise ValueError(f"input_quant must be (scale, bits), got {input_quant!r}") from None
        if not (q_scale > 0 and math.isfinite(q_scale)) or isinstance(q_bits, bool) or not isinstance(q_bits, int) or not 2 <= q_bits <= 32:
            raise ValueError(f"input_quant must be (scale > 0, bits in 2..32), got {input_quant!r}")
    g = OnnxGraph(fmt=format, opset=opset, fold_batchnorm=bool(fold_batchnorm), batch=batch_size, weight_storage=weight_storage)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((1, *shape))
            try:
                ref = model(x)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"the model does not accept inputs of shape (N, {', '.join(map(str, shape))}): {err}") from None
            inp = Value("input", x)
            g._names.add("input")
            if input_quant is not None:
                lim = 2 ** (q_bits - 1) - 1
                ex = torch.round(x / q_scale).clamp(-lim, lim) * q_scale
                ins = [inp.name, g.const("input_scale", q_scale), g.const("zero", 0.0), g.const("input_bits", float(q_bits))]
                inp = g.node("Quant", ins, "input_q", ex, domain=QONNX_DOMAIN, signed=1, narrow=1, rounding_mode="ROUND")
            out = emit(g, model, inp, "")
            if tuple(out.example.shape) != tuple(ref.shape):
                raise ValueError(f"internal error: exported graph gives shape {tuple(out.example.shape)}, model {tuple(ref.shape)}")
    finally:
        model.train(was_training)
    # the output gets a stable name
    logits = g.node("Identity", [out.name], "logits", out.example)
    g.value_info = [vi for vi in g.value_info if vi.name != "logits"]
    dims: list[Any] = [batch_size if batch_size is not None else "N", *shape]
    graph = helper.make_graph(
        g.nodes,
        "flipnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [g._shape_info(logits.name, out.example)],
        initializer=g.initializers,
        value_info=g.value_info,
    )
    opsets = [helper.make_opsetid("", opset)]
    if format == "qonnx":
        opsets.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    from .. import __version__

    proto = helper.make_model(graph, opset_imports=opsets, producer_name="flipnet", producer_version=str(__version__))
    proto.ir_version = min(proto.ir_version, _max_ir_version(opset))
    doc = {"format": format, "opset": opset, "input_shape": list(shape), "folds": g.folds,
           "input_quant": None if input_quant is None else [q_scale, q_bits], **(metadata or {})}
    helper.set_model_props(proto, {"flipnet": json.dumps(doc)})
    if format == "onnx":
        onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(proto.SerializeToString())
    return proto


def _max_ir_version(opset: int) -> int:
    """The IR version that goes with ``opset`` in ONNX's version table (older runtimes refuse newer IRs)."""
    from onnx import helper

    best = None
    for _release, ir, default_opset, *_ in helper.VERSION_TABLE:
        if default_opset >= opset:
            best = ir if best is None else min(best, ir)
    return best if best is not None else helper.VERSION_TABLE[-1][1]


def default_onnx_path(run: str | Path, format: str = "onnx") -> Path:
    """``RUN/export.onnx`` (``RUN/export.qonnx.onnx`` for QONNX) for a run folder, else the
    checkpoint path with that suffix."""
    run = Path(run)
    name = "export.onnx" if format == "onnx" else "export.qonnx.onnx"
    return run / name if run.is_dir() else run.with_suffix(".onnx" if format == "onnx" else ".qonnx.onnx")


def export_run_onnx(
    model: nn.Module,
    run: str | Path,
    out: str | Path | None = None,
    format: str = "onnx",
    *,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
    opset: int = DEFAULT_OPSET,
    input_quant: bool = True,
) -> int:
    """What ``flipnet export RUN --format onnx|qonnx`` does with a loaded run: write the graph,
    run it on 8 random inputs (ONNX Runtime, or QONNX's executor) and compare the logits.
    QONNX files get the integer input ``Quant`` of :data:`IMAGE_INPUT_QUANT` unless
    ``input_quant=False`` (every flipnet data set feeds 8-bit images scaled to ``u/127.5 - 1``).

    Prints one line per step; returns the exit status (1 when the graph does not reproduce the
    model). Raises :class:`~flipnet.errors.ConfigError` when the model records no input shape or
    the runtime is not installed, and :class:`~flipnet.errors.ExportFormatError` for a layer that
    cannot be exported.
    """
    from ..errors import ConfigError, ExportFormatError

    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ConfigError("this model does not record its input shape, so it cannot be exported to ONNX")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install onnx onnxruntime (or flipnet[onnx])") from None
    path = Path(out) if out is not None else default_onnx_path(run, format)
    try:
        quant = IMAGE_INPUT_QUANT if (format == "qonnx" and input_quant) else None
        proto = export_onnx(model, path, input_shape=tuple(shape), format=format, opset=opset, metadata=metadata,
                            input_quant=quant)
    except ValueError as err:
        raise ExportFormatError(str(err)) from None
    n_quant = sum(n.op_type == "BipolarQuant" for n in proto.graph.node)
    folds = json.loads({p.key: p.value for p in proto.metadata_props}["flipnet"])["folds"]
    what = (f"{len(folds)} BatchNorm layer{'s' if len(folds) != 1 else ''} folded into thresholds" if format == "onnx"
            else f"{n_quant} BipolarQuant nodes" + ("; input Quant INT9, scale 1/255 (8-bit images)" if quant else ""))
    print(f"wrote {path}: {path.stat().st_size:,} bytes, {format} (opset {opset}, {len(proto.graph.node)} nodes; {what})")
    if not verify:
        return 0
    g = torch.Generator().manual_seed(0)
    batch = 8 if format == "onnx" else 1
    # inputs as the data loaders make them: 8-bit pixels u as u/127.5 - 1
    x = torch.randint(0, 256, (batch, *shape), generator=g).float() / 127.5 - 1
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            print("not verified: onnxruntime is not installed (pip install onnxruntime)")
            return 0
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        runtime = "onnxruntime"
    else:
        try:
            from qonnx.core.modelwrapper import ModelWrapper
            from qonnx.core.onnx_exec import execute_onnx
        except ImportError:
            print("not verified: qonnx is not installed (pip install qonnx)")
            return 0
        got = execute_onnx(ModelWrapper(proto), {"input": x.numpy()})["logits"]
        runtime = "qonnx's executor"
    diff = float(abs(ref - got).max())
    same = bool((ref.argmax(1) == got.argmax(1)).all())
    print(f"verified with {runtime} on {batch} random input{'s' if batch > 1 else ''}: max |logit difference| {diff:.3g}, "
          f"same predictions: {same}")
    if not same or diff > 1e-3:
        print("warning: the ONNX graph does not reproduce the trained model; please report this")
        return 1
    return 0
