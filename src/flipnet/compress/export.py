r"""One-file export of trained binary networks, with bit-packed weights and folded BatchNorm.

File format (``flipnet-export``, version 1)
==========================================

A single `safetensors <https://huggingface.co/docs/safetensors>`_ file. Reading it never executes
code: the header is JSON, tensors are raw little-endian arrays.

* ``__metadata__["format"] = "flipnet-export"`` and ``__metadata__["flipnet"]`` a JSON document::

      {"format": "flipnet-export", "version": 1,
       "model": {"name": "binarynet", "kwargs": {...}} | null,   # registry name to rebuild the float model
       "input_shape": [C, H, W] | null,
       "layers": [{"type": ..., "name": ..., <config>, "tensors": {role: tensor name}}, ...],
       "folds": [{"layer": name, "batchnorm": name, "threshold": index}, ...],
       "extra": {...}}                                              # user metadata

* Tensor ``"{i}.{role}"`` belongs to layer ``i``. Binary weights are stored as
  ``weight_bits``: ``uint8``, shape ``(O, ceil(M/8))`` where ``M`` is the number of weights per
  output channel in PyTorch order (``C*KH*KW`` for a convolution), packed with
  :func:`flipnet.compress.pack.pack_bits` (numpy ``packbits`` order, bit 1 = +1):
  ``numpy.unpackbits(bits, axis=1, count=M).reshape(weight_shape) * 2 - 1`` recovers them.
  Codebook (QBN) layers store ``qbn_indices`` (``k``-bit indices, :func:`pack_indices`) and
  ``qbn_codebook_bits`` (the ``(2^k, KH*KW)`` ±1 codebook, :func:`pack_bits`). Real tensors
  (scales, biases, BatchNorm statistics, float layers) are stored as they are (float32).

Layer types: ``binary_conv``, ``binary_linear`` (±1 weights; ``input`` names the input activation,
``"sign"`` for binary inputs), ``real_conv``, ``real_linear``, ``batchnorm``, ``threshold``,
``maxpool2d``, ``avgpool2d``, ``adaptive_avgpool2d``, ``flatten``, ``activation``.

BatchNorm folding
=================

Let a binary layer with binary inputs produce the integer :math:`y \in [-K, K]` (``K`` ±1 terms),
optionally scaled and shifted, :math:`z = s y + b` (``s`` the product of the magnitude of the
weight quantizer and the output scale :math:`\alpha`; ``s = 1``, ``b = 0`` without them). When the
next operations are BatchNorm and then a sign (the input quantizer of the next binary layer),

.. math::

    \mathrm{sign}\Big(\gamma\,\frac{z-\mu}{\sigma} + \beta\Big), \qquad \sigma = \sqrt{v + \epsilon} > 0,

with ``sign(0) = +1`` is +1 exactly when :math:`f(y) = \gamma(s y + b - \mu) + \beta\sigma \ge 0`
(multiply by :math:`\sigma > 0`). :math:`f` is affine in :math:`y` with slope :math:`g = \gamma s`:

* :math:`g > 0`: +1 iff :math:`y \ge r`, :math:`r = (\gamma(\mu - b) - \beta\sigma)/g`; with integer
  :math:`y` that is :math:`y \ge t`, :math:`t = \lceil r \rceil`. ``flip = False``.
* :math:`g < 0`: +1 iff :math:`y \le r`, i.e. not :math:`y \ge t` with :math:`t = \lfloor r \rfloor + 1`.
  ``flip = True`` (the comparison is inverted: a negative γ, or a negative scale).
* :math:`g = 0` (γ = 0 or s = 0): the output is the constant :math:`\mathrm{sign}(\gamma(b-\mu) + \beta\sigma)`;
  :math:`t = -K` (always true) with ``flip`` set when that constant is -1.

``t`` is clamped to :math:`[-K, K+1]` and stored as ``int32``: the layer becomes
:math:`\mathrm{out} = (y \ge t) \oplus \mathrm{flip}` (:class:`~flipnet.compress.packed.ThresholdSign`).
The thresholds are computed exactly: a float64 estimate of :math:`r` is corrected by evaluating the
predicate :math:`f(y) \ge 0` in exact rational arithmetic (the stored float32 parameters are exact
rationals; :math:`\beta\sigma` is compared through squares), so the folded layer reproduces the
real-arithmetic BatchNorm + sign for every integer :math:`y`. A float32 model can differ only where
its BatchNorm output is within rounding error of 0. Folding is skipped (BatchNorm kept in float)
where it would not be exact: real inputs (non-integer :math:`y`), a pad value other than 0/±1, a
non-positive or non-finite :math:`v + \epsilon`, BatchNorm without running statistics, no sign
after the BatchNorm, or a max-pool between layer and BatchNorm with some :math:`s \le 0` (max-pool
commutes with :math:`z(y)` only where it is non-decreasing). Between BatchNorm and the sign only
operations that commute with sign are allowed (max-pool, flatten, dropout, identity).
"""

