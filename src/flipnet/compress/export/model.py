"""Model → ``flipnet-export`` file → inference model: the two entry points of the export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...errors import ExportFormatError
from ..codes import MAX_KERNEL_BITS, encode_kernels
from ..pack import packed_size, unpack_bits
from ..qbn import QBNStored, check_k
from .codecs import Encoder, codec_for, decode_entries
from .fold import fold_entries
from .format import Reader, read_export_metadata, read_export_tensors, write_export

__all__ = ["export_model", "load_exported", "load_qbn"]


def export_model(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` as one ``flipnet-export`` safetensors file (format: ``docs/deployment.md``).

    Binary weights are bit-packed (QBN layers as ``k``-bit indices plus codebook), BatchNorm is
    folded into integer thresholds where that is exact (:mod:`flipnet.compress.export.fold`),
    everything else is kept in float32. The model is walked through the codec registry
    (:mod:`flipnet.compress.export.codecs`).

    Args:
        model: an ``nn.Sequential`` (nested Sequentials are flattened; ``binarynet``,
            ``binary_mlp``) or a model with a root codec (the ResNets ``resnet20``/``resnet18`` and
            Bi-Real Nets ``birealnet18``/``birealnet34``, ReActNet-A ``reactnet_a``; shortcuts included).
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
    codec = codec_for(model)
    if codec is None or not codec.root:
        raise ValueError(
            "export_model needs an nn.Sequential model (binarynet, binary_mlp) or a model with a root export "
            f"codec (resnet20, resnet18, birealnet18, birealnet34, reactnet_a), got {type(model).__name__}"
        )
    was_training = model.training
    model.eval()
    try:
        entries = Encoder().module("", model)
    finally:
        model.train(was_training)
    folds = fold_entries(entries)
    return write_export(path, entries, folds, model=model_info, input_shape=input_shape, extra=meta_in)


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Sequential:
    """Rebuild an inference model from a ``flipnet-export`` file.

    Binary layers with binary inputs become :class:`~flipnet.compress.packed.PackedBinaryConv2d` /
    :class:`~flipnet.compress.packed.PackedBinaryLinear` (XNOR-popcount kernels), folded BatchNorms
    :class:`~flipnet.compress.packed.ThresholdSign`, residual blocks
    :class:`~flipnet.compress.export.codecs.Residual`, everything else the float module it was.
    The result is an ``nn.Sequential`` in eval mode whose outputs equal the trained model's
    eval-mode outputs: exactly for the binary parts, up to float rounding for float parts. The
    JSON metadata is attached as ``model.export_metadata``.

    Raises:
        ExportFormatError: the file is missing, truncated, not a flipnet export, of a newer version,
            or its tensors do not match the metadata.
    """
    path = Path(path)
    doc = read_export_metadata(path)
    tensors = read_export_tensors(path)
    readers = []
    for i, cfg in enumerate(doc["layers"]):
        if not isinstance(cfg, dict):
            raise ExportFormatError(f"{path}: layer {i} is not a JSON object; the file is corrupt")
        readers.append(Reader(path, tensors, str(i), cfg))
    model = nn.Sequential(*decode_entries(readers)).eval().to(device)
    model.export_metadata = doc  # type: ignore[assignment]
    return model


def _qbn_entries(layers: list[Any]) -> list[dict[str, Any]]:
    out = []
    for cfg in layers:
        if isinstance(cfg, dict):
            if cfg.get("storage") == "qbn":
                out.append(cfg)
            for branch in (cfg.get("children") or {}).values() if isinstance(cfg.get("children"), dict) else ():
                if isinstance(branch, list):
                    out.extend(_qbn_entries(branch))
    return out


def load_qbn(path: str | os.PathLike) -> dict[str, QBNStored]:
    """The QBN layers of an export file as ``{layer name: QBNStored}`` (for
    :func:`flipnet.compress.qbn.from_stored`); the file's other layers are not decoded.

    Raises:
        ExportFormatError: not a valid export, or a QBN entry that does not match its tensors.
    """
    path = Path(path)
    doc = read_export_metadata(path)
    tensors = read_export_tensors(path)
    out: dict[str, QBNStored] = {}
    for cfg in _qbn_entries(doc["layers"]):
        r = Reader(path, tensors, repr(cfg.get("name")), cfg)
        shape = r.ints("weight_shape", 4, 1)
        try:
            k = check_k(r.get("qbn_k", int), shape[2] * shape[3])
        except ValueError as err:
            raise r.fail(str(err)) from None
        taps = shape[2] * shape[3]
        if taps > MAX_KERNEL_BITS:  # as load_exported: QBN codewords are small kernels
            raise r.fail(f"QBN kernels of {shape[2]}x{shape[3]} entries are too large (at most {MAX_KERNEL_BITS})")
        n = shape[0] * shape[1]
        idx = r.tensor("qbn_indices", torch.uint8, (packed_size(n * k, 8),))
        cb_bits = r.tensor("qbn_codebook_bits", torch.uint8, (1 << k, packed_size(taps, 8)))
        try:
            signs = unpack_bits(cb_bits, (1 << k, taps), dim=1)  # type: ignore[arg-type]
            codes = encode_kernels(signs.reshape(-1, shape[2], shape[3]))
        except (ValueError, RuntimeError) as err:
            raise r.fail(str(err)) from None
        out[r.get("name", str)] = QBNStored(k, (shape[2], shape[3]), tuple(shape), codes, idx)  # type: ignore[arg-type]
    return out
