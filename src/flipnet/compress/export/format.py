"""The ``flipnet-export`` file: schema, version, tensor naming, reading and writing.

One `safetensors <https://huggingface.co/docs/safetensors>`_ file whose ``__metadata__`` holds
``format = "flipnet-export"`` and ``flipnet``, a JSON document (``{"format", "version", "model",
"input_shape", "layers", "folds", "extra"}``). ``layers`` is the inference graph as a list of
entries ``{"type", "name", <config>, "tensors": {role: tensor name}}``; a structural entry (a
residual block, a concatenation) also has ``"children": {branch: [entries]}``. The full specification is in
``docs/deployment.md``; this module only implements it.

Tensor names are the entry's index path plus its role: ``"3.weight_bits"`` for role
``weight_bits`` of top-level entry 3, ``"5.body.0.weight_bits"`` inside branch ``body`` of entry 5.

Reading goes through safetensors' own API (``safe_open(...).metadata()`` for the header,
``get_tensor`` for the data): it parses JSON and copies bytes, it never runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ...errors import ExportFormatError
from ...utils import atomic_path

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "Entry",
    "Reader",
    "read_export_metadata",
    "read_export_tensors",
    "write_export",
]

EXPORT_FORMAT = "flipnet-export"
#: Newest version this flipnet reads and writes. Version 1: a flat list of the entry types in
#: :data:`V1_TYPES`. Version 2 adds structural entries with ``children`` (``residual``,
#: ``concat``), ``pad_shortcut``, ``bias_add`` and ``prelu``. Files are written with the lowest version that describes them, so flat models
#: stay version 1 (and readable by older flipnet).
EXPORT_VERSION = 2
V1_TYPES = frozenset({"binary_conv", "binary_linear", "real_conv", "real_linear", "batchnorm", "threshold",
                      "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "flatten", "activation"})


class Entry(dict):  # type: ignore[type-arg]
    """One entry of the inference graph: its JSON config, plus ``tensors`` (role → tensor) and
    ``children`` (branch → entries) kept apart until the file is written."""

    def __init__(self, type_: str, name: str, **cfg: Any) -> None:
        super().__init__(type=type_, name=name, **cfg)
        self.tensors: dict[str, Tensor] = {}
        self.children: dict[str, list[Entry]] = {}


def walk(entries: list[Entry]) -> Iterator[list[Entry]]:
    """Every entry list of the graph: ``entries`` itself and each branch of each structural entry."""
    yield entries
    for e in entries:
        for branch in e.children.values():
            yield from walk(branch)


def _serialise(entries: list[Entry], prefix: str, tensors: dict[str, Tensor]) -> list[dict[str, Any]]:
    out = []
    for i, e in enumerate(entries):
        path = f"{prefix}{i}"
        cfg: dict[str, Any] = dict(e)
        names = {}
        for role, t in e.tensors.items():
            tname = f"{path}.{role}"
            t = t.detach().cpu().contiguous()
            if any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in tensors.values()):
                t = t.clone()  # an entry written twice (a branch of a concat): safetensors stores each tensor once
            tensors[tname] = t
            names[role] = tname
        cfg["tensors"] = names
        if e.children:
            cfg["children"] = {key: _serialise(branch, f"{path}.{key}.", tensors) for key, branch in e.children.items()}
        out.append(cfg)
    return out


def _jsonable(v: Any, where: str) -> Any:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} must be JSON-serialisable: {err}") from None
    return v


def write_export(path: str | os.PathLike, entries: list[Entry], folds: list[dict[str, Any]], *,
                 model: Mapping[str, Any] | None, input_shape: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write the graph ``entries`` as one safetensors file (atomically); returns the JSON document."""
    tensors: dict[str, Tensor] = {}
    layers = _serialise(entries, "", tensors)
    v1 = all(e["type"] in V1_TYPES and not e.children for branch in walk(entries) for e in branch)
    doc = {
        "format": EXPORT_FORMAT,
        "version": 1 if v1 else 2,
        "model": None if model is None else {"name": model["name"], "kwargs": dict(model.get("kwargs") or {})},
        "input_shape": None if input_shape is None else [int(s) for s in input_shape],
        "layers": layers,
        "folds": folds,
        "extra": dict(extra),
    }
    text = json.dumps(_jsonable(doc, "export metadata"), allow_nan=False, sort_keys=True)
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT, "flipnet": text})
    return doc


