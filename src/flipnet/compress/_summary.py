r"""Model summary for binary networks: parameters by bit width, packed memory and MACs.

:func:`summary` runs one forward pass with hooks and returns a :class:`Summary` with one row per
layer and the totals that matter when deploying a binary network, in the spirit of larq's
``larq.models.summary``.

Counting rules
--------------
Rows
    One row per leaf module (a module without children) and per binary layer (its quantizer
    children are part of it), in ``named_modules()`` order; plus any other module that owns
    parameters or buffers directly. Modules that never run in the forward pass still get a row
    (output shape ``None``) when they hold parameters, so the totals cover the whole model.
Parameters by bit width
    The weight of a binary layer with 1-bit weights (:attr:`~flipnet.layers.BinaryLayer.
    has_binary_weight`) counts at 1 bit; every other parameter (float layers, biases, scales,
    BatchNorm) and every persistent floating-point buffer (BatchNorm running statistics, which a
    deployment needs unless it folds them) counts at 32 bits, whatever the dtype it is stored
    in. Integer buffers (``num_batches_tracked``) are counters, not weights, and non-persistent
    buffers are derived data; both are left out.
    Parameters shared by several modules count once, in the first row that holds them.
Memory (packed)
    :math:`\mathrm{bits} = n_1 + 32\,(n_{32} + n_\alpha)` per row, and bytes = bits / 8: binary
    weights are packed 8 per byte. :math:`n_\alpha` are the per-channel constants a deployment
    must store although they are not parameters: the output channels of an ``scale="xnor"``
    layer and of a latent layer with the ``magnitude_aware_sign`` weight quantizer. The
    float32-equivalent size counts every one of these numbers at 32 bits.
MACs (multiply-accumulates) per example
    Counted for convolutions (``nn.Conv1d/2d/3d`` and binary convolutions), transposed
    convolutions and linear layers: a convolution or linear layer does
    :math:`\mathrm{numel}(y)/N \cdot \mathrm{numel}(W)/C_{out}` MACs per example (output
    elements times fan-in; :math:`N` is the first, batch, dimension of the output), a transposed
    convolution :math:`\mathrm{numel}(x)/N \cdot \mathrm{numel}(W)/C_{in}`. Activations,
    pooling and BatchNorm (which folds into a per-channel affine map or threshold) count no
    MACs. A layer called several times counts every call.

    * **binary MACs**: 1-bit weights *and* 1-bit inputs; these run as XNOR (or AND) and
      popcount on packed words.
    * **float MACs**: everything else. Among them, **binary-weight MACs** (1-bit weights, real
      inputs, as in the first layer of a BNN) need no multiplications, only additions and
      subtractions; they are reported as a separate column and total, and stay included in the
      float MACs.

References: Rastegari et al. 2016, "XNOR-Net" (binary MACs as XNOR-popcount); larq
``models.summary`` (Geiger & Team Plumerai 2020, "Larq: An Open-Source Library for Training
Binarized Neural Networks") for the layout of the table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layers import BinaryLayer
from ..quantizers import MagnitudeAwareSign
from .qbn import projection, stored_weight

__all__ = ["summary", "Summary", "LayerSummary"]

_MAC_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerSummary:
    """One row of a :class:`Summary`.

    Attributes:
        name: qualified module name (``""`` for a model that is a single layer).
        type: class name of the module.
        input_bits: precision of the inputs the layer computes with (1 or 32) for layers that
            count MACs; ``None`` for other modules.
        weight_bits: precision of the weight (1 or 32) for layers with a weight; else ``None``.
        output_shape: shape of the (first) output of the first call, ``None`` if it never ran.
        params_by_bits: number of parameters (and float buffers) per bit width, e.g. ``{1: 2304, 32: 16}``.
        trainable: how many of them are trainable parameters (``requires_grad``).
        extra_floats: per-channel constants stored for deployment that are not parameters.
        memory_bits: packed storage of the row in bits.
        macs_binary: MACs with 1-bit weights and 1-bit inputs (per example).
        macs_float: every other MAC (per example), including ``macs_binary_weight``.
        macs_binary_weight: MACs with 1-bit weights but real inputs (a part of ``macs_float``).
        calls: how many times the module ran in the forward pass.
    """

    name: str
    type: str
    input_bits: int | None = None
    weight_bits: int | None = None
    output_shape: tuple[int, ...] | None = None
    params_by_bits: dict[int, int] = field(default_factory=dict)
    trainable: int = 0
    extra_floats: int = 0
    memory_bits: int = 0
    macs_binary: int = 0
    macs_float: int = 0
    macs_binary_weight: int = 0
    calls: int = 0

    @property
    def params(self) -> int:
        """All parameters of the row (every bit width)."""
        return sum(self.params_by_bits.values())

    @property
    def memory_bytes(self) -> float:
        """Packed storage in bytes (bits / 8)."""
        return self.memory_bits / 8


@dataclass
class Summary:
    """Per-layer rows and model totals; see the module documentation for the counting rules.

    ``str(summary)`` and :meth:`table` give the readable table, :meth:`to_dict` a JSON-ready dict.
    """

    model_name: str
    input_shape: tuple[int, ...]
    layers: list[LayerSummary]

    # ---------------------------------------------------------------- totals
    @property
    def params_by_bits(self) -> dict[int, int]:
        """Total parameters per bit width."""
        out: dict[int, int] = {}
        for row in self.layers:
            for bits, n in row.params_by_bits.items():
                out[bits] = out.get(bits, 0) + n
        return dict(sorted(out.items()))

    @property
    def total_params(self) -> int:
        return sum(self.params_by_bits.values())

    @property
    def trainable_params(self) -> int:
        return sum(row.trainable for row in self.layers)

    @property
    def memory_bits(self) -> int:
        """Packed model size in bits (1-bit weights at 1 bit, everything else at 32)."""
        return sum(row.memory_bits for row in self.layers)

    @property
    def memory_bytes(self) -> float:
        """Packed model size in bytes."""
        return self.memory_bits / 8

    @property
    def float32_bytes(self) -> float:
        """Size of the same numbers all stored as float32, in bytes."""
        return 4.0 * (self.total_params + sum(row.extra_floats for row in self.layers))

    @property
    def compression_ratio(self) -> float:
        """``float32_bytes / memory_bytes`` (NaN for a model without parameters)."""
        return self.float32_bytes / self.memory_bytes if self.memory_bits else math.nan

    @property
    def macs_binary(self) -> int:
        return sum(row.macs_binary for row in self.layers)

    @property
    def macs_float(self) -> int:
        return sum(row.macs_float for row in self.layers)

    @property
    def macs_binary_weight(self) -> int:
        return sum(row.macs_binary_weight for row in self.layers)

    @property
    def macs(self) -> int:
        """All MACs per example."""
        return self.macs_binary + self.macs_float

    @property
    def binary_mac_share(self) -> float:
        """Fraction of MACs that are binary (XNOR-popcount); NaN for a model without MACs."""
        return self.macs_binary / self.macs if self.macs else math.nan

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """Rows and totals as plain Python types (``json.dumps`` ready; bit widths become str keys)."""
        rows = []
        for row in self.layers:
            d = asdict(row)
            d["output_shape"] = None if row.output_shape is None else list(row.output_shape)
            d["params_by_bits"] = {str(k): v for k, v in row.params_by_bits.items()}
            d["params"] = row.params
            d["memory_bytes"] = row.memory_bytes
            rows.append(d)
        return {
            "model": self.model_name,
            "input_shape": list(self.input_shape),
            "layers": rows,
            "totals": {
                "params": self.total_params,
                "trainable_params": self.trainable_params,
                "params_by_bits": {str(k): v for k, v in self.params_by_bits.items()},
                "memory_bytes": self.memory_bytes,
                "float32_bytes": self.float32_bytes,
                "compression_ratio": _json_float(self.compression_ratio),
                "macs": self.macs,
                "macs_binary": self.macs_binary,
                "macs_float": self.macs_float,
                "macs_binary_weight": self.macs_binary_weight,
                "binary_mac_share": _json_float(self.binary_mac_share),
            },
        }

    def table(self) -> str:
        """The summary as a text table (per-layer rows, then totals)."""
        headers = ["Layer", "Type", "In bits", "W bits", "Output shape", "# 1-bit", "# 32-bit",
                   "Memory (KiB)", "1-bit MACs", "32-bit MACs", "(bin-weight)"]
        body: list[list[str]] = []
        for row in self.layers:
            body.append([
                row.name or "(model)",
                row.type,
                _opt(row.input_bits),
                _opt(row.weight_bits),
                "-" if row.output_shape is None else "x".join(str(d) for d in row.output_shape),
                _count(row.params_by_bits.get(1, 0)),
                _count(row.params_by_bits.get(32, 0)),
                f"{row.memory_bytes / 1024:.2f}",
                _count(row.macs_binary),
                _count(row.macs_float),
                _count(row.macs_binary_weight),
            ])
        total = self.params_by_bits
        body.append(["Total", "", "", "", "", _count(total.get(1, 0)), _count(total.get(32, 0)),
                     f"{self.memory_bytes / 1024:.2f}", _count(self.macs_binary), _count(self.macs_float),
                     _count(self.macs_binary_weight)])
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
        right = set(range(2, len(headers)))

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(fmt(headers))
        lines = [f"Model: {self.model_name}   input: {'x'.join(str(d) for d in self.input_shape)}", rule,
                 fmt(headers), rule]
        lines += [fmt(r) for r in body[:-1]]
        lines += [rule, fmt(body[-1]), rule]
        share = self.binary_mac_share
        ratio = self.compression_ratio
        stats = [
            ("Total params", _count(self.total_params)),
            ("Trainable params", _count(self.trainable_params)),
            ("Non-trainable params", _count(self.total_params - self.trainable_params)),
        ]
        stats += [(f"  {bits}-bit params", _count(n)) for bits, n in total.items()]
        stats += [
            ("Model size (packed)", _size(self.memory_bytes)),
            ("Float-32 equivalent", _size(self.float32_bytes)),
            ("Compression ratio", "-" if math.isnan(ratio) else f"{ratio:.2f}x"),
            ("MACs per example", _count(self.macs)),
            ("  binary (XNOR-popcount)", _count(self.macs_binary)),
            ("  float", _count(self.macs_float)),
            ("    of which binary-weight", _count(self.macs_binary_weight)),
            ("Binary share of MACs", "-" if math.isnan(share) else f"{100 * share:.2f} %"),
        ]
        key_width = max(len(k) for k, _ in stats)
        lines += [f"{k.ljust(key_width)}  {v}" for k, v in stats]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


def _opt(x: int | None) -> str:
    return "-" if x is None else str(x)


def _count(n: int) -> str:
    return f"{n:,}"


def _size(num_bytes: float) -> str:
    if num_bytes >= 1024**2:
        return f"{num_bytes / 1024**2:.2f} MiB ({num_bytes:,.0f} B)"
    if num_bytes >= 1024:
        return f"{num_bytes / 1024:.2f} KiB ({num_bytes:,.0f} B)"
    return f"{num_bytes:,.1f} B"


def _row_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules, binary layers (as a whole) and modules with direct tensors, in model order."""
    rows: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, BinaryLayer):
            inside.update(id(c) for c in m.modules() if c is not m)
            rows.append((name, m))
            continue
        has_own = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if not any(True for _ in m.children()) or has_own:
            rows.append((name, m))
    return rows


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(x, dict):
        for item in x.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _stored_buffers(module: nn.Module, recurse: bool) -> list[Tensor]:
    """Persistent buffers (those in the state dict); non-persistent ones are derived data."""
    out = []
    for owner in module.modules() if recurse else [module]:
        skip = getattr(owner, "_non_persistent_buffers_set", set())
        out += [b for name, b in owner.named_buffers(recurse=False) if name not in skip]
    return out


