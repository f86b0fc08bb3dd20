"""The layer-codec registry of the export: how each module becomes file entries, and back.

A :class:`LayerCodec` owns one entry type of the ``flipnet-export`` graph (its ``"type"`` field):
``encode`` turns a module of one of its ``modules`` classes into entries, ``decode`` turns one
entry back into inference modules. Adding a layer type is one :func:`register_codec` call; the
export walks a model by looking up each module's class (along its MRO) in the registry, and the
loader looks up each entry's type. Codecs whose ``decode`` is ``None`` only describe structure:
``nn.Sequential`` flattens into its parent's list, and the ResNets and their blocks become plain
entries plus ``residual`` entries (``out = post(body(x) + shortcut(x))``), so a loaded model is
built from a small set of generic modules whatever the architecture.

Built-in entry types: ``binary_conv``, ``binary_linear``, ``real_conv``, ``real_linear``,
``batchnorm``, ``threshold`` (made by BatchNorm folding), ``maxpool2d``, ``avgpool2d``,
``adaptive_avgpool2d``, ``flatten``, ``activation``, ``pad_shortcut``, ``bias_add``, ``prelu``,
``residual``, ``concat``; structural codecs: ``sequential``, ``dropped`` (identity, dropout),
``resnet``, ``bireal_block``, ``basic_block``, ``birealnet``, ``bireal_unit``, ``rprelu``,
``reactnet``, ``react_block``. See ``docs/deployment.md`` for each entry's fields and for how to add a type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ...errors import ExportFormatError
from ...functional import conv_nd, explicit_padding
from ...layers import BinaryConv1d, BinaryConv2d, BinaryLayer, BinaryLinear
from ...models.common import FloatConv2d, FloatLinear, SequentialModel
from ...models.bireal import BiRealNet, BiRealUnit
from ...models.reactnet import LearnableBias, ReActBlock, ReActNet, RPReLU
from ...models.resnet import BasicBlock, BiRealBlock, PadShortcut, ResNet
from ...quantizers import Quantizer, quantizer_name, sign
from .. import qbn
from ..pack import pack_bits, pack_words, packed_size, unpack_bits, unpack_indices
from ..packed import BinaryWeightConv, BinaryWeightLinear, MaxPool2d, PackedBinaryConv2d, PackedBinaryLinear, ThresholdSign
from .format import Entry, Reader

__all__ = [
    "LayerCodec",
    "Encoder",
    "register_codec",
    "get_codec",
    "codec_for",
    "list_codecs",
    "decode_entries",
    "residual_entry",
    "concat_entry",
    "Residual",
    "Concat",
]

EncodeFn = Callable[[str, nn.Module, "Encoder"], list[Entry]]
DecodeFn = Callable[[Reader], list[nn.Module]]


@dataclass(frozen=True)
class LayerCodec:
    """How one entry type of the export graph is written and read.

    Attributes:
        type: the entry's ``"type"`` in the file (unique in the registry).
        modules: module classes this codec encodes; a module is encoded by the codec of the first
            class of its MRO that is registered (so subclasses are covered unless ``encode``
            refuses them).
        encode: ``encode(name, module, encoder) -> entries`` (``name``: the module's path in the
            model; ``encoder.module(...)``/``encoder.children(...)`` encode sub-modules). May return
            entries of other types, or none (the module is dropped at inference).
        decode: ``decode(reader) -> modules`` for one entry of this type (``None``: the codec only
            describes structure and never appears in a file).
        root: the codec may encode a whole model (``export_model(model)``), not only a layer.
    """

    type: str
    modules: tuple[type[nn.Module], ...] = ()
    encode: EncodeFn | None = None
    decode: DecodeFn | None = None
    root: bool = False


_CODECS: dict[str, LayerCodec] = {}
_BY_MODULE: dict[type, LayerCodec] = {}


def register_codec(codec: LayerCodec, *, replace: bool = False) -> LayerCodec:
    """Add ``codec`` to the registry (``replace=True`` overrides an existing type); returns it.

    Raises:
        ValueError: the type, or one of its module classes, already has a codec.
    """
    if not replace:
        if codec.type in _CODECS:
            raise ValueError(f"an export codec for entry type {codec.type!r} is already registered")
        taken = [cls.__name__ for cls in codec.modules if cls in _BY_MODULE]
        if taken:
            raise ValueError(f"modules {taken} already have an export codec; pass replace=True to override")
    _CODECS[codec.type] = codec
    for cls in codec.modules:
        _BY_MODULE[cls] = codec
    return codec


def get_codec(type_: str) -> LayerCodec | None:
    """The codec of entry type ``type_``, or ``None``."""
    return _CODECS.get(type_)


def codec_for(module: nn.Module) -> LayerCodec | None:
    """The codec that encodes ``module``: the first class of its MRO with a registered codec."""
    for cls in type(module).__mro__:
        codec = _BY_MODULE.get(cls)
        if codec is not None:
            return codec
    return None


def list_codecs() -> list[str]:
    """Registered entry types, sorted."""
    return sorted(_CODECS)


class Encoder:
    """Walks a model through the registry (passed to every ``encode``)."""

    def module(self, name: str, m: nn.Module) -> list[Entry]:
        """Entries for module ``m`` at path ``name``."""
        codec = codec_for(m)
        if codec is None or codec.encode is None:
            raise ValueError(f"layer {name!r}: cannot export a {type(m).__name__}; supported layers are listed in docs/deployment.md")
        return codec.encode(name, m, self)

    def children(self, m: nn.Module, prefix: str = "", names: tuple[str, ...] | None = None) -> list[Entry]:
        """Entries of ``m``'s children in order (only ``names``, in that order, when given)."""
        out: list[Entry] = []
        kids = dict(m.named_children())
        for n in (names if names is not None else tuple(kids)):
            out.extend(self.module(f"{prefix}{n}", kids[n]))
        return out