# ----------------------------------------------------------------------------------- reading
def _open_error(path: Path, err: Exception) -> ExportFormatError:
    """One sentence for safetensors' own error about a file that is not valid safetensors."""
    msg = str(err)
    if "too small" in msg:
        return ExportFormatError(f"{path} is not a flipnet export: it is too short for a safetensors header")
    if "invalid JSON" in msg:
        return ExportFormatError(f"{path} is not a valid flipnet export: its safetensors header is not JSON")
    return ExportFormatError(f"{path} is not a valid flipnet export: the file is truncated or malformed ({msg})")


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ExportFormatError(f"{path} is a folder, not an export file")
    if not path.is_file():
        raise ExportFormatError(f"no export file at {path}; create one with `flipnet export RUN --out FILE`")


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata document of an export (only the header is read), checked for format and version.

    Raises:
        ExportFormatError: missing file, not safetensors, not a flipnet export, or an
            unsupported version.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except (SafetensorError, OSError, ValueError) as err:
        raise _open_error(path, err) from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or "flipnet" not in meta:
        raise ExportFormatError(f"{path} is a safetensors file but not a flipnet export (no '{EXPORT_FORMAT}' metadata)")
    try:
        doc = json.loads(meta["flipnet"])
    except (TypeError, json.JSONDecodeError, RecursionError):
        raise ExportFormatError(f"{path}: the flipnet metadata is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ExportFormatError(f"{path}: the flipnet metadata does not describe a {EXPORT_FORMAT} file")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > EXPORT_VERSION:
        raise ExportFormatError(
            f"{path} has export format version {version!r}; this flipnet reads versions 1..{EXPORT_VERSION} "
            "(upgrade flipnet to read newer files)"
        )
    if not isinstance(doc.get("layers"), list):
        raise ExportFormatError(f"{path}: the flipnet metadata has no layer list")
    return doc


def read_export_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of the file, by name (safetensors' ``get_tensor``; no code runs)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
        raise _open_error(path, err) from None


class Reader:
    """Checked access to one entry's config and tensors while a file is read."""

    def __init__(self, path: Path, tensors: Mapping[str, Tensor], where: str, cfg: Mapping[str, Any]) -> None:
        self.path, self.tensors, self.cfg = path, tensors, cfg
        self.where = f"{path}: layer {where} ({cfg.get('type')!r}, {cfg.get('name')!r})"
        self._index = where

    def fail(self, msg: str) -> ExportFormatError:
        return ExportFormatError(f"{self.where}: {msg}; the file is corrupt or was edited, export it again")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.cfg:
            if default is ...:
                raise self.fail(f"missing field {key!r}")
            return default
        v = self.cfg[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(v, kind) or (isinstance(v, bool) and bool not in kinds):
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
        name = names[role]
        t = self.tensors.get(name) if isinstance(name, str) else None
        if t is None:
            raise self.fail(f"tensor {name!r} is not in the file")
        if t.dtype != dtype:
            raise self.fail(f"tensor {role!r} has dtype {t.dtype}, expected {dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.fail(f"tensor {role!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def branch(self, key: str) -> list["Reader"]:
        """Readers for the entries of branch ``key`` of a structural entry."""
        children = self.cfg.get("children")
        if not isinstance(children, dict) or not isinstance(children.get(key), list):
            raise self.fail(f"missing branch {key!r}")
        out = []
        for i, cfg in enumerate(children[key]):
            if not isinstance(cfg, dict):
                raise self.fail(f"entry {i} of branch {key!r} is not a JSON object")
            out.append(Reader(self.path, self.tensors, f"{self._index}.{key}.{i}", cfg))
        return out
