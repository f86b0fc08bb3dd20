"""``flipnet export`` and ``flipnet summary`` (module level: standard library and flipnet.errors only).

``flipnet export RUN [--out FILE] [--checkpoint best|last] [--force]``
    Write the trained model of a run folder (or checkpoint file) as one ``flipnet-export``
    safetensors file (bit-packed binary weights, BatchNorm folded into thresholds), then load it
    back and check that its logits match the trained model's on random inputs. An existing file
    is never replaced unless ``--force`` is given, and a checkpoint never (``--out`` with a ``.pt`` or
    ``.pth`` suffix is refused).

``flipnet summary RECIPE_OR_RUN [--input-size N C H W] [--num-classes K]``
    Print the layer table of :func:`flipnet.compress.summary` for a run folder's model or for the
    model a recipe trains (no data is loaded: the data set's declared image shape and class count,
    see :func:`flipnet.train.recipe_model`; ``--input-size``/``--num-classes`` override them; the
    model's defaults when the data set does not declare its shape).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from flipnet.errors import ConfigError

__all__ = ["register", "cmd_export", "cmd_summary"]

_RUN_SUFFIXES = (".pt", ".pth")
_RECIPE_SUFFIXES = (".yaml", ".yml")


def register(subparsers: Any) -> None:
    """Add ``export`` and ``summary`` to the ``flipnet`` parser's ``subparsers``."""
    p = subparsers.add_parser(
        "export",
        help="export a trained run as one bit-packed safetensors file",
        description=(
            "Export the model of a run folder (or checkpoint file) as a flipnet-export safetensors file: "
            "binary weights packed 8 per byte, BatchNorm folded into integer thresholds, residual blocks "
            "kept as such. Load it with flipnet.compress.load_exported(path)."
        ),
    )
    p.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    p.add_argument("--out", metavar="FILE", help="output file (default: RUN/export.safetensors)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an existing output file (never a checkpoint)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the file back and comparing logits")
    p.add_argument("--format", choices=("safetensors", "onnx", "qonnx"), default="safetensors",
                   help="safetensors (default: flipnet's packed format), onnx (runs in ONNX Runtime; default file "
                        "RUN/export.onnx) or qonnx (FINN's dialect; RUN/export.qonnx.onnx); see docs/deployment.md")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "summary",
        help="print a model's layer table (parameters, bits, MACs, memory)",
        description="Print the summary table of a run folder's model or of the model a recipe builds.",
    )
    p.add_argument("target", metavar="RECIPE_OR_RUN", help="run folder, checkpoint file, recipe name or recipe YAML")
    p.add_argument("--input-size", type=int, nargs="+", metavar="D",
                   help="input batch shape, e.g. 1 3 32 32 (default: 1 and the model's input shape)")
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="classes of a recipe's model (default: the model's default); ignored for runs")
    p.set_defaults(func=cmd_summary)


def _default_out(run: Path) -> Path:
    return run / "export.safetensors" if run.is_dir() else run.with_suffix(".safetensors")


def _check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse to write over a checkpoint (the one exported, or any ``.pt``/``.pth`` file), over a
    folder, or (without ``--force``) over any existing file."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {out / 'export.safetensors'}")
    resolved = out.resolve()
    if resolved == source.resolve() or out.suffix.lower() in _RUN_SUFFIXES:  # .PT is a checkpoint too (and the same file where names ignore case)
        raise ConfigError(f"--out {out} would replace a checkpoint (the run's resumable state); "
                          "write the export elsewhere, e.g. RUN/export.safetensors")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another --out")