def decode_entries(readers: list[Reader]) -> list[nn.Module]:
    """Inference modules for a list of entries (one branch of the graph)."""
    modules: list[nn.Module] = []
    for r in readers:
        typ = r.get("type", str)
        codec = _CODECS.get(typ)
        if codec is None or codec.decode is None:
            raise r.fail(f"unknown layer type {typ!r}")
        try:
            modules.extend(codec.decode(r))
        except ExportFormatError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError, OverflowError) as err:
            raise r.fail(str(err)) from None
    return modules


def _exact(name: str, m: nn.Module, *classes: type) -> None:
    """Refuse subclasses (their forward may differ from what the entry type describes)."""
    if type(m) not in classes:
        raise ValueError(f"layer {name!r}: cannot export a {type(m).__name__}; supported layers are listed in docs/deployment.md")


def _same_forward(name: str, m: nn.Module, *classes: type) -> None:
    """Accept subclasses that keep the forward of one of ``classes`` (e.g. flipnet's BatchNorm2d)."""
    if type(m).forward not in {cls.forward for cls in classes}:
        raise ValueError(f"layer {name!r}: a {type(m).__name__} has its own forward and cannot be exported; "
                         "register a codec for it (docs/deployment.md)")


# ================================================================= activations (one table each way)
class _Sign(nn.Module):
    """``sign`` with ``sign(0) = +1`` (inference form of the sign quantizers)."""

    def forward(self, x: Tensor) -> Tensor:
        return sign(x)


class _Heaviside(nn.Module):
    """``1[x > 0]`` (inference form of ``ste_heaviside``)."""

    def forward(self, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype)


_SIGN_QUANTIZERS = ("ste_sign", "approx_sign", "swish_sign")


def _quantizer_spec(m: nn.Module) -> dict[str, Any] | None:
    alias = quantizer_name(m)
    if alias == "identity":
        return None
    if alias in _SIGN_QUANTIZERS:
        return {"op": "sign"}
    if alias == "ste_heaviside":
        return {"op": "heaviside"}
    raise ValueError(f"the quantizer {alias!r} cannot be exported (supported: sign quantizers, ste_heaviside)")


#: module class -> JSON spec of the activation (exact classes, and Quantizer subclasses)
_ACT_SPECS: dict[type, Callable[[Any], dict[str, Any] | None]] = {
    nn.ReLU: lambda m: {"op": "relu"},
    nn.Tanh: lambda m: {"op": "tanh"},
    nn.SiLU: lambda m: {"op": "silu"},
    nn.Sigmoid: lambda m: {"op": "sigmoid"},
    nn.Hardtanh: lambda m: {"op": "hardtanh", "min": float(m.min_val), "max": float(m.max_val)},
    nn.GELU: lambda m: {"op": "gelu", "approximate": str(m.approximate)},
    nn.Softmax: lambda m: {"op": "softmax", "dim": _explicit_dim(m)},
    nn.LogSoftmax: lambda m: {"op": "log_softmax", "dim": _explicit_dim(m)},
}


def _explicit_dim(m: nn.Module) -> int:
    """The ``dim`` of a softmax layer; ``dim=None`` (torch's implicit, deprecated choice) is refused."""
    dim = getattr(m, "dim", None)
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise ValueError(f"a {type(m).__name__} without an explicit integer dim cannot be exported; "
                         f"build it with dim=1 (or the dim you mean)")
    return dim


def _int_dim(spec: Mapping[str, Any]) -> int:
    dim = spec.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise ValueError(f"{spec['op']} needs an integer 'dim'")
    return dim


