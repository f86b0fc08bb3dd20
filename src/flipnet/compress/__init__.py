"""Compression and deployment of binary networks.

* :mod:`flipnet.compress.pack` -- bit packing of ±1 tensors (8 per byte, 64 per word) and of
  k-bit indices;
* :mod:`flipnet.compress.codes` -- binary kernels as integer codes;
* :mod:`flipnet.compress.qbn` -- kernel-codebook compression below one bit per weight
  (:func:`apply_qbn`, a ``torch.nn.utils.parametrize`` projection);
* :mod:`flipnet.compress.export` -- the one-file safetensors export (codec registry, BatchNorm
  folded into integer thresholds) and :func:`load_exported`, which rebuilds a packed model;
* :mod:`flipnet.compress.packed` -- packed inference layers (XNOR-popcount kernels);
  :func:`set_kernel_mode` and :func:`kernel_backend` choose and report their implementation;
* :func:`summary` -- the per-layer model table (parameters by bit width, memory, MACs).

See ``docs/deployment.md`` and ``docs/summary.md``.
"""

from __future__ import annotations

from ._kernels import kernel_backend, set_kernel_mode
from ._summary import summary
from .export import export_model, load_exported, read_export_metadata
from .packed import PackedBinaryConv2d, PackedBinaryLinear, ThresholdSign
from .qbn import apply_qbn, remove_qbn

__all__ = [
    "summary",
    "export_model",
    "load_exported",
    "read_export_metadata",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "ThresholdSign",
    "apply_qbn",
    "remove_qbn",
    "kernel_backend",
    "set_kernel_mode",
]