from __future__ import annotations

import json
import math
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ExportFormatError
from ..functional import explicit_padding
from ..layers import BinaryLayer
from ..quantizers import Quantizer, quantizer_name, sign
from ..utils import atomic_path
from .pack import pack_bits, pack_indices, pack_words, packed_size, unpack_bits, unpack_indices
from .packed import BinaryWeightConv, BinaryWeightLinear, MaxPool2d, PackedBinaryConv2d, PackedBinaryLinear, ThresholdSign

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "export_model",
    "load_exported",
    "read_export_metadata",
    "fold_bn_threshold",
    "bn_sign_reference",
]

EXPORT_FORMAT = "flipnet-export"
EXPORT_VERSION = 1

_SIGN_ALIASES = {"ste_sign", "approx_sign", "swish_sign"}
_MAX_HEADER = 100 * 1024 * 1024


# ============================================================================ BN folding
def _frac(v: float) -> Fraction:
    return Fraction(float(v))


def _bn_predicate(y: int, g: Fraction, c0: Fraction, beta: Fraction, var: Fraction) -> bool:
    """Exactly: ``g*y + c0 + beta*sqrt(var) >= 0`` (``var > 0``)."""
    a = g * y + c0
    if beta == 0:
        return a >= 0
    if a >= 0 and beta > 0:
        return True
    if a <= 0 and beta < 0:
        return False
    if a >= 0:  # beta < 0: a >= |beta| sqrt(var)
        return a * a >= beta * beta * var
    return beta * beta * var >= a * a  # a < 0 < beta


def _threshold_estimate(gamma: Fraction, beta: Fraction, mean: Fraction, var: Fraction, s: Fraction, b: Fraction) -> float:
    """Float64 estimate of the real crossing ``r``; :func:`fold_bn_threshold` corrects it exactly."""
    return (float(gamma) * float(mean - b) - float(beta) * math.sqrt(float(var))) / float(gamma * s)