def _hardtanh(spec: Mapping[str, Any]) -> nn.Module:
    if not all(isinstance(spec.get(k), (int, float)) and not isinstance(spec.get(k), bool) for k in ("min", "max")):
        raise ValueError("hardtanh needs numeric 'min' and 'max'")
    return nn.Hardtanh(float(spec["min"]), float(spec["max"]))


#: op -> module builder
_ACT_MODULES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "sign": lambda s: _Sign(),
    "heaviside": lambda s: _Heaviside(),
    "relu": lambda s: nn.ReLU(),
    "tanh": lambda s: nn.Tanh(),
    "silu": lambda s: nn.SiLU(),
    "sigmoid": lambda s: nn.Sigmoid(),
    "hardtanh": _hardtanh,
    "gelu": lambda s: nn.GELU(approximate=str(s.get("approximate"))),
    "softmax": lambda s: nn.Softmax(dim=_int_dim(s)),
    "log_softmax": lambda s: nn.LogSoftmax(dim=_int_dim(s)),
}


def act_spec(m: nn.Module | None, where: str) -> dict[str, Any] | None:
    """JSON description of an activation / input quantizer (``None`` for the identity or dropout)."""
    if m is None or isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
        return None
    try:
        if isinstance(m, Quantizer):
            return _quantizer_spec(m)
        fn = _ACT_SPECS.get(type(m))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if fn is None:
        raise ValueError(f"{where}: cannot export a {type(m).__name__}; supported layers are listed in docs/deployment.md")
    try:
        return fn(m)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def act_module(spec: Any) -> nn.Module:
    """The inference module of an activation spec."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("op"), str):
        raise ValueError("invalid activation")
    build = _ACT_MODULES.get(spec["op"])
    if build is None:
        raise ValueError(f"unknown activation op {spec['op']!r}")
    return build(spec)


def _encode_activation(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    spec = act_spec(m, f"layer {name!r}")
    return [] if spec is None else [Entry("activation", name, **spec)]


def _decode_activation(r: Reader) -> list[nn.Module]:
    return [act_module(r.cfg)]


def _input_modules(r: Reader) -> list[nn.Module]:
    inp = r.cfg.get("input")
    if inp is None:
        return []
    if not isinstance(inp, dict) or not isinstance(inp.get("op"), str):
        raise r.fail("invalid input activation")
    return [act_module(inp)]


# ================================================================= convolutions and dense layers
def _conv_geometry(m: nn.Module) -> dict[str, Any]:
    padding = m.padding if isinstance(m.padding, str) else [int(p) for p in m.padding]
    pads = explicit_padding(m.padding, m.kernel_size, m.dilation, m.stride)
    return {
        "stride": [int(s) for s in m.stride],
        "padding": padding,
        "pads": [int(p) for p in pads],
        "dilation": [int(d) for d in m.dilation],
        "groups": int(m.groups),
        "padding_mode": str(m.padding_mode),
        "pad_value": float(getattr(m, "pad_value", 0.0)),
    }


def _conv_cfg(r: Reader, nd: int) -> dict[str, Any]:
    padding = r.cfg.get("padding")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise r.fail(f"invalid padding {padding!r}")
    elif not (isinstance(padding, list) and len(padding) == nd
              and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding)):
        raise r.fail(f"invalid padding {padding!r}")
    mode = r.get("padding_mode", str)
    if mode not in ("zeros", "reflect", "replicate", "circular"):
        raise r.fail(f"invalid padding_mode {mode!r}")
    pv = r.get("pad_value", (int, float))
    if not math.isfinite(pv):
        raise r.fail("pad_value is not finite")
    groups = r.get("groups", int)
    if groups < 1:
        raise r.fail("invalid groups")
    return {
        "stride": r.ints("stride", nd, 1),
        "padding": padding,
        "pads": r.ints("pads", 2 * nd, 0),
        "dilation": r.ints("dilation", nd, 1),
        "groups": groups,
        "padding_mode": mode,
        "pad_value": float(pv),
    }


def _signs_and_magnitude(q: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """``q = a_c * s`` with ±1 ``s`` and a per-output-channel ``a_c > 0``? Return ``(s, a or None)``."""
    flat = q.detach().reshape(q.shape[0], -1).to(torch.float32)
    mag = flat.abs()
    a = mag[:, :1]
    if not bool((mag == a).all()) or not bool((a > 0).all()):
        return None
    s = sign(q.detach()).to(torch.float32)
    a = a.reshape(-1)
    return s, (None if bool((a == 1).all()) else a)


def _encode_binary(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    assert isinstance(m, BinaryLayer)
    _same_forward(name, m, BinaryConv1d, BinaryConv2d, BinaryLinear)
    is_conv = isinstance(m, (nn.Conv1d, nn.Conv2d))
    with torch.no_grad():
        q = m.quantized_weight()
    split = _signs_and_magnitude(q)
    inp = act_spec(m.input_quantizer, f"layer {name!r} input")
    alpha = m.output_scale()
    if split is None:  # not ±1 per channel: store the real weight
        e = Entry("real_conv" if is_conv else "real_linear", name, input=inp, order="scale_bias")
        if is_conv:
            e.update(_conv_geometry(m))
        e.tensors["weight"] = q.detach().float().contiguous()
        if alpha is not None:
            e.tensors["scale"] = alpha.detach().float().reshape(-1)
    else:
        s, a = split
        e = Entry("binary_conv" if is_conv else "binary_linear", name, input=inp, weight_shape=list(s.shape))
        if is_conv:
            e.update(_conv_geometry(m))
        scale = a
        if alpha is not None:
            scale = alpha.detach().float().reshape(-1) if scale is None else scale * alpha.detach().float().reshape(-1)
        if scale is not None:
            e.tensors["scale"] = scale.contiguous()
        stored = qbn.stored_form(m)
        if stored is not None and torch.equal(stored.decode(), s.cpu()):  # the signs are codewords
            e["storage"] = "qbn"
            e["qbn_k"] = stored.k
            e.tensors["qbn_indices"] = stored.packed_indices
            e.tensors["qbn_codebook_bits"] = pack_bits(stored.codebook_signs(), dim=1)
        else:
            e["storage"] = "bits"
            e.tensors["weight_bits"] = pack_bits(s.cpu().reshape(s.shape[0], -1), dim=1)
    if m.bias is not None:
        e.tensors["bias"] = m.bias.detach().float().contiguous()
    return [e]


def _binary_weight(r: Reader, shape: list[int]) -> Tensor:
    o = shape[0]
    per = 1
    for s in shape[1:]:
        per *= s
    storage = r.get("storage", str)
    if storage == "bits":
        bits = r.tensor("weight_bits", torch.uint8, (o, packed_size(per, 8)))
        return unpack_bits(bits, (o, per), dim=1).reshape(shape)  # type: ignore[arg-type]
    if storage == "qbn":
        k = r.get("qbn_k", int)
        if not 1 <= k <= 8 or len(shape) != 4:
            raise r.fail(f"invalid QBN index width {k} or weight shape {shape}")
        taps = shape[2] * shape[3]
        if taps > 16:  # QBN codewords are small kernels (codes of at most 16 bits); bounds the decoded size
            raise r.fail(f"QBN kernels of {shape[2]}x{shape[3]} entries are too large (at most 16)")
        n = shape[0] * shape[1]
        idx_bytes = r.tensor("qbn_indices", torch.uint8, (packed_size(n * k, 8),))
        cb_bits = r.tensor("qbn_codebook_bits", torch.uint8, (1 << k, packed_size(taps, 8)))
        codebook = unpack_bits(cb_bits, (1 << k, taps), dim=1)  # type: ignore[arg-type]
        idx = unpack_indices(idx_bytes, k, n)  # type: ignore[arg-type]
        return codebook[idx].reshape(shape)
    raise r.fail(f"unknown weight storage {storage!r}")


def _decode_binary_linear(r: Reader) -> list[nn.Module]:
    shape = r.ints("weight_shape", None, 1)
    if len(shape) != 2:
        raise r.fail(f"weight_shape {shape} has the wrong rank")
    pre = _input_modules(r)
    w = _binary_weight(r, shape)
    o = shape[0]
    scale = r.tensor("scale", torch.float32, (o,), optional=True)
    bias = r.tensor("bias", torch.float32, (o,), optional=True)
    if (r.cfg.get("input") or {}).get("op") == "sign":
        return [PackedBinaryLinear(pack_words(w, dim=1), shape[1], scale, bias)]
    return pre + [BinaryWeightLinear(w, False, scale, bias)]


def _decode_binary_conv(r: Reader) -> list[nn.Module]:
    shape = r.ints("weight_shape", None, 1)
    if len(shape) not in (3, 4):
        raise r.fail(f"weight_shape {shape} has the wrong rank")
    pre = _input_modules(r)
    w = _binary_weight(r, shape)
    o = shape[0]
    scale = r.tensor("scale", torch.float32, (o,), optional=True)
    bias = r.tensor("bias", torch.float32, (o,), optional=True)
    c = _conv_cfg(r, len(shape) - 2)
    binary_in = (r.cfg.get("input") or {}).get("op") == "sign"
    if binary_in and len(shape) == 4 and c["groups"] == 1 and c["padding_mode"] == "zeros":
        words = pack_words(w.permute(0, 2, 3, 1), dim=-1)
        return [PackedBinaryConv2d(words, shape[1], c["stride"], c["pads"], c["dilation"], c["pad_value"], scale, bias)]
    return pre + [BinaryWeightConv(w, c["stride"], c["padding"], c["dilation"], c["groups"], c["padding_mode"],
                                   c["pad_value"], False, scale, bias)]


class RealLayer(nn.Module):
    """Float convolution / dense layer (weights stored real), with scale and bias in a set order:
    ``"bias_scale"``: :math:`(W x + b)\\,s` (float twins), ``"scale_bias"``: :math:`(W x)\\,s + b`
    (binary layers whose weight is not ±1 per channel)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, scale: Tensor | None, order: str,
                 conv: dict[str, Any] | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("scale", scale)
        self.order = order
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        bias_inside = self.order == "bias_scale" and self.bias is not None
        b = self.bias if bias_inside else None
        if self.conv is None:
            out = torch.nn.functional.linear(x, self.weight, b)
        else:
            c = self.conv
            out = conv_nd(x, self.weight, b, stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                          groups=c["groups"], padding_mode=c["padding_mode"], pad_value=c["pad_value"])
        view = (1, -1) + (1,) * (out.dim() - 2)
        if self.scale is not None:
            out = out * self.scale.view(view)
        if self.bias is not None and not bias_inside:
            out = out + self.bias.view(view)
        return out


