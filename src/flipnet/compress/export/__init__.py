"""One-file export of trained binary networks: bit-packed weights, BatchNorm folded into thresholds.

* :mod:`~flipnet.compress.export.fold` -- BatchNorm + sign → integer threshold, exactly;
* :mod:`~flipnet.compress.export.format` -- the ``flipnet-export`` safetensors file (schema,
  version, tensor naming, reading with safetensors' own API);
* :mod:`~flipnet.compress.export.codecs` -- the per-layer codec registry (:class:`LayerCodec`,
  :func:`register_codec`): adding a layer type is one registration;
* :mod:`~flipnet.compress.export.model` -- :func:`export_model` and :func:`load_exported`.

The file format and how to add a layer type are described in ``docs/deployment.md``.
"""

from __future__ import annotations

from .codecs import LayerCodec, list_codecs, register_codec
from .fold import fold_bn_threshold
from .format import EXPORT_FORMAT, EXPORT_VERSION, read_export_metadata
from .model import export_model, load_exported, load_qbn

__all__ = [
    "export_model",
    "load_exported",
    "load_qbn",
    "read_export_metadata",
    "fold_bn_threshold",
    "LayerCodec",
    "register_codec",
    "list_codecs",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
]