def fold_bn_threshold(
    k: int,
    gamma: Tensor | None,
    beta: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Integer thresholds equivalent to ``sign(BN(scale * y + bias))`` for integer ``|y| <= k``.

    Returns ``(threshold, flip)``: ``int32`` and ``bool`` tensors with one entry per channel such
    that, for every integer ``y`` in ``[-k, k]``, the sign (with ``sign(0) = +1``) of
    :math:`\gamma(s y + b - \mu)/\sqrt{v + \epsilon} + \beta` is +1 exactly when
    ``(y >= threshold) != flip``. See the module docstring for the derivation. ``gamma``/``beta``
    ``None`` mean 1/0 (BatchNorm without scale or shift).

    Raises:
        ValueError: ``var + eps`` not positive, or a parameter not finite, in some channel.
    """
    c = mean.numel()
    ones, zeros = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)

    def f64(t: Tensor | None, default: Tensor) -> Tensor:
        return default if t is None else t.detach().to(torch.float64).cpu().reshape(-1)

    g_, b_, m_, v_ = f64(gamma, ones), f64(beta, zeros), f64(mean, zeros), f64(var, zeros)
    s_, bb_ = f64(scale, ones), f64(bias, zeros)
    for name, t in (("gamma", g_), ("beta", b_), ("running_mean", m_), ("running_var", v_), ("scale", s_), ("bias", bb_)):
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} entries, expected {c}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds non-finite values; cannot fold BatchNorm into thresholds")
    eps_f = _frac(eps)
    thresholds: list[int] = []
    flips: list[bool] = []
    for i in range(c):
        gamma_i, beta_i, mu, v = _frac(g_[i]), _frac(b_[i]), _frac(m_[i]), _frac(v_[i]) + eps_f
        if v <= 0:
            raise ValueError(f"running_var + eps is {float(v)} <= 0 in channel {i}; cannot fold BatchNorm")
        s, b = _frac(s_[i]), _frac(bb_[i])
        g = gamma_i * s
        c0 = gamma_i * (b - mu)

        def p(y: int) -> bool:
            return _bn_predicate(y, g, c0, beta_i, v)

        if g == 0:
            thresholds.append(-k)
            flips.append(not p(0))
            continue
        r = _threshold_estimate(gamma_i, beta_i, mu, v, s, b)
        if g > 0:  # p is non-decreasing: smallest y in [-k, k] with p(y), or k + 1
            t = int(min(max(math.ceil(r), -k), k + 1)) if math.isfinite(r) else (k + 1 if r > 0 else -k)
            while t > -k and p(t - 1):
                t -= 1
            while t <= k and not p(t):
                t += 1
            thresholds.append(t)
            flips.append(False)
        else:  # p is non-increasing: largest y with p(y) is t - 1
            t = int(min(max(math.floor(r) + 1, -k), k + 1)) if math.isfinite(r) else (k + 1 if r > 0 else -k)
            while t <= k and p(t):
                t += 1
            while t > -k and not p(t - 1):
                t -= 1
            thresholds.append(t)
            flips.append(True)
    return torch.tensor(thresholds, dtype=torch.int32), torch.tensor(flips, dtype=torch.bool)


def bn_sign_reference(y: Tensor, gamma: Tensor | None, beta: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                      scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``sign(BN(scale*y + bias))`` in float64 along dim 1 (the unfolded computation, for checks)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)

    def v(t: Tensor | None, d: float) -> Tensor | float:
        return d if t is None else t.detach().to(torch.float64).view(shape)

    z = y.to(torch.float64) * v(scale, 1.0) + v(bias, 0.0)
    out = (z - v(mean, 0.0)) / torch.sqrt(v(var, 0.0) + eps) * v(gamma, 1.0) + v(beta, 0.0)  # type: ignore[operator]
    return sign(out)


# ============================================================================ model → entries
class _Entry(dict):
    """One exported layer: JSON config plus ``tensors`` (role → tensor) kept apart."""

    def __init__(self, type_: str, name: str, **cfg: Any) -> None:
        super().__init__(type=type_, name=name, **cfg)
        self.tensors: dict[str, Tensor] = {}


def _plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward only chains its children (flipnet's ``SequentialModel``
    adds an input-shape check, which changes nothing for valid inputs)."""
    if not isinstance(m, nn.Sequential):
        return False
    forward = type(m).forward
    if forward is nn.Sequential.forward:
        return True
    try:
        from ..models.common import SequentialModel
    except ImportError:  # pragma: no cover - models are part of the package
        return False
    return forward is SequentialModel.forward


def _leaves(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            if not _plain_sequential(child):
                raise ValueError(f"layer {full!r}: a {type(child).__name__} with its own forward cannot be exported as a chain")
            yield from _leaves(child, full + ".")
        else:
            yield full, child


_REAL_ACTS: dict[type, str] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}


def _act_spec(m: nn.Module | None, where: str) -> dict[str, Any] | None:
    """JSON description of an activation / input quantizer (``None`` for the identity)."""
    if m is None or isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
        return None
    if isinstance(m, Quantizer):
        alias = quantizer_name(m)
        if alias == "identity":
            return None
        if alias in _SIGN_ALIASES:
            return {"op": "sign"}
        if alias == "ste_heaviside":
            return {"op": "heaviside"}
        raise ValueError(f"{where}: the quantizer {alias!r} cannot be exported (supported: sign quantizers, ste_heaviside)")
    for cls, name in _REAL_ACTS.items():
        if type(m) is cls:
            return {"op": name}
    if type(m) is nn.Hardtanh:
        return {"op": "hardtanh", "min": float(m.min_val), "max": float(m.max_val)}
    if type(m) is nn.GELU:
        return {"op": "gelu", "approximate": str(m.approximate)}
    if type(m) in (nn.Softmax, nn.LogSoftmax):
        return {"op": "softmax" if type(m) is nn.Softmax else "log_softmax", "dim": m.dim}
    raise ValueError(f"{where}: cannot export a {type(m).__name__}; supported layers are listed in docs/deployment.md")


def _act_module(spec: Mapping[str, Any]) -> nn.Module:
    op = spec["op"]
    if op in ("softmax", "log_softmax") and (not isinstance(spec.get("dim"), int) or isinstance(spec.get("dim"), bool)):
        raise ValueError(f"{op} needs an integer 'dim'")
    if op == "hardtanh" and not all(isinstance(spec.get(k), (int, float)) for k in ("min", "max")):
        raise ValueError("hardtanh needs numeric 'min' and 'max'")
    if op == "sign":
        return _Sign()
    if op == "heaviside":
        return _Heaviside()
    if op == "relu":
        return nn.ReLU()
    if op == "tanh":
        return nn.Tanh()
    if op == "silu":
        return nn.SiLU()
    if op == "sigmoid":
        return nn.Sigmoid()
    if op == "hardtanh":
        return nn.Hardtanh(float(spec["min"]), float(spec["max"]))
    if op == "gelu":
        return nn.GELU(approximate=str(spec["approximate"]))
    if op == "softmax":
        return nn.Softmax(dim=spec["dim"])
    if op == "log_softmax":
        return nn.LogSoftmax(dim=spec["dim"])
    raise ValueError(f"unknown activation op {op!r}")


class _Sign(nn.Module):
    """``sign`` with ``sign(0) = +1`` (inference form of the sign quantizers)."""

    def forward(self, x: Tensor) -> Tensor:
        return sign(x)


class _Heaviside(nn.Module):
    """``1[x > 0]`` (inference form of ``ste_heaviside``)."""

    def forward(self, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype)


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


def _binary_entry(name: str, m: BinaryLayer) -> _Entry:
    is_conv = isinstance(m, (nn.Conv1d, nn.Conv2d))
    with torch.no_grad():
        q = m.quantized_weight()
    split = _signs_and_magnitude(q)
    inp = _act_spec(m.input_quantizer, f"layer {name!r} input")
    alpha = m.output_scale()
    if split is None:  # not ±1 per channel: store the real weight
        e = _Entry("real_conv" if is_conv else "real_linear", name, input=inp, order="scale_bias")
        if is_conv:
            e.update(_conv_geometry(m))
        e.tensors["weight"] = q.detach().float().contiguous()
        if alpha is not None:
            e.tensors["scale"] = alpha.detach().float().reshape(-1)
    else:
        s, a = split
        e = _Entry("binary_conv" if is_conv else "binary_linear", name, input=inp, weight_shape=list(s.shape))
        if is_conv:
            e.update(_conv_geometry(m))
        scale = a
        if alpha is not None:
            scale = alpha.detach().float().reshape(-1) if scale is None else scale * alpha.detach().float().reshape(-1)
        if scale is not None:
            e.tensors["scale"] = scale.contiguous()
        if hasattr(m, "qbn_codebook") and hasattr(m, "qbn_k") and a is None:
            k = int(m.qbn_k)
            idx = m.qbn_indices.reshape(-1).cpu()
            codebook = m.qbn_codebook.detach().cpu().float()
            if torch.equal(codebook[idx].reshape(s.shape), s.cpu()):
                e["storage"] = "qbn"
                e["qbn_k"] = k
                e.tensors["qbn_indices"] = pack_indices(idx, k)
                e.tensors["qbn_codebook_bits"] = pack_bits(codebook, dim=1)
        if "storage" not in e:
            e["storage"] = "bits"
            e.tensors["weight_bits"] = pack_bits(s.cpu().reshape(s.shape[0], -1), dim=1)
    if m.bias is not None:
        e.tensors["bias"] = m.bias.detach().float().contiguous()
    return e


def _real_entry(name: str, m: nn.Module) -> _Entry:
    is_conv = isinstance(m, (nn.Conv1d, nn.Conv2d))
    inp = _act_spec(getattr(m, "input_quantizer", None), f"layer {name!r} input")
    e = _Entry("real_conv" if is_conv else "real_linear", name, input=inp, order="bias_scale")
    if is_conv:
        e.update(_conv_geometry(m))
    e.tensors["weight"] = m.weight.detach().float().contiguous()
    if m.bias is not None:
        e.tensors["bias"] = m.bias.detach().float().contiguous()
    scale = getattr(m, "scale", None)
    if isinstance(scale, Tensor):
        e.tensors["scale"] = scale.detach().float().reshape(-1).contiguous()
    return e


def _bn_entry(name: str, m: nn.modules.batchnorm._BatchNorm) -> _Entry:
    e = _Entry("batchnorm", name, num_features=int(m.num_features), eps=float(m.eps),
               dims=1 if isinstance(m, nn.BatchNorm1d) else 2)
    if m.running_mean is not None and m.running_var is not None and m.track_running_stats:
        e.tensors["running_mean"] = m.running_mean.detach().float().contiguous()
        e.tensors["running_var"] = m.running_var.detach().float().contiguous()
    if m.weight is not None:
        e.tensors["weight"] = m.weight.detach().float().contiguous()
    if m.bias is not None:
        e.tensors["bias"] = m.bias.detach().float().contiguous()
    return e


def _pool_cfg(v: Any) -> Any:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else (None if v is None else int(v))


def _to_entries(model: nn.Module) -> list[_Entry]:
    if not _plain_sequential(model):
        raise ValueError(
            f"export_model needs an nn.Sequential model (every flipnet zoo model with BatchNorm folding is one), "
            f"got {type(model).__name__}"
        )
    entries: list[_Entry] = []
    for name, m in _leaves(model):
        if isinstance(m, BinaryLayer):
            entries.append(_binary_entry(name, m))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            entries.append(_real_entry(name, m))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            entries.append(_bn_entry(name, m))
        elif type(m) is nn.MaxPool2d or type(m) is nn.AvgPool2d:
            cfg = {"kernel_size": _pool_cfg(m.kernel_size), "stride": _pool_cfg(m.stride), "padding": _pool_cfg(m.padding),
                   "ceil_mode": bool(m.ceil_mode)}
            if type(m) is nn.MaxPool2d:
                if m.return_indices:
                    raise ValueError(f"layer {name!r}: MaxPool2d(return_indices=True) cannot be exported")
                cfg["dilation"] = _pool_cfg(m.dilation)
                entries.append(_Entry("maxpool2d", name, **cfg))
            else:
                cfg.update(count_include_pad=bool(m.count_include_pad), divisor_override=m.divisor_override)
                entries.append(_Entry("avgpool2d", name, **cfg))
        elif type(m) is nn.AdaptiveAvgPool2d:
            entries.append(_Entry("adaptive_avgpool2d", name, output_size=_pool_cfg(m.output_size)))
        elif type(m) is nn.Flatten:
            entries.append(_Entry("flatten", name, start_dim=int(m.start_dim), end_dim=int(m.end_dim)))
        else:
            spec = _act_spec(m, f"layer {name!r}")
            if spec is not None:
                entries.append(_Entry("activation", name, **spec))
    return entries


def _terms(e: _Entry) -> int:
    shape = e["weight_shape"]
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _fold(entries: list[_Entry]) -> tuple[list[_Entry], list[dict[str, Any]]]:
    """Replace ``binary layer → [maxpool] → BatchNorm → (commuting ops) → sign`` by thresholds."""
    folds: list[dict[str, Any]] = []
    i = 0
    while i < len(entries):
        e = entries[i]
        if e["type"] not in ("binary_conv", "binary_linear") or (e.get("input") or {}).get("op") != "sign":
            i += 1
            continue
        if e["type"] == "binary_conv" and e["pad_value"] not in (0.0, 1.0, -1.0):
            i += 1
            continue
        j = i + 1
        pooled = False
        while j < len(entries) and entries[j]["type"] == "maxpool2d":
            pooled = True
            j += 1
        if j >= len(entries) or entries[j]["type"] != "batchnorm" or "running_mean" not in entries[j].tensors:
            i += 1
            continue
        bn = entries[j]
        k = j + 1
        while k < len(entries) and entries[k]["type"] in ("maxpool2d", "flatten"):
            k += 1
        if k >= len(entries):
            i += 1
            continue
        nxt = entries[k]
        consumes_sign = (nxt["type"] == "activation" and nxt["op"] == "sign") or (
            nxt["type"] in ("binary_conv", "binary_linear", "real_conv", "real_linear")
            and (nxt.get("input") or {}).get("op") == "sign"
        )
        scale, bias = e.tensors.get("scale"), e.tensors.get("bias")
        if not consumes_sign or (pooled and scale is not None and not bool((scale > 0).all())):
            i += 1
            continue
        try:
            t, flip = fold_bn_threshold(
                _terms(e), bn.tensors.get("weight"), bn.tensors.get("bias"), bn.tensors["running_mean"],
                bn.tensors["running_var"], bn["eps"], scale, bias,
            )
        except ValueError:
            i += 1
            continue
        th = _Entry("threshold", bn["name"], channels=int(t.numel()), layer=e["name"])
        th.tensors["threshold"] = t
        th.tensors["flip"] = flip.to(torch.uint8)
        e.tensors.pop("scale", None)
        e.tensors.pop("bias", None)
        entries[j] = th
        folds.append({"layer": e["name"], "batchnorm": bn["name"], "threshold": j})
        i = j + 1
    return entries, folds


# ============================================================================ writing
def _jsonable(v: Any, where: str) -> Any:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} must be JSON-serialisable: {err}") from None
    return v