def _encode_real(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _same_forward(name, m, nn.Conv1d, nn.Conv2d, nn.Linear, FloatConv2d, FloatLinear)
    is_conv = isinstance(m, (nn.Conv1d, nn.Conv2d))
    inp = act_spec(getattr(m, "input_quantizer", None), f"layer {name!r} input")
    e = Entry("real_conv" if is_conv else "real_linear", name, input=inp, order="bias_scale")
    if is_conv:
        e.update(_conv_geometry(m))
    e.tensors["weight"] = m.weight.detach().float().contiguous()
    if m.bias is not None:
        e.tensors["bias"] = m.bias.detach().float().contiguous()
    scale = getattr(m, "scale", None)
    if isinstance(scale, Tensor):
        e.tensors["scale"] = scale.detach().float().reshape(-1).contiguous()
    return [e]


def _decode_real(r: Reader, is_conv: bool) -> list[nn.Module]:
    names = r.cfg.get("tensors")
    wname = names.get("weight") if isinstance(names, dict) else None
    wt = r.tensors.get(wname) if isinstance(wname, str) else None
    if wt is None or wt.dtype != torch.float32:
        raise r.fail("missing float32 tensor 'weight'")
    if wt.dim() not in ((3, 4) if is_conv else (2,)):
        raise r.fail(f"weight has the wrong rank {wt.dim()}")
    o = wt.shape[0]
    order = r.get("order", str)
    if order not in ("scale_bias", "bias_scale"):
        raise r.fail(f"invalid order {order!r}")
    conv = _conv_cfg(r, wt.dim() - 2) if is_conv else None
    layer = RealLayer(wt, r.tensor("bias", torch.float32, (o,), True), r.tensor("scale", torch.float32, (o,), True), order, conv)
    return _input_modules(r) + [layer]


# ================================================================= BatchNorm and thresholds
def _encode_batchnorm(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    _same_forward(name, m, nn.BatchNorm1d, nn.BatchNorm2d)
    e = Entry("batchnorm", name, num_features=int(m.num_features), eps=float(m.eps),
              dims=1 if isinstance(m, nn.BatchNorm1d) else 2)
    # eval mode normalises with the running statistics whenever the buffers exist, even with
    # track_running_stats=False set after construction (torch's _BatchNorm.forward)
    if m.running_mean is not None and m.running_var is not None:
        e.tensors["running_mean"] = m.running_mean.detach().float().contiguous()
        e.tensors["running_var"] = m.running_var.detach().float().contiguous()
    if m.weight is not None:
        e.tensors["weight"] = m.weight.detach().float().contiguous()
    if m.bias is not None:
        e.tensors["bias"] = m.bias.detach().float().contiguous()
    return [e]


def _decode_batchnorm(r: Reader) -> list[nn.Module]:
    n = r.get("num_features", int)
    dims = r.get("dims", int)
    eps = r.get("eps", (int, float))
    if n < 1 or dims not in (1, 2) or not eps >= 0:
        raise r.fail("invalid BatchNorm configuration")
    mean = r.tensor("running_mean", torch.float32, (n,), optional=True)
    var = r.tensor("running_var", torch.float32, (n,), optional=True)
    gamma = r.tensor("weight", torch.float32, (n,), optional=True)
    beta = r.tensor("bias", torch.float32, (n,), optional=True)
    if (mean is None) != (var is None):
        raise r.fail("running_mean and running_var must come together")
    cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    # buffers only for what the file holds: ``num_features`` alone never allocates anything
    affine = gamma is not None or beta is not None
    bn = cls(n, eps=float(eps), affine=affine, track_running_stats=mean is not None)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(gamma if gamma is not None else torch.ones(n))
            bn.bias.copy_(beta if beta is not None else torch.zeros(n))
        if mean is not None:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return [bn.eval()]


def _decode_threshold(r: Reader) -> list[nn.Module]:
    n = r.get("channels", int)
    t = r.tensor("threshold", torch.int32, (n,))
    flip = r.tensor("flip", torch.uint8, (n,))
    if bool((flip > 1).any()):  # type: ignore[operator]
        raise r.fail("flip must hold 0 or 1")
    return [ThresholdSign(t.float(), flip.bool())]  # type: ignore[union-attr]


# ================================================================= pooling, flatten
def _pool_cfg(v: Any) -> Any:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else (None if v is None else int(v))


def _pool_arg(r: Reader, key: str, minimum: int = 1) -> Any:
    v = r.cfg.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and v >= minimum:
        return v
    if isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in v):
        return tuple(v)
    raise r.fail(f"field {key!r} must be an int >= {minimum} or a pair of them, got {v!r}")


def _encode_maxpool(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _exact(name, m, nn.MaxPool2d)
    if m.return_indices:
        raise ValueError(f"layer {name!r}: MaxPool2d(return_indices=True) cannot be exported")
    return [Entry("maxpool2d", name, kernel_size=_pool_cfg(m.kernel_size), stride=_pool_cfg(m.stride),
                  padding=_pool_cfg(m.padding), ceil_mode=bool(m.ceil_mode), dilation=_pool_cfg(m.dilation))]


def _decode_maxpool(r: Reader) -> list[nn.Module]:
    return [MaxPool2d(_pool_arg(r, "kernel_size"), _pool_arg(r, "stride"), _pool_arg(r, "padding", 0),
                      _pool_arg(r, "dilation"), ceil_mode=r.get("ceil_mode", bool))]


def _encode_avgpool(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _exact(name, m, nn.AvgPool2d)
    return [Entry("avgpool2d", name, kernel_size=_pool_cfg(m.kernel_size), stride=_pool_cfg(m.stride),
                  padding=_pool_cfg(m.padding), ceil_mode=bool(m.ceil_mode),
                  count_include_pad=bool(m.count_include_pad), divisor_override=m.divisor_override)]


def _decode_avgpool(r: Reader) -> list[nn.Module]:
    return [nn.AvgPool2d(_pool_arg(r, "kernel_size"), _pool_arg(r, "stride"), _pool_arg(r, "padding", 0),
                         r.get("ceil_mode", bool), r.get("count_include_pad", bool),
                         r.get("divisor_override", (int, type(None))))]


def _encode_adaptive_avgpool(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _exact(name, m, nn.AdaptiveAvgPool2d)
    return [Entry("adaptive_avgpool2d", name, output_size=_pool_cfg(m.output_size))]


def _encode_flatten(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _exact(name, m, nn.Flatten)
    return [Entry("flatten", name, start_dim=int(m.start_dim), end_dim=int(m.end_dim))]


# ================================================================= structure
def plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward only chains its children (flipnet's ``SequentialModel``
    adds an input-shape check, which changes nothing for valid inputs)."""
    return isinstance(m, nn.Sequential) and type(m).forward in (nn.Sequential.forward, SequentialModel.forward)


def _encode_sequential(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    if not plain_sequential(m):
        raise ValueError(f"layer {name!r}: a {type(m).__name__} with its own forward cannot be exported as a chain")
    return enc.children(m, f"{name}." if name else "")


def _encode_dropped(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _same_forward(name, m, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
    return []  # identity and dropout: nothing at inference


class Residual(nn.Module):
    """``post(body(x) + shortcut(x))``: the inference form of a residual block (``residual`` entries)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module, post: nn.Module) -> None:
        super().__init__()
        self.body, self.shortcut, self.post = body, shortcut, post

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.body(x) + self.shortcut(x))


def residual_entry(name: str, body: list[Entry], shortcut: list[Entry], post: list[Entry] | None = None) -> Entry:
    """A ``residual`` entry: ``out = post(body(x) + shortcut(x))`` (an empty branch is the identity)."""
    e = Entry("residual", name)
    e.children = {"body": body, "shortcut": shortcut, "post": list(post or [])}
    return e


def _branch(r: Reader, key: str) -> nn.Module:
    modules = decode_entries(r.branch(key))
    return nn.Sequential(*modules) if modules else nn.Identity()


def _decode_residual(r: Reader) -> list[nn.Module]:
    return [Residual(_branch(r, "body"), _branch(r, "shortcut"), _branch(r, "post"))]


def _encode_pad_shortcut(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _exact(name, m, PadShortcut)
    return [Entry("pad_shortcut", name, stride=int(m.stride), extra_channels=int(m.extra))]


def _decode_pad_shortcut(r: Reader) -> list[nn.Module]:
    stride, extra = r.get("stride", int), r.get("extra_channels", int)
    if stride < 1 or extra < 0:
        raise r.fail("invalid stride or channel padding")
    return [PadShortcut(0, extra, stride)]  # PadShortcut keeps only the difference of channel counts


def _encode_bireal_block(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # out = bn1(conv1(x)) + downsample(x); out = bn2(conv2(out)) + out
    _exact(name, m, BiRealBlock)
    p = f"{name}."
    first = residual_entry(f"{p}residual1", enc.children(m, p, ("conv1", "bn1")), enc.children(m, p, ("downsample",)))
    second = residual_entry(f"{p}residual2", enc.children(m, p, ("conv2", "bn2")), [])
    return [first, second]


def _encode_basic_block(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # out = act2(bn2(conv2(act1(bn1(conv1(x))))) + downsample(x))
    _exact(name, m, BasicBlock)
    p = f"{name}."
    return [residual_entry(f"{p}residual", enc.children(m, p, ("conv1", "bn1", "act1", "conv2", "bn2")),
                           enc.children(m, p, ("downsample",)), enc.children(m, p, ("act2",)))]


def _encode_resnet(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # x = stem(x); x = stages(x); fc(dropout(pool(x).flatten(1)))
    _exact(name, m, ResNet)
    assert isinstance(m, ResNet)
    p = f"{name}." if name else ""
    entries = enc.children(m, p, ("stem", *m.stages, "pool"))
    entries.append(Entry("flatten", f"{p}flatten", start_dim=1, end_dim=-1))
    return entries + enc.children(m, p, ("dropout", "fc"))


def _encode_bias_add(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # ReActNet's "move": y_c = x_c + b_c
    _exact(name, m, LearnableBias)
    e = Entry("bias_add", name, channels=int(m.bias.numel()))
    e.tensors["bias"] = m.bias.detach().float().reshape(-1).contiguous()
    return [e]


def _decode_bias_add(r: Reader) -> list[nn.Module]:
    n = r.get("channels", int)
    if n < 1:
        raise r.fail("invalid channel count")
    bias = r.tensor("bias", torch.float32, (n,))  # checked before anything of size n is allocated
    layer = LearnableBias(n)
    with torch.no_grad():
        layer.bias.copy_(bias.view(1, n, 1, 1))  # type: ignore[union-attr]
    return [layer]


def _encode_prelu(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    _exact(name, m, nn.PReLU)
    e = Entry("prelu", name, num_parameters=int(m.num_parameters))
    e.tensors["weight"] = m.weight.detach().float().reshape(-1).contiguous()
    return [e]


def _decode_prelu(r: Reader) -> list[nn.Module]:
    n = r.get("num_parameters", int)
    if n < 1:
        raise r.fail("invalid num_parameters")
    weight = r.tensor("weight", torch.float32, (n,))  # checked before anything of size n is allocated
    layer = nn.PReLU(n)
    with torch.no_grad():
        layer.weight.copy_(weight)  # type: ignore[arg-type]
    return [layer]


def _encode_rprelu(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # y = move_out(prelu(move_in(x)))
    _exact(name, m, RPReLU)
    return enc.children(m, f"{name}.", ("move_in", "prelu", "move_out"))


def _encode_bireal_unit(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # out = act(bn(conv(move(x))) + shortcut(x))
    _exact(name, m, BiRealUnit)
    p = f"{name}."
    return [residual_entry(f"{p}residual", enc.children(m, p, ("move", "conv", "bn")), enc.children(m, p, ("shortcut",)),
                           enc.children(m, p, ("act",)))]


def _encode_birealnet(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # x = stem(x); x = stages(x); fc(dropout(pool(x).flatten(1)))
    _exact(name, m, BiRealNet)
    assert isinstance(m, BiRealNet)
    p = f"{name}." if name else ""
    entries = enc.children(m, p, ("stem", *m.stages, "pool"))
    entries.append(Entry("flatten", f"{p}flatten", start_dim=1, end_dim=-1))
    return entries + enc.children(m, p, ("dropout", "fc"))


class Concat(nn.Module):
    """``cat([branch(x) for branch in branches], dim)``: the inference form of ``concat`` entries."""

    def __init__(self, branches: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.branches], dim=self.dim)


def concat_entry(name: str, branches: list[list[Entry]], dim: int = 1) -> Entry:
    """A ``concat`` entry: the branches (entry lists, keys ``"0"``, ``"1"``, ...) run on the same input
    and their outputs are concatenated along ``dim``."""
    e = Entry("concat", name, dim=int(dim))
    e.children = {str(i): b for i, b in enumerate(branches)}
    return e


def _decode_concat(r: Reader) -> list[nn.Module]:
    dim = r.get("dim", int)
    children = r.cfg.get("children")
    n = len(children) if isinstance(children, dict) else 0
    if n < 1 or sorted(children) != sorted(str(i) for i in range(n)):  # type: ignore[arg-type]
        raise r.fail("a concat entry needs branches '0', '1', ...")
    return [Concat([_branch(r, str(i)) for i in range(n)], dim)]


def _encode_react_block(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # y1 = act1(bn1(conv3x3(move1(x))) + pool(x)); z = move2(y1)
    # y2 = bn2(conv1x1(z)) + y1, or cat([bn2a(conv1x1a(z)) + y1, bn2b(conv1x1b(z)) + y1]); out = act2(y2)
    _exact(name, m, ReActBlock)
    assert isinstance(m, ReActBlock)
    p = f"{name}."
    first = residual_entry(f"{p}residual1", enc.children(m, p, ("move1", "conv3x3", "bn1")), enc.children(m, p, ("pool",)),
                           enc.children(m, p, ("act1",)))
    if not m.duplicate:
        return [first, residual_entry(f"{p}residual2", enc.children(m, p, ("move2", "conv1x1", "bn2")), [],
                                      enc.children(m, p, ("act2",)))]
    halves = [[residual_entry(f"{p}residual2{h}", enc.children(m, p, ("move2", f"conv1x1{h}", f"bn2{h}")), [])]
              for h in ("a", "b")]
    return [first, concat_entry(f"{p}concat", halves), *enc.children(m, p, ("act2",))]


def _encode_reactnet(name: str, m: nn.Module, enc: Encoder) -> list[Entry]:
    # fc(dropout(pool(blocks(stem(x))).flatten(1)))
    _exact(name, m, ReActNet)
    p = f"{name}." if name else ""
    entries = enc.children(m, p, ("stem", "blocks", "pool"))
    entries.append(Entry("flatten", f"{p}flatten", start_dim=1, end_dim=-1))
    return entries + enc.children(m, p, ("dropout", "fc"))


# ================================================================= registrations
for _codec in (
    LayerCodec("binary_conv", (BinaryLayer,), _encode_binary, _decode_binary_conv),
    LayerCodec("binary_linear", (), None, _decode_binary_linear),
    LayerCodec("real_conv", (nn.Conv1d, nn.Conv2d), _encode_real, lambda r: _decode_real(r, True)),
    LayerCodec("real_linear", (nn.Linear,), _encode_real, lambda r: _decode_real(r, False)),
    LayerCodec("batchnorm", (nn.BatchNorm1d, nn.BatchNorm2d), _encode_batchnorm, _decode_batchnorm),
    LayerCodec("threshold", (), None, _decode_threshold),
    LayerCodec("maxpool2d", (nn.MaxPool2d,), _encode_maxpool, _decode_maxpool),
    LayerCodec("avgpool2d", (nn.AvgPool2d,), _encode_avgpool, _decode_avgpool),
    LayerCodec("adaptive_avgpool2d", (nn.AdaptiveAvgPool2d,), _encode_adaptive_avgpool,
               lambda r: [nn.AdaptiveAvgPool2d(_pool_arg(r, "output_size"))]),
    LayerCodec("flatten", (nn.Flatten,), _encode_flatten,
               lambda r: [nn.Flatten(r.get("start_dim", int), r.get("end_dim", int))]),
    LayerCodec("activation", (*_ACT_SPECS, Quantizer), _encode_activation, _decode_activation),
    LayerCodec("dropped", (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d), _encode_dropped),
    LayerCodec("sequential", (nn.Sequential,), _encode_sequential, root=True),
    LayerCodec("residual", (), None, _decode_residual),
    LayerCodec("pad_shortcut", (PadShortcut,), _encode_pad_shortcut, _decode_pad_shortcut),
    LayerCodec("bireal_block", (BiRealBlock,), _encode_bireal_block),
    LayerCodec("basic_block", (BasicBlock,), _encode_basic_block),
    LayerCodec("resnet", (ResNet,), _encode_resnet, root=True),
    LayerCodec("bias_add", (LearnableBias,), _encode_bias_add, _decode_bias_add),
    LayerCodec("prelu", (nn.PReLU,), _encode_prelu, _decode_prelu),
    LayerCodec("rprelu", (RPReLU,), _encode_rprelu),
    LayerCodec("bireal_unit", (BiRealUnit,), _encode_bireal_unit),
    LayerCodec("birealnet", (BiRealNet,), _encode_birealnet, root=True),
    LayerCodec("concat", (), None, _decode_concat),
    LayerCodec("react_block", (ReActBlock,), _encode_react_block),
    LayerCodec("reactnet", (ReActNet,), _encode_reactnet, root=True),
):
    register_codec(_codec)
del _codec