def cmd_export(ns: argparse.Namespace) -> int:
    """``flipnet export``: run folder → safetensors export (verified by reloading)."""
    import torch

    from flipnet.compress.export import export_model, load_exported
    from flipnet.train.build import load_run
    from flipnet.train.checkpoint import resolve_checkpoint

    run = Path(ns.run)
    source = resolve_checkpoint(run, ns.checkpoint)
    if ns.format != "safetensors":
        from flipnet.compress.onnx import default_onnx_path
    out = Path(ns.out) if ns.out else (_default_out(run) if ns.format == "safetensors" else default_onnx_path(run, ns.format))
    _check_out(out, source, ns.force)
    config, model = load_run(run, ns.checkpoint, map_location="cpu")
    model.eval()
    input_shape = getattr(model, "input_shape", None)
    meta = {
        "model": {"name": config.model.name, "kwargs": dict(config.model.kwargs)},
        "run": str(run),
        "checkpoint": ns.checkpoint,
        "recipe": getattr(config, "name", None),
    }
    if input_shape is not None:
        meta["input_shape"] = [int(s) for s in input_shape]
    if ns.format != "safetensors":
        from flipnet.compress.onnx import export_run_onnx

        return export_run_onnx(model, run, out, ns.format, metadata=meta, verify=not ns.no_verify)
    try:
        doc = export_model(model, out, metadata=meta)
    except ValueError as err:
        raise ConfigError(f"cannot export {run}: {err}") from None
    except OSError as err:  # an unwritable or missing location
        raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
    float_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * 4 for n, b in model.named_buffers() if "running" in n
    )
    size = out.stat().st_size
    print(f"wrote {out}: {size:,} bytes (float32 weights {float_bytes:,} bytes, {float_bytes / max(size, 1):.1f}x smaller); "
          f"{len(doc['folds'])} BatchNorm layers folded into thresholds")
    if not ns.no_verify and input_shape is not None:
        g = torch.Generator().manual_seed(0)
        x = torch.rand((8, *input_shape), generator=g) * 2 - 1
        with torch.no_grad():
            ref = model(x)
            got = load_exported(out)(x)
        diff = (ref - got).abs().max().item()
        same = bool((ref.argmax(1) == got.argmax(1)).all())
        print(f"verified on 8 random inputs: max |logit difference| {diff:.3g}, same predictions: {same}")
        if not same or diff > 1e-3:
            print("warning: the exported model does not reproduce the trained model; please report this")
            return 1
    return 0


def _model_for_summary(target: str, num_classes: int | None, input_size: Sequence[int] | None) -> Any:
    path = Path(target)
    if path.is_dir() or (path.is_file() and path.suffix in _RUN_SUFFIXES):
        from flipnet.train.build import load_run

        return load_run(path, "best", map_location="cpu")[1]
    if path.is_file() and path.suffix not in _RECIPE_SUFFIXES:
        if path.suffix == ".safetensors":
            from flipnet.compress.export import read_export_metadata

            doc = read_export_metadata(path)  # a clear error for a broken or foreign file
            run = (doc.get("extra") or {}).get("run")
            hint = f" (it was exported from {run})" if isinstance(run, str) else ""
            raise ConfigError(f"{path} is a flipnet export, which holds the packed inference graph, not the trained "
                              f"model; run `flipnet summary` on the run folder or its checkpoint{hint}")
        raise ConfigError(f"{path} is neither a run folder, a checkpoint (.pt) nor a recipe (.yaml)")
    from flipnet.data import dataset_shape
    from flipnet.models import create_model, model_options
    from flipnet.train.build import build_model, recipe_model
    from flipnet.train.config import load_config

    config = load_config(target)
    shape = dataset_shape(config.data.name, **config.data.options)
    if shape is not None:
        # The model the recipe trains: the data set's image shape and class count, unless overridden.
        if num_classes is None and input_size is None:
            return recipe_model(config)
        (c, h, w), classes = shape
        if num_classes is not None:
            classes = num_classes
        if input_size is not None:
            c = int(input_size[1])
            if len(input_size) == 4:
                h, w = int(input_size[2]), int(input_size[3])
        return build_model(config, classes, (c, h, w))
    kwargs = dict(config.model.kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_size is not None:
        kwargs.setdefault("in_channels", int(input_size[1]))
        if "input_size" in model_options(config.model.name) and len(input_size) == 4 and "input_size" not in kwargs:
            h, w = int(input_size[2]), int(input_size[3])
            kwargs["input_size"] = h if h == w else [h, w]
    return create_model(config.model.name, **kwargs)


def cmd_summary(ns: argparse.Namespace) -> int:
    """``flipnet summary``: print the layer table."""
    from flipnet.compress import summary

    size = ns.input_size
    if size is not None:
        if any(d <= 0 for d in size):
            raise ConfigError(f"--input-size must be positive ints, got {size}")
        if len(size) < 2:
            raise ConfigError(f"--input-size needs at least a batch and a channel size, got {list(size)}")
    try:
        model = _model_for_summary(ns.target, ns.num_classes, size)
    except (RuntimeError, MemoryError) as err:  # e.g. --input-size so large that the layers cannot be allocated
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot build the model of {ns.target}"
                          + (f" for --input-size {' '.join(map(str, size))}" if size is not None else "")
                          + f": {first}") from None
    model.eval()
    if size is None:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise ConfigError("this model does not record its input shape; pass --input-size, e.g. --input-size 1 3 32 32")
        size = [1, *shape]
    try:
        s = summary(model, input_size=tuple(int(d) for d in size))
    except (ValueError, RuntimeError) as err:  # a shape the model cannot take
        expected = getattr(model, "input_shape", None)
        hint = f" (this model takes 1 {' '.join(map(str, expected))})" if expected is not None else ""
        raise ConfigError(f"--input-size {' '.join(map(str, size))} does not fit the model{hint}: "
                          f"{str(err).splitlines()[0]}") from None
    print(s.table())
    return 0