def export_model(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` as one ``flipnet-export`` safetensors file (see the module docstring).

    Binary weights are bit-packed (QBN layers as ``k``-bit indices plus codebook), BatchNorm is
    folded into integer thresholds where that is exact, everything else is kept in float32.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials are flattened), e.g. a flipnet zoo model.
        path: output file; written atomically.
        metadata: optional. ``metadata["model"] = {"name": ..., "kwargs": {...}}`` records the
            registry name and arguments that rebuild the float model; ``"input_shape"`` the
            per-sample input shape; every other key is kept under ``"extra"``. JSON values only.

    Returns:
        The JSON metadata document that was written.

    Raises:
        ValueError: a layer that cannot be exported, or metadata that is not JSON.
    """
    meta_in = dict(metadata or {})
    model_info = meta_in.pop("model", None)
    if model_info is not None and not (isinstance(model_info, Mapping) and isinstance(model_info.get("name"), str)):
        raise ValueError("metadata['model'] must be a mapping with a string 'name' (and optional 'kwargs')")
    input_shape = meta_in.pop("input_shape", getattr(model, "input_shape", None))
    was_training = model.training
    model.eval()
    try:
        entries, folds = _fold(_to_entries(model))
    finally:
        model.train(was_training)
    tensors: dict[str, Tensor] = {}
    layers = []
    for i, e in enumerate(entries):
        cfg = {k: v for k, v in e.items()}
        names = {}
        for role, t in e.tensors.items():
            tname = f"{i}.{role}"
            tensors[tname] = t.detach().cpu().contiguous()
            names[role] = tname
        cfg["tensors"] = names
        layers.append(cfg)
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": None if model_info is None else {"name": model_info["name"], "kwargs": dict(model_info.get("kwargs") or {})},
        "input_shape": None if input_shape is None else [int(s) for s in input_shape],
        "layers": layers,
        "folds": folds,
        "extra": meta_in,
    }
    text = json.dumps(_jsonable(doc, "export metadata"), allow_nan=False, sort_keys=True)
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT, "flipnet": text})
    return doc


# ============================================================================ reading
def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExportFormatError(f"{path} is not a flipnet export: it is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ExportFormatError(
                    f"{path} is not a valid flipnet export: its header claims {n} bytes but the file has {size - 8} "
                    "(truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise ExportFormatError(f"no export file at {path}; create one with `flipnet export RUN --out FILE`") from None
    except IsADirectoryError:
        raise ExportFormatError(f"{path} is a folder, not an export file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExportFormatError(f"{path} is not a valid flipnet export: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ExportFormatError(f"{path} is not a valid flipnet export: malformed safetensors header")
    return header, size


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata document of an export, checked for format and version.

    Raises:
        ExportFormatError: missing file, not safetensors, not a flipnet export, or an
            unsupported version.
    """
    path = Path(path)
    header, _ = _read_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or "flipnet" not in meta:
        raise ExportFormatError(f"{path} is a safetensors file but not a flipnet export (no '{EXPORT_FORMAT}' metadata)")
    try:
        doc = json.loads(meta["flipnet"])
    except (TypeError, json.JSONDecodeError):
        raise ExportFormatError(f"{path}: the flipnet metadata is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ExportFormatError(f"{path}: the flipnet metadata does not describe a {EXPORT_FORMAT} file")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1 or version > EXPORT_VERSION:
        raise ExportFormatError(
            f"{path} has export format version {version!r}; this flipnet reads versions 1..{EXPORT_VERSION} "
            "(upgrade flipnet to read newer files)"
        )
    if not isinstance(doc.get("layers"), list):
        raise ExportFormatError(f"{path}: the flipnet metadata has no layer list")
    return doc


class _Reader:
    def __init__(self, path: Path, tensors: Mapping[str, Tensor], index: int, cfg: Mapping[str, Any]) -> None:
        self.path, self.tensors, self.index, self.cfg = path, tensors, index, cfg
        self.where = f"{path}: layer {index} ({cfg.get('type')!r}, {cfg.get('name')!r})"

    def fail(self, msg: str) -> ExportFormatError:
        return ExportFormatError(f"{self.where}: {msg}; the file is corrupt or was edited, export it again")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.cfg:
            if default is ...:
                raise self.fail(f"missing field {key!r}")
            return default
        v = self.cfg[key]
        if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
            raise self.fail(f"field {key!r} has the wrong type ({type(v).__name__})")
        return v

    def ints(self, key: str, n: int | None = None, minimum: int = 0) -> list[int]:
        v = self.get(key, list)
        if (n is not None and len(v) != n) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in v):
            raise self.fail(f"field {key!r} must be a list of {n or 'some'} ints >= {minimum}, got {v!r}")
        return v

    def tensor(self, role: str, dtype: torch.dtype, shape: tuple[int, ...] | None, optional: bool = False) -> Tensor | None:
        names = self.cfg.get("tensors")
        if not isinstance(names, dict):
            raise self.fail("missing tensor table")
        if role not in names:
            if optional:
                return None
            raise self.fail(f"missing tensor {role!r}")
        t = self.tensors.get(names[role])
        if t is None:
            raise self.fail(f"tensor {names[role]!r} is not in the file")
        if t.dtype != dtype:
            raise self.fail(f"tensor {role!r} has dtype {t.dtype}, expected {dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.fail(f"tensor {role!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t


def _binary_weight(r: _Reader, shape: list[int]) -> Tensor:
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


class _RealLayer(nn.Module):
    """Float convolution / dense layer (weights stored real), with scale and bias in a set order."""

    def __init__(self, weight: Tensor, bias: Tensor | None, scale: Tensor | None, order: str, conv: dict[str, Any] | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("scale", scale)
        self.order = order
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        bias_inside = self.order == "bias_scale" and self.bias is not None
        b = self.bias if bias_inside else None
        if self.conv is None:
            out = F.linear(x, self.weight, b)
        else:
            c = self.conv
            fn = F.conv1d if self.weight.dim() == 3 else F.conv2d
            if c["padding_mode"] != "zeros":  # "pads": explicit (left, right) pairs, also for padding="same"
                out = fn(F.pad(x, c["pads"], mode=c["padding_mode"]), self.weight, b, c["stride"], 0, c["dilation"], c["groups"])
            elif c["pad_value"] != 0.0 and any(c["pads"]):
                out = fn(F.pad(x, c["pads"], value=c["pad_value"]), self.weight, b, c["stride"], 0, c["dilation"], c["groups"])
            else:
                pad = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
                out = fn(x, self.weight, b, c["stride"], pad, c["dilation"], c["groups"])
        if self.scale is not None:
            out = out * self.scale.view(shape if out.dim() > 2 else (1, -1))
        if self.bias is not None and not bias_inside:
            out = out + self.bias.view(shape if out.dim() > 2 else (1, -1))
        return out


def _conv_cfg(r: _Reader, nd: int) -> dict[str, Any]:
    padding = r.cfg.get("padding")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise r.fail(f"invalid padding {padding!r}")
    elif not (isinstance(padding, list) and len(padding) == nd and all(isinstance(p, int) and p >= 0 for p in padding)):
        raise r.fail(f"invalid padding {padding!r}")
    mode = r.get("padding_mode", str)
    if mode not in ("zeros", "reflect", "replicate", "circular"):
        raise r.fail(f"invalid padding_mode {mode!r}")
    pv = r.get("pad_value", (int, float))
    if not math.isfinite(pv):
        raise r.fail("pad_value is not finite")
    return {
        "stride": r.ints("stride", nd, 1),
        "padding": padding,
        "pads": r.ints("pads", 2 * nd, 0),
        "dilation": r.ints("dilation", nd, 1),
        "groups": r.get("groups", int),
        "padding_mode": mode,
        "pad_value": float(pv),
    }


def _build_layer(r: _Reader) -> list[nn.Module]:
    typ = r.get("type", str)
    inp = r.cfg.get("input")
    pre: list[nn.Module] = []
    if inp is not None:
        if not isinstance(inp, dict) or not isinstance(inp.get("op"), str):
            raise r.fail("invalid input activation")
        pre = [_act_module(inp)]
    if typ in ("binary_conv", "binary_linear"):
        shape = r.ints("weight_shape", None, 1)
        is_conv = typ == "binary_conv"
        if (is_conv and len(shape) not in (3, 4)) or (not is_conv and len(shape) != 2):
            raise r.fail(f"weight_shape {shape} has the wrong rank")
        w = _binary_weight(r, shape)
        o = shape[0]
        scale = r.tensor("scale", torch.float32, (o,), optional=True)
        bias = r.tensor("bias", torch.float32, (o,), optional=True)
        binary_in = inp is not None and inp["op"] == "sign"
        if not is_conv:
            if binary_in:
                return [PackedBinaryLinear(pack_words(w, dim=1), shape[1], scale, bias)]
            return pre + [BinaryWeightLinear(w, False, scale, bias)]
        nd = len(shape) - 2
        c = _conv_cfg(r, nd)
        if c["groups"] < 1 or shape[1] * c["groups"] <= 0:
            raise r.fail("invalid groups")
        if binary_in and nd == 2 and c["groups"] == 1 and c["padding_mode"] == "zeros":
            words = pack_words(w.permute(0, 2, 3, 1), dim=-1)
            return [PackedBinaryConv2d(words, shape[1], c["stride"], c["pads"], c["dilation"], c["pad_value"], scale, bias)]
        return pre + [BinaryWeightConv(w, c["stride"], c["padding"], c["dilation"], c["groups"], c["padding_mode"],
                                       c["pad_value"], False, scale, bias)]
    if typ in ("real_conv", "real_linear"):
        names = r.cfg.get("tensors") or {}
        wt = r.tensors.get(names.get("weight", ""))
        if wt is None or wt.dtype != torch.float32:
            raise r.fail("missing float32 tensor 'weight'")
        is_conv = typ == "real_conv"
        if wt.dim() not in ((3, 4) if is_conv else (2,)):
            raise r.fail(f"weight has the wrong rank {wt.dim()}")
        o = wt.shape[0]
        order = r.get("order", str)
        if order not in ("scale_bias", "bias_scale"):
            raise r.fail(f"invalid order {order!r}")
        conv = _conv_cfg(r, wt.dim() - 2) if is_conv else None
        return pre + [_RealLayer(wt, r.tensor("bias", torch.float32, (o,), True), r.tensor("scale", torch.float32, (o,), True), order, conv)]
    if typ == "batchnorm":
        n = r.get("num_features", int)
        dims = r.get("dims", int)
        eps = r.get("eps", (int, float))
        if n < 1 or dims not in (1, 2) or not eps >= 0:
            raise r.fail("invalid BatchNorm configuration")
        mean = r.tensor("running_mean", torch.float32, (n,), optional=True)
        var = r.tensor("running_var", torch.float32, (n,), optional=True)
        gamma = r.tensor("weight", torch.float32, (n,), optional=True)
        beta = r.tensor("bias", torch.float32, (n,), optional=True)
        cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        bn = cls(n, eps=float(eps), affine=True, track_running_stats=mean is not None)
        with torch.no_grad():
            bn.weight.copy_(gamma if gamma is not None else torch.ones(n))
            bn.bias.copy_(beta if beta is not None else torch.zeros(n))
            if mean is not None:
                if var is None:
                    raise r.fail("running_mean without running_var")
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
        return [bn.eval()]
    if typ == "threshold":
        n = r.get("channels", int)
        t = r.tensor("threshold", torch.int32, (n,))
        flip = r.tensor("flip", torch.uint8, (n,))
        if bool((flip > 1).any()):
            raise r.fail("flip must hold 0 or 1")
        return [ThresholdSign(t.float(), flip.bool())]  # type: ignore[union-attr]
    if typ == "maxpool2d":
        return [MaxPool2d(_pool_arg(r, "kernel_size"), _pool_arg(r, "stride"), _pool_arg(r, "padding", 0),
                             _pool_arg(r, "dilation"), ceil_mode=r.get("ceil_mode", bool))]
    if typ == "avgpool2d":
        return [nn.AvgPool2d(_pool_arg(r, "kernel_size"), _pool_arg(r, "stride"), _pool_arg(r, "padding", 0),
                             r.get("ceil_mode", bool), r.get("count_include_pad", bool), r.get("divisor_override", (int, type(None))))]
    if typ == "adaptive_avgpool2d":
        return [nn.AdaptiveAvgPool2d(_pool_arg(r, "output_size"))]
    if typ == "flatten":
        return [nn.Flatten(r.get("start_dim", int), r.get("end_dim", int))]
    if typ == "activation":
        return [_act_module(r.cfg)]
    raise r.fail(f"unknown layer type {typ!r}")


def _pool_arg(r: _Reader, key: str, minimum: int = 1) -> Any:
    v = r.cfg.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and v >= minimum:
        return v
    if isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in v):
        return tuple(v)
    raise r.fail(f"field {key!r} must be an int >= {minimum} or a pair of them, got {v!r}")


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Sequential:
    """Rebuild an inference model from a ``flipnet-export`` file.

    Binary layers with binary inputs become :class:`PackedBinaryConv2d` / :class:`PackedBinaryLinear`
    (XNOR-popcount kernels), folded BatchNorms :class:`ThresholdSign`, everything else the float
    module it was. The result is an ``nn.Sequential`` in eval mode whose outputs equal the trained
    model's eval-mode outputs: exactly for the binary parts, up to float rounding for float parts.
    The JSON metadata is attached as ``model.export_metadata``.

    Raises:
        ExportFormatError: the file is missing, truncated, not a flipnet export, of a newer version,
            or its tensors do not match the metadata.
    """
    path = Path(path)
    doc = read_export_metadata(path)
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        data = path.read_bytes()
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise ExportFormatError(f"{path} is not a valid flipnet export: its tensor data is malformed ({err})") from None
    modules: list[nn.Module] = []
    for i, cfg in enumerate(doc["layers"]):
        if not isinstance(cfg, dict):
            raise ExportFormatError(f"{path}: layer {i} is not a JSON object; the file is corrupt")
        r = _Reader(path, tensors, i, cfg)
        try:
            modules.extend(_build_layer(r))
        except ExportFormatError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError, OverflowError) as err:
            raise r.fail(str(err)) from None
    model = nn.Sequential(*modules).eval().to(device)
    model.export_metadata = doc  # type: ignore[assignment]
    return model
