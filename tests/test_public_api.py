"""The top-level ``flipnet`` namespace and the error hierarchy: names users and other modules rely on."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import flipnet
from flipnet import errors


def test_key_api_is_reexported_from_the_package() -> None:
    expected = {
        "binarize": "flipnet.convert",
        "summary": "flipnet.compress",
        "Bop": "flipnet.optim",
        "Bop2ndOrder": "flipnet.optim",
        "CEMA": "flipnet.optim",
        "create_optimizer": "flipnet.optim",
        "FlipRatio": "flipnet.metrics",
        "create_model": "flipnet.models",
        "list_models": "flipnet.models",
        "load_dataset": "flipnet.data",
        "Trainer": "flipnet.train",
        "load_config": "flipnet.train",
        "binary_parameters": "flipnet.layers",
    }
    assert len(flipnet.__all__) <= 27
    for name, module in expected.items():
        assert getattr(flipnet, name) is getattr(importlib.import_module(module), name), name
        assert name in flipnet.__all__ and name in dir(flipnet)
    from flipnet import Trainer, summary  # noqa: F401  (from-import goes through __getattr__ too)

    assert callable(flipnet.summary)  # the function, not the module flipnet.compress.summary
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        flipnet.not_a_name  # noqa: B018


def test_import_flipnet_stays_light() -> None:
    code = (
        "import sys, flipnet; "
        "heavy = ('flipnet.train', 'flipnet.data', 'flipnet.compress', 'flipnet.analysis', 'matplotlib', "
        "'torchvision', 'tensorboard', 'torch.utils.tensorboard', 'sklearn', 'PIL'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "name, builtin",
    [
        ("ConfigError", ValueError),
        ("DataNotFoundError", FileNotFoundError),
        ("DataFormatError", ValueError),
        ("CheckpointError", ValueError),
        ("ExportFormatError", ValueError),
        ("TrainingDiverged", ArithmeticError),
    ],
)
def test_every_user_error_lives_in_flipnet_errors(name: str, builtin: type) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.FlipnetError) and issubclass(cls, builtin)
    assert name in errors.__all__


def test_old_import_paths_of_moved_errors_still_work() -> None:
    from flipnet.data import DataFormatError as a
    from flipnet.data.base import DataFormatError as b
    from flipnet.train import TrainingDiverged as c
    from flipnet.train.loop import TrainingDiverged as d  # noqa: F401 (the loop raises it)

    assert a is b is errors.DataFormatError
    assert c is d is errors.TrainingDiverged


def test_did_you_mean() -> None:
    assert errors.did_you_mean("gama", ["gamma", "threshold"]) == "did you mean 'gamma'? "
    assert errors.did_you_mean("zzz", ["gamma", "threshold"]) == ""


#: Each subpackage's promises (``__all__``), as posted by its owner; everything else is private
#: or lives in a submodule. Changing one of these is an API change: update the docs too.
PINNED = {
    "flipnet.train": {"Config", "load_config", "list_recipes", "Trainer", "Callback", "TrainingDiverged", "load_run",
                      "load_checkpoint", "save_checkpoint", "train_seeds", "train_sweep", "read_metrics"},
    "flipnet.optim": {"FlipOptimizer", "HyperparamRange", "Bop", "Bop2ndOrder", "CEMA", "RoutedOptimizer", "OptimInfo",
                      "register_optimizer", "list_optimizers", "get_optimizer_info", "prepare_model_for", "create_optimizer"},
    "flipnet.models": {"ModelEntry", "ModelSpec", "ResNet", "SequentialModel", "UNet", "count_parameters", "create_model",
                       "float_twin", "list_models", "model_entry", "model_options", "register_model"},
    "flipnet.compress": {"summary", "export_model", "load_exported", "read_export_metadata", "PackedBinaryConv2d",
                         "PackedBinaryLinear", "ThresholdSign", "apply_qbn", "remove_qbn", "kernel_backend", "set_kernel_mode"},
    "flipnet.analysis": {"SignTracker", "analyze_run", "sign_dynamics", "read_snapshot", "list_snapshots", "kernel_codes",
                         "kernel_stats", "coverage_curve", "primary_experiment", "qbn_sweep", "scaling_study"},
    "flipnet.data": {"AugmentPolicy", "DatasetBundle", "GpuLoader", "HostLoader", "dataset_options", "dataset_shape",
                     "list_datasets", "load_dataset", "make_loader", "register_dataset", "resolve_augment", "split_validation"},
    "flipnet.layers": {"BinaryLayer", "BinaryConv1d", "BinaryConv2d", "BinaryLinear", "binary_modules", "binary_parameters",
                       "named_binary_parameters", "real_parameters", "named_real_parameters", "apply_constraints",
                       "set_weight_mode"},
    "flipnet.quantizers": {"Quantizer", "SteSign", "ApproxSign", "SwishSign", "SteHeaviside", "MagnitudeAwareSign",
                           "Identity", "QUANTIZERS", "get_quantizer", "sign", "ste_sign", "approx_sign", "swish_sign",
                           "ste_heaviside", "magnitude_aware_sign"},
}


@pytest.mark.parametrize("package", sorted(PINNED))
def test_subpackage_surfaces_are_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == PINNED[package]
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is not None, name


#: The tiers a user learns: the package, its top-level modules and its subpackages. A submodule's
#: own ``__all__`` (``flipnet.train.config``, ``flipnet.compress.export.codecs``, ...) only shapes
#: ``import *`` and its docs; it is not a promise (docs/architecture.md, "Public surface").
TIERS = ("flipnet", "flipnet.quantizers", "flipnet.layers", "flipnet.functional", "flipnet.convert", "flipnet.metrics",
         "flipnet.errors", "flipnet.utils", "flipnet.cli", "flipnet.optim", "flipnet.optim.schedules", "flipnet.models",
         "flipnet.data", "flipnet.train", "flipnet.analysis", "flipnet.compress")


def test_the_public_surface_stays_small() -> None:
    names = {name for tier in TIERS for name in importlib.import_module(tier).__all__}
    assert len(names) <= 160, f"{len(names)} public names; issue #9 caps the tiered surface at about 160"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["recipes"]])
def test_cli_starts_without_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from flipnet.cli import main\n"
        "try:\n"
        f"    status = main({argv!r})\n"
        "except SystemExit as e:\n"
        "    status = e.code\n"
        "heavy = [m for m in ('torch', 'numpy', 'yaml', 'flipnet.train.loop') if m in sys.modules]\n"
        "print('HEAVY', ','.join(heavy), status, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY"), out.stderr
    heavy = last.split()[1] if len(last.split()) == 3 else ""
    assert "torch" not in heavy and "flipnet.train.loop" not in heavy, last
    assert last.endswith(" 0") or last.endswith(" None"), last
    if argv == ["--version"]:
        assert out.stdout.strip() == f"flipnet {flipnet.__version__}"


def test_no_import_cycles_inside_train() -> None:
    """Every import between train/ modules (module level and inside functions) points one way, and
    train never imports analysis (the layer above it)."""
    import ast
    from pathlib import Path

    root = Path(flipnet.__file__).parent / "train"
    edges: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        name = path.stem
        edges[name] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never executed
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges[name].add(node.module.split(".")[0])
                else:
                    edges[name].update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flipnet.train."):
                edges[name].add(node.module.split(".")[2])
    edges.pop("__init__", None)

    def reach(start: str, seen: set[str]) -> set[str]:
        for nxt in edges.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = [m for m in edges if m in reach(m, set())]
    assert not cycles, {m: sorted(edges[m]) for m in cycles}
    assert not any("analysis" in str(e) for e in edges.values())


def _package_import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` over every file of flipnet (module level and inside
    functions; ``if TYPE_CHECKING`` blocks left out). ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at the package ``pkg`` (its ``__init__``)."""
    import ast
    from pathlib import Path

    src = Path(flipnet.__file__).parent.parent
    files: dict[str, tuple[Path, bool]] = {}
    for path in (src / "flipnet").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if package else parts)] = (path, package)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for mod, (path, package) in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        here = mod if package else mod.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            else:
                continue
            out.update(t for t in (known(x) for x in targets if x.startswith("flipnet")) if t and t != mod)
        edges[mod] = out
    return edges


def test_no_import_cycle_anywhere_in_the_package() -> None:
    """Issue #9: no cycle between flipnet's files, also through imports inside functions."""
    edges = _package_import_graph()
    assert "flipnet.train.loop" in edges and "flipnet.train.build" in edges["flipnet.train.loop"]

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in edges if m in reach(m))
    assert not cycles, {m: sorted(e for e in edges[m] if m in reach(e)) for m in cycles}


def test_the_core_never_imports_the_layers_above_it() -> None:
    edges = _package_import_graph()
    core = ("flipnet.quantizers", "flipnet.layers", "flipnet.functional", "flipnet.optim", "flipnet.models", "flipnet.data")
    above = ("flipnet.train", "flipnet.analysis", "flipnet.compress", "flipnet.cli")
    bad = {m: sorted(e for e in deps if e.startswith(above)) for m, deps in edges.items()
           if m.startswith(core) and any(e.startswith(above) for e in deps)}
    assert not bad, bad
    compress_up = {m: sorted(e for e in deps if e.startswith(("flipnet.train", "flipnet.analysis")))
                   for m, deps in edges.items() if m.startswith("flipnet.compress")}
    assert not any(compress_up.values()), compress_up