def _check_input_size(input_size: object) -> tuple[int, ...]:
    dims = tuple(input_size) if isinstance(input_size, (tuple, list, torch.Size)) else ()
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(
            f"input_size must be a sequence of positive ints such as (1, 3, 32, 32), got {input_size!r}"
        )
    return dims


def _precisions(m: nn.Module) -> tuple[int | None, int | None]:
    """(input bits, weight bits) of a module."""
    if isinstance(m, BinaryLayer):
        return (1 if m.binary_inputs else 32), (1 if m.has_binary_weight else 32)
    weight = getattr(m, "weight", None)
    w_bits = 32 if isinstance(weight, Tensor) else None
    return (32 if isinstance(m, _MAC_TYPES) else None), w_bits


def summary(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    example_input: Tensor | Sequence[Tensor] | None = None,
) -> Summary:
    """Summarise ``model``: per-layer precision, shapes, parameters by bit width, memory, MACs.

    Args:
        model: any ``nn.Module``; binary layers of :mod:`flipnet.layers` are recognised.
        input_size: shape of one input batch, e.g. ``(1, 3, 32, 32)``; a zero tensor of that
            shape (on the model's device, in its floating dtype) is fed through the model.
        example_input: an input tensor, or a tuple of positional inputs, instead of
            ``input_size``. MACs are per example: the first dimension is the batch.

    The model runs once in eval mode under ``torch.no_grad()``; the train/eval flag of every
    module is restored afterwards and no parameter or buffer changes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: neither or both of ``input_size`` and ``example_input`` are given, or
            ``input_size`` is not a sequence of positive integers.
        RuntimeError: the forward pass fails (the message names the input shape used).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary needs an nn.Module, got {type(model).__name__}")
    if (input_size is None) == (example_input is None):
        raise ValueError("pass exactly one of input_size (e.g. (1, 3, 32, 32)) and example_input")
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    if input_size is not None:
        inputs: tuple = (torch.zeros(_check_input_size(input_size), device=device, dtype=dtype),)
    elif isinstance(example_input, Tensor):
        inputs = (example_input,)
    elif isinstance(example_input, (tuple, list)) and example_input:
        inputs = tuple(example_input)
    else:
        raise ValueError(
            f"example_input must be a tensor or a non-empty tuple of inputs, got {type(example_input).__name__}"
        )
    first = _first_tensor(inputs)
    input_shape = tuple(first.shape) if first is not None else ()

    rows = _row_modules(model)
    info: dict[int, LayerSummary] = {}
    seen_params: set[int] = set()
    for name, m in rows:
        in_bits, w_bits = _precisions(m)
        qbn = projection(m)
        cls = parametrize.type_before_parametrizations(m).__name__
        row = LayerSummary(name=name, type=cls if qbn is None else f"{cls}+QBN(k={qbn.k})", input_bits=in_bits,
                           weight_bits=w_bits)
        tensors = list(m.parameters() if isinstance(m, BinaryLayer) else m.parameters(recurse=False))
        # the parameter itself (under QBN's parametrization m.weight is computed from it)
        binary_weight = stored_weight(m) if isinstance(m, BinaryLayer) and m.has_binary_weight else None
        for p in tensors:
            if id(p) in seen_params:
                continue
            seen_params.add(id(p))
            bits = 1 if p is binary_weight else 32
            row.params_by_bits[bits] = row.params_by_bits.get(bits, 0) + p.numel()
            if p.requires_grad:
                row.trainable += p.numel()
        for b in _stored_buffers(m, recurse=isinstance(m, BinaryLayer)):
            if id(b) in seen_params or not b.is_floating_point():
                continue
            seen_params.add(id(b))
            row.params_by_bits[32] = row.params_by_bits.get(32, 0) + b.numel()
        if isinstance(m, BinaryLayer) and m.has_binary_weight:
            magnitude = m.weight_mode == "latent" and isinstance(m.weight_quantizer, MagnitudeAwareSign)
            if m.scale_mode == "xnor" or magnitude:
                row.extra_floats = m.weight.shape[0]
        row.params_by_bits = dict(sorted(row.params_by_bits.items()))
        row.memory_bits = sum(bits * n for bits, n in row.params_by_bits.items()) + 32 * row.extra_floats
        if qbn is not None and binary_weight is not None:  # k-bit kernel indices plus the codebook, not 1 bit per weight
            taps = qbn.kernel_size[0] * qbn.kernel_size[1]
            row.memory_bits += binary_weight.numel() // taps * qbn.k + (1 << qbn.k) * taps - binary_weight.numel()
        info[id(m)] = row

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        row = info[id(module)]
        row.calls += 1
        out = _first_tensor(output)
        if row.output_shape is None and out is not None:
            row.output_shape = tuple(out.shape)
        if not isinstance(module, _MAC_TYPES) or out is None:
            return
        weight = module.weight
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            x = _first_tensor(args)
            if x is None:
                return
            n_batch = x.shape[0] if x.dim() == len(module.kernel_size) + 2 else 1
            macs = x.numel() // n_batch * (weight.numel() // weight.shape[0])
        else:
            if isinstance(module, nn.Linear):
                n_batch = out.shape[0] if out.dim() >= 2 else 1
            else:
                n_batch = out.shape[0] if out.dim() == len(module.kernel_size) + 2 else 1
            macs = out.numel() // n_batch * (weight.numel() // weight.shape[0])
        if row.weight_bits == 1 and row.input_bits == 1:
            row.macs_binary += macs
        else:
            row.macs_float += macs
            if row.weight_bits == 1:
                row.macs_binary_weight += macs

    handles = [m.register_forward_hook(hook) for _, m in rows]
    modes = {id(m): m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(*inputs)
            except Exception as exc:  # re-raised with the input that caused it
                raise RuntimeError(
                    f"summary: the forward pass of {type(model).__name__} failed on an input of shape "
                    f"{input_shape}: {exc}; check input_size or pass example_input"
                ) from exc
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = modes.get(id(m), m.training)

    layers = [info[id(m)] for _, m in rows if info[id(m)].calls or info[id(m)].params]
    return Summary(model_name=type(model).__name__, input_shape=input_shape, layers=layers)
