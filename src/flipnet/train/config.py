"""Recipes: YAML files validated into dataclasses, with ``key.sub=value`` overrides.

A recipe is a YAML mapping whose keys are the fields of :class:`Config` (see ``docs/recipes.md``
for every key). :func:`load_config` reads one by name (a file shipped in ``flipnet/recipes``) or by
path, applies command-line overrides and validates the result:

* an unknown or misspelt key raises :class:`~flipnet.errors.ConfigError` naming the closest valid
  key and listing all valid keys at that level;
* a value of the wrong type raises :class:`~flipnet.errors.ConfigError` naming the key, the
  expected type and the value found.

Files are data: they are read with :func:`yaml.safe_load` and nothing in them is evaluated.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from flipnet.errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "OutputConfig",
    "DEFAULT_RECIPE",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "dump_config",
    "list_recipes",
    "recipe_path",
]

#: Recipe used by ``flipnet train`` when none is given.
DEFAULT_RECIPE = "digits_bop"

_AutoBool = Union[bool, Literal["auto"]]


@dataclass
class DataConfig:
    """``data:`` what to train on and how to batch it."""

    #: registered data set name (``flipnet.data.list_datasets()``).
    name: str = "digits"
    #: data root folder; ``null`` uses ``$FLIPNET_DATA`` or ``./data``.
    root: str | None = None
    #: training batch size (per process under DDP).
    batch_size: int = 64
    #: evaluation batch size.
    eval_batch_size: int = 1000
    #: random augmentation of training batches (the data set's default augmentation).
    augment: bool = False
    #: keep only the first N training examples.
    subset: int | None = None
    #: keep only the first N test examples.
    test_subset: int | None = None
    #: extra keyword options for ``flipnet.data.load_dataset``.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """``model:`` which model to build."""

    #: registered model name (``flipnet.models.list_models()``).
    name: str = "binary_mlp"
    #: keyword arguments for ``flipnet.models.create_model`` (``mode``, ``scale``, ``dropout``, ...).
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: run folder or checkpoint file whose model weights initialise this run (weights only).
    init_from: str | None = None


@dataclass
class ScheduleConfig:
    """One entry of ``optim.schedules``: a schedule for one hyper-parameter of one route.

    Every key other than ``key``, ``route``, ``unit`` and ``type`` (e.g. ``factor``, ``every``,
    ``final``, ``duration``) is passed to ``flipnet.optim.schedules.schedule_from_dict``.
    """

    #: param-group key to schedule (``lr``, ``gamma``, ``threshold``, ...).
    key: str = "lr"
    #: schedule type (``constant``, ``step``, ``linear``, ``cosine``, ``exponential``).
    type: str = "constant"
    #: ``binary``, ``real`` or ``null`` (every group that has the key).
    route: Literal["binary", "real"] | None = None
    #: advance the schedule every ``step`` or every ``epoch``.
    unit: Literal["step", "epoch"] = "step"
    #: schedule-specific parameters (the remaining keys of the YAML entry).
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """``optim:`` the routing optimizer (``flipnet.optim.create_optimizer``) and its schedules."""

    #: optimizer of the binary weights: bop, bop2ndorder, cema, adam, adamw, sgd or none (frozen).
    binary: str = "bop"
    #: keyword arguments of the binary optimizer (Bop: ``gamma``, ``threshold``).
    binary_kwargs: dict[str, Any] = field(default_factory=dict)
    #: optimizer of every other parameter: adam, adamw, sgd or none (frozen).
    real: str = "adam"
    #: keyword arguments of the real optimizer (``lr``, ``weight_decay``, ...).
    real_kwargs: dict[str, Any] = field(default_factory=dict)
    #: clip latent binary weights to [-c, c] after each step (latent optimizers only).
    weight_clip: float | None = None
    #: hyper-parameter schedules.
    schedules: list[ScheduleConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    """``train:`` the training loop."""

    #: number of epochs.
    epochs: int = 10
    #: bf16 autocast: ``auto`` (on for CUDA only), ``true`` or ``false``.
    amp: _AutoBool = "auto"
    #: ``torch.compile`` the training step: ``auto`` (CUDA only), ``true`` or ``false``.
    compile: _AutoBool = False
    #: channels-last memory format for 4-D inputs: ``auto`` (CUDA only), ``true`` or ``false``.
    channels_last: _AutoBool = "auto"
    #: capture the training step in a CUDA graph (CUDA only).
    cuda_graphs: bool = False
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: clip the gradient norm of real parameters to this value.
    grad_clip: float | None = None
    #: evaluate on the test set every N epochs (and always after the last epoch).
    eval_every: int = 1
    #: check the running loss for NaN/inf every N steps (0: once per epoch). Each check is one
    #: host synchronisation.
    nan_check_every: int = 100
    #: record sign snapshots with ``flipnet.analysis.flips.SignTracker``.
    track_signs: bool = False
    #: progress bar: ``auto`` (on a terminal), ``true`` or ``false`` (one line per epoch).
    progress: _AutoBool = "auto"
    #: TensorBoard event files in RUN/tensorboard: ``auto`` (when installed), ``true``, ``false``.
    tensorboard: _AutoBool = "auto"
    #: draw loss/accuracy/flip-ratio plots into RUN/plots at the end of the run.
    plots: bool = True


@dataclass
class OutputConfig:
    """``output:`` where the run folder goes."""

    #: parent folder of run folders.
    dir: str = "runs"
    #: run folder name; ``null``: ``<recipe name>-<YYYYmmdd-HHMMSS>``.
    name: str | None = None


@dataclass
class Config:
    """A whole recipe. Build it with :func:`load_config` or :func:`config_from_dict`."""

    #: run name prefix.
    name: str = "run"
    #: one line shown by ``flipnet recipes``.
    description: str = ""
    #: random seed (model init, data order, augmentation).
    seed: int = 0
    #: several seeds trained one after the other (``flipnet.train.multi``); overrides ``seed``.
    seeds: list[int] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------
# validation

_SCHEDULE_FIXED = ("key", "type", "route", "unit")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if tp is Any:
        return "anything"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _fix_numbers(value: Any) -> Any:
    """Read YAML 1.1 strings such as ``1e-3`` (no dot, so not a float in YAML 1.1) as floats."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _fix_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_numbers(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        # Try exact kinds first so that e.g. True stays a bool in bool|Literal['auto'].
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise _Mismatch
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if dataclasses.is_dataclass(arg):
            return [_build(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, arg, where))
            except _Mismatch:
                raise ConfigError(
                    f"{where}[{i}] must be {_type_name(arg)}, got {v!r}; fix the recipe or the override"
                ) from None
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {k: _fix_numbers(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug in this module, not input


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _suggest_full(where: str, name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"did you mean {_join(where, close[0])!r}? " if close else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``raw`` (``where`` names it in errors)."""
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        raw = config_to_dict(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the recipe'} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    raw = dict(raw)
    if cls is ScheduleConfig:
        # Flat YAML: every key but the fixed ones is a schedule parameter.
        params = dict(raw.pop("params", None) or {})
        for k in list(raw):
            if k not in _SCHEDULE_FIXED:
                params[k] = raw.pop(k)
        raw["params"] = params
        if "key" not in raw or "type" not in raw:
            raise ConfigError(
                f"{where} needs at least 'key' (the hyper-parameter, e.g. gamma) and 'type' "
                "(constant, step, linear, cosine, exponential)"
            )
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            full = _join(where, str(key))
            raise ConfigError(
                f"unknown key {full!r}; {_suggest_full(where, str(key), names)}"
                f"valid keys{' in ' + where if where else ''}: {', '.join(names)}"
            )
        full = _join(where, key)
        try:
            kwargs[key] = _coerce(value, hints[key], full)
        except _Mismatch:
            raise ConfigError(
                f"{full} must be {_type_name(hints[key])}, got {value!r}; fix the recipe or the override"
            ) from None
    obj = cls(**kwargs)
    _check_values(obj, where)
    return obj


def _positive(obj: Any, where: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            need = "0 or more" if allow_zero else "positive"
            raise ConfigError(f"{_join(where, name)} must be {need}, got {v!r}")


def _check_values(obj: Any, where: str) -> None:
    if isinstance(obj, DataConfig):
        _positive(obj, where, "batch_size", "eval_batch_size", "subset", "test_subset")
    elif isinstance(obj, TrainConfig):
        _positive(obj, where, "epochs", "eval_every", "grad_clip")
        _positive(obj, where, "nan_check_every", allow_zero=True)
        dev = obj.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"{_join(where, 'device')} must be auto, cpu, cuda or cuda:N, got {dev!r}")
    elif isinstance(obj, OptimConfig):
        _positive(obj, where, "weight_clip")
        obj.binary = obj.binary.strip().lower()
        obj.real = obj.real.strip().lower()
    elif isinstance(obj, Config):
        if obj.seeds is not None and len(obj.seeds) == 0:
            raise ConfigError("seeds must be a non-empty list of integers or null")


# ---------------------------------------------------------------------------------------------
# dict round trip


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`Config`.

    Raises:
        ConfigError: unknown key (with the closest valid name), wrong type or bad value.
    """
    return _build(Config, raw, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config (schedules flattened as in YAML); safe for ``yaml.safe_dump``."""
    if isinstance(config, ScheduleConfig):
        d: dict[str, Any] = {"key": config.key, "type": config.type, "route": config.route, "unit": config.unit}
        d.update(config.params)
        return d
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (every default filled in)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# overrides


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _field_type(path: list[str]) -> Any:
    """The annotation of the field at ``path`` (``None`` where it is not a dataclass field)."""
    cls: Any = Config
    tp: Any = None
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        tp = hints[part]
        cls = tp
    return tp


def _wants_list(tp: Any) -> bool:
    if tp is None:
        return False
    if typing.get_origin(tp) is list:
        return True
    return any(typing.get_origin(a) is list for a in typing.get_args(tp))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw recipe mapping (returns a new mapping).

    Values are parsed with :func:`yaml.safe_load` (``1e-3``, ``true``, ``[0, 1]``, ``null``); for a
    list-valued key a comma-separated value (``seeds=0,1,2``) is a list too. Keys are checked when
    the result is validated by :func:`config_from_dict`.
    """
    import copy

    out = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key.sub=value (e.g. optim.binary_kwargs.gamma=1e-3)"
            )
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part; write e.g. train.epochs=5")
        value = _parse_value(text)
        tp = _field_type(parts)
        if _wants_list(tp) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [_parse_value(v) for v in str(text).split(",") if v.strip()]
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {item!r}: {where} is not a mapping, so it has no key {parts[i + 1]!r}")
            node = child
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# recipes


def _recipes_dir() -> Path:
    return Path(str(resources.files("flipnet") / "recipes"))


def list_recipes() -> dict[str, str]:
    """Recipe names shipped with flipnet (sorted) mapped to their one-line description."""
    out: dict[str, str] = {}
    for path in sorted(_recipes_dir().glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
        out[path.stem] = str(raw.get("description", "")) if isinstance(raw, dict) else ""
    return out


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a recipe name (shipped with flipnet) or a path to a YAML file.

    Raises:
        ConfigError: neither a file nor a known recipe name (the message lists the names).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{text} is a folder; give a recipe name or a .yaml file (or use --resume for a run folder)")
    stem = text[:-5] if text.endswith(".yaml") else text
    shipped = _recipes_dir() / f"{stem}.yaml"
    if "/" not in stem and os.sep not in stem and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in _recipes_dir().glob("*.yaml"))
    raise ConfigError(
        f"no recipe file or shipped recipe named {text!r}; {_suggest(stem, names)}"
        f"shipped recipes: {', '.join(names)} (see `flipnet recipes`)"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of recipe keys (name, data, model, optim, train, ...)")
    return raw


def load_config(
    recipe: str | os.PathLike | dict[str, Any] | Config | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Load and validate a recipe.

    Args:
        recipe: a shipped recipe name (``"digits_bop"``), a path to a YAML file, a raw mapping,
            a :class:`Config`, or ``None`` for :data:`DEFAULT_RECIPE`.
        overrides: ``key.sub=value`` strings applied on top (see :func:`apply_overrides`).

    Raises:
        ConfigError: unknown recipe, invalid YAML, unknown key, wrong type or bad value.
    """
    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, Config):
        raw = config_to_dict(recipe)
    elif isinstance(recipe, dict):
        raw = recipe
    else:
        raw = _read_yaml(recipe_path(recipe))
    return config_from_dict(apply_overrides(raw, list(overrides)))
