"""Compression and deployment of binary networks.

* :mod:`flipnet.compress.pack` -- bit packing of ±1 tensors (8 per byte, 64 per word) and of
  k-bit indices.
* :mod:`flipnet.compress.export` -- one-file safetensors export with bit-packed binary weights and
  BatchNorm folded into integer thresholds; :func:`load_exported` rebuilds an inference model.
* :mod:`flipnet.compress.packed` -- packed inference layers (XNOR-popcount kernels).
* :mod:`flipnet.compress.summary` -- model summary (``summary``), written separately.
* :mod:`flipnet.compress.qbn` -- kernel-codebook compression (``QBN*``; every name of its
  ``__all__`` is available here too).

Sibling modules are imported lazily, so a missing optional module never breaks
``import flipnet.compress``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = [
    # pack
    "pack_bits",
    "unpack_bits",
    "pack_words",
    "unpack_words",
    "pack_indices",
    "unpack_indices",
    # export
    "export_model",
    "load_exported",
    "read_export_metadata",
    "fold_bn_threshold",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    # packed inference
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "BinaryWeightConv2d",
    "BinaryWeightLinear",
    "ThresholdSign",
    "BinaryWeightConv",
    "kernel_backend",
    # siblings
    "summary",
    "qbn",
]

# name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "pack_bits": ("pack", "pack_bits"),
    "unpack_bits": ("pack", "unpack_bits"),
    "pack_words": ("pack", "pack_words"),
    "unpack_words": ("pack", "unpack_words"),
    "pack_indices": ("pack", "pack_indices"),
    "unpack_indices": ("pack", "unpack_indices"),
    "export_model": ("export", "export_model"),
    "load_exported": ("export", "load_exported"),
    "read_export_metadata": ("export", "read_export_metadata"),
    "fold_bn_threshold": ("export", "fold_bn_threshold"),
    "EXPORT_FORMAT": ("export", "EXPORT_FORMAT"),
    "EXPORT_VERSION": ("export", "EXPORT_VERSION"),
    "PackedBinaryConv2d": ("packed", "PackedBinaryConv2d"),
    "PackedBinaryLinear": ("packed", "PackedBinaryLinear"),
    "BinaryWeightConv2d": ("packed", "BinaryWeightConv2d"),
    "BinaryWeightLinear": ("packed", "BinaryWeightLinear"),
    "ThresholdSign": ("packed", "ThresholdSign"),
    "BinaryWeightConv": ("packed", "BinaryWeightConv"),
    "kernel_backend": ("_kernels", "kernel_backend"),
    "summary": ("summary", "summary"),
    "qbn": ("qbn", None),
}


def _qbn_name(name: str) -> bool:
    """Names of :mod:`flipnet.compress.qbn` (``QBNConv2d``, ``apply_qbn``, ...) are re-exported."""
    if name.startswith("_"):
        return False
    try:
        qbn = importlib.import_module(f"{__name__}.qbn")
    except ImportError:
        return False
    return name in getattr(qbn, "__all__", ())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
    elif _qbn_name(name):
        module_name, attr = "qbn", name
    else:
        raise AttributeError(f"module 'flipnet.compress' has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CompressPackage(types.ModuleType):
    """Keeps ``flipnet.compress.summary`` the *function* even after the submodule is imported.

    Importing ``flipnet.compress.summary`` (the module) makes the import system set the package
    attribute ``summary`` to the module object; this data descriptor takes precedence over the
    module ``__dict__``, so the attribute always resolves to the function, as documented.
    """

    @property
    def summary(self) -> Any:
        return importlib.import_module(f"{__name__}.summary").summary

    @summary.setter
    def summary(self, value: Any) -> None:  # the import system stores the submodule here
        pass


sys.modules[__name__].__class__ = _CompressPackage
