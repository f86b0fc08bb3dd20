"""Recipes: YAML files validated into dataclasses, with ``key.sub=value`` overrides.

A recipe is a YAML mapping whose keys are the fields of :class:`Config` (see ``docs/recipes.md``
for every key). :func:`load_config` reads one by name (a file shipped in ``flipnet/recipes``) or by
path, applies command-line overrides and validates the result:

* an unknown or misspelt key raises :class:`~flipnet.errors.ConfigError` naming the closest valid
  key and listing all valid keys at that level;
* a value of the wrong type raises :class:`~flipnet.errors.ConfigError` naming the key, the
  expected type and the value found.

Files are data: they are read with a size-limited :class:`yaml.SafeLoader` and nothing in them
is evaluated. A recipe file larger than :data:`MAX_RECIPE_BYTES`, a document that expands (through
anchors and aliases) to more than :data:`MAX_YAML_NODES` values, a recursive alias, a scalar longer
than :data:`MAX_SCALAR_CHARS` characters or an integer with more than 30 digits is refused with a
:class:`~flipnet.errors.ConfigError` before anything is built (the "billion laughs" file of issue
#10 is 800 bytes and used to allocate 1.7 GB). NaN and infinity are refused for every number.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
    "DistillConfig",
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
    "trajectory_changes",
    "TRAJECTORY_NEUTRAL_KEYS",
    "PRECISIONS",
    "MAX_RECIPE_BYTES",
    "MAX_YAML_NODES",
    "MAX_SCALAR_CHARS",
]

#: Recipe used by ``flipnet train`` when none is given.
DEFAULT_RECIPE = "digits_bop"

_AutoBool = Union[bool, Literal["auto"]]
_Precision = Literal["fp32", "tf32", "bf16", "int8", "auto"]
#: Values of ``train.precision`` (resolved per device by ``flipnet.train.fast.select_precision``).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "int8", "auto")

#: Largest recipe file read (bytes).
MAX_RECIPE_BYTES = 1 << 20
#: Largest number of values a YAML document may expand to (aliases counted at every use).
MAX_YAML_NODES = 100_000
#: Longest scalar (string) in a recipe, in characters.
MAX_SCALAR_CHARS = 100_000
_MAX_INT_DIGITS = 30


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
    #: random augmentation of training batches: ``false``; ``true`` (the data set's default
    #: augmentation, e.g. CIFAR-10: crop + horizontal flip, SVHN: crop only); or a list of
    #: ``crop``/``flip``. Each data set declares what makes sense; others are refused
    #: (``docs/data.md``).
    augment: Union[bool, list[Literal["crop", "flip"]]] = False
    #: keep only the first N training examples.
    subset: int | None = None
    #: keep only the first N test examples.
    test_subset: int | None = None
    #: validation split held out of the training set (after ``subset``): a count, a fraction in
    #: (0, 1), ``0``/``null`` for none, or ``auto`` (the data set's default: 10% for CIFAR-10,
    #: SVHN and digits, none for the others). Seeded, stratified, the same for every ``seed``.
    val_size: Union[int, float, Literal["auto"], None] = "auto"
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
    #: weight initialisation scheme applied after building (``flipnet.models._init``):
    #: ``null`` keeps PyTorch's defaults; ``glorot_uniform`` is Keras' default (for recipes
    #: that reproduce Keras code).
    init: str | None = None


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


#: Values of ``train.distill.kind``.
DISTILL_KINDS: tuple[str, ...] = ("cross_entropy", "kl")


@dataclass
class DistillConfig:
    """``train.distill:`` knowledge distillation from a real-valued teacher (``flipnet.train.distill``)."""

    #: teacher model: a flipnet registry name or ``torchvision:<name>``; ``null``: no distillation.
    teacher: str | None = None
    #: keyword arguments of the teacher's builder (``num_classes``/``in_channels`` come from the data).
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    #: the teacher's weights: a run folder, a flipnet checkpoint, a .pth/.pt or .safetensors file.
    checkpoint: str | None = None
    #: w in w * distillation loss + (1 - w) * label cross-entropy; 1 = distillation only (ReActNet).
    weight: float = 1.0
    #: softmax temperature T (the loss is scaled by T^2).
    temperature: float = 1.0
    #: ``cross_entropy`` (ReActNet's value) or ``kl`` (minus the teacher's entropy; same gradient).
    kind: str = "cross_entropy"

    @property
    def enabled(self) -> bool:
        """True when a teacher is set."""
        return self.teacher is not None

    def validate(self) -> None:
        """Raise :class:`~flipnet.errors.ConfigError` for an invalid combination (no teacher: valid)."""
        if self.teacher is None:
            return
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ConfigError(f"train.distill.teacher must be a model name, got {self.teacher!r}")
        if self.checkpoint is None:
            raise ConfigError(
                "train.distill.checkpoint is required: flipnet cannot download teacher weights; give the path "
                "of a trained teacher (see docs/models.md, 'Distillation')"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"train.distill.weight must be in [0, 1], got {self.weight!r}")
        if self.kind not in DISTILL_KINDS:
            raise ConfigError(f"train.distill.kind must be one of {', '.join(DISTILL_KINDS)}, got {self.kind!r}")
        if not (isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
                and self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"train.distill.temperature must be a positive number, got {self.temperature!r}")


@dataclass
class TrainConfig:
    """``train:`` the training loop."""

    #: number of epochs.
    epochs: int = 10
    #: arithmetic of the forward/backward pass: ``fp32`` (default: what the papers ran; no
    #: TF32), ``tf32`` (fp32 with TF32 tensor-core matmuls/convolutions on CUDA: exact for
    #: binary-by-binary products, rounds real inputs to 10 mantissa bits), ``bf16`` (bf16
    #: autocast: a bf16 output rounds binary-by-binary sums above 256), ``int8`` (CPU: exact
    #: int8 GEMMs for binary-by-binary forward products, bf16 elsewhere), or ``auto`` (the
    #: fastest the device offers: bf16 on CUDA; int8, bf16 or fp32 on a CPU by its features;
    #: see docs/performance.md). The old key ``amp`` (true/false/auto) is read as bf16/fp32/auto.
    precision: _Precision = "fp32"
    #: intra-op CPU threads (``torch.set_num_threads``); ``null``: the trainer's default. Results
    #: depend on it: the same seed and thread count give the same weights, another count may not.
    threads: int | None = None
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
    #: distillation from a real-valued teacher (off unless ``distill.teacher`` is set).
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def amp(self) -> bool | str:
        """The old ``amp`` view of :attr:`precision`: ``"auto"``, ``True`` (bf16) or ``False``."""
        return {"auto": "auto", "bf16": True}.get(self.precision, False)


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
#: Parameters of the schedule types (flipnet.optim.schedules.SCHEDULE_TYPES, which tests keep equal).
_SCHEDULE_PARAMS = ("value", "factor", "every", "start", "end", "duration")


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


def _fix_numbers(value: Any, where: str = "") -> Any:
    """Read YAML 1.1 strings such as ``1e-3`` (no dot, so not a float in YAML 1.1) as floats;
    refuse NaN and infinity (no hyper-parameter or option is meaningful at NaN or infinity)."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where or 'a value'} must be a finite number, got {value!r}; fix the recipe or the override")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        raise ConfigError(f"{where or 'a value'} is too large ({len(str(abs(value)))} digits); fix the recipe or the override")
    if isinstance(value, dict):
        return {k: _fix_numbers(v, _join(where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_numbers(v, f"{where}[{i}]") for i, v in enumerate(value)]
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
        return {k: _fix_numbers(v, _join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:
                raise ConfigError(f"{where} is too large ({len(str(abs(value)))} digits); fix the recipe or the override")
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            if not _SCIENTIFIC.match(value.strip()):
                raise _Mismatch  # "nan", "inf", "infinity", "1_000" and words are not numbers here
            value = float(value)
        if isinstance(value, int):
            if abs(value) >= 2**63:
                raise ConfigError(f"{where} is too large ({len(str(abs(value)))} digits); fix the recipe or the override")
            return float(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value!r}; fix the recipe or the override")
            return value
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
                # A misspelt fixed key (rout, units, kye) would otherwise become a schedule
                # parameter and be reported later, without the suggestion, once data are loaded.
                close = difflib.get_close_matches(str(k), [f for f in _SCHEDULE_FIXED if f not in raw], n=1, cutoff=0.6)
                if close and k not in _SCHEDULE_PARAMS:
                    raise ConfigError(
                        f"unknown key {_join(where, str(k))!r}; did you mean {_join(where, close[0])!r}? "
                        f"a schedule entry has {', '.join(_SCHEDULE_FIXED)} and its type's parameters "
                        f"({', '.join(_SCHEDULE_PARAMS)})"
                    )
                params[k] = raw.pop(k)
        raw["params"] = params
        if "key" not in raw or "type" not in raw:
            raise ConfigError(
                f"{where} needs at least 'key' (the hyper-parameter, e.g. gamma) and 'type' "
                "(constant, step, linear, cosine, exponential)"
            )
    if cls is DataConfig and isinstance(raw.get("augment"), str):
        raw["augment"] = [a.strip() for a in raw["augment"].split(",") if a.strip()]  # "crop" or "crop,flip"
    if cls is TrainConfig and "amp" in raw:
        raw["precision"] = _precision_from_amp(raw.pop("amp"), raw.get("precision"), where)
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


def _precision_from_amp(amp: Any, precision: Any, where: str) -> Any:
    """The old ``train.amp`` key (true/false/auto) as a ``train.precision`` value."""
    if isinstance(amp, str) and amp.strip().lower() == "auto":
        value = "auto"
    elif isinstance(amp, bool):
        value = "bf16" if amp else "fp32"
    else:
        raise ConfigError(
            f"{_join(where, 'amp')} must be true/false or auto, got {amp!r} "
            f"(it is the old name of {_join(where, 'precision')}: fp32, tf32, bf16 or auto)"
        )
    if precision is not None and precision != value:
        raise ConfigError(
            f"{_join(where, 'amp')}={amp!r} and {_join(where, 'precision')}={precision!r} disagree; "
            f"set only {_join(where, 'precision')} (fp32, tf32, bf16 or auto)"
        )
    return value


def _positive(obj: Any, where: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if not (v > 0 or (v == 0 and allow_zero)):  # NaN fails too
            need = "0 or more" if allow_zero else "positive"
            raise ConfigError(f"{_join(where, name)} must be {need}, got {v!r}")


def _check_values(obj: Any, where: str) -> None:
    if isinstance(obj, DataConfig):
        _positive(obj, where, "batch_size", "eval_batch_size", "subset", "test_subset")
        v = obj.val_size
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ConfigError(
                f"{_join(where, 'val_size')} must be a count (an integer), a fraction in [0, 1), auto or null, got {v!r}"
            )
        if isinstance(v, int) and v < 0:
            raise ConfigError(f"{_join(where, 'val_size')} must be 0 or more, got {v!r}")
        if isinstance(obj.augment, list) and len(set(obj.augment)) != len(obj.augment):
            raise ConfigError(f"{_join(where, 'augment')} lists an augmentation twice: {obj.augment!r}")
    elif isinstance(obj, TrainConfig):
        _positive(obj, where, "epochs", "eval_every", "grad_clip", "threads")
        _positive(obj, where, "nan_check_every", allow_zero=True)
        dev = obj.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"{_join(where, 'device')} must be auto, cpu, cuda or cuda:N, got {dev!r}")
    elif isinstance(obj, DistillConfig):
        obj.validate()
    elif isinstance(obj, OptimConfig):
        _positive(obj, where, "weight_clip")
        obj.binary = obj.binary.strip().lower()
        obj.real = obj.real.strip().lower()
    elif isinstance(obj, ModelConfig):
        if obj.init is not None:
            obj.init = obj.init.strip().lower()
    elif isinstance(obj, Config):
        if obj.seeds is not None and len(obj.seeds) == 0:
            raise ConfigError("seeds must be a non-empty list of integers or null")
        for label, seed in [("seed", obj.seed)] + [(f"seeds[{i}]", s) for i, s in enumerate(obj.seeds or [])]:
            if not 0 <= seed < 2**32:
                raise ConfigError(f"{label} must be an integer in 0..4294967295 (2**32 - 1), got {seed}")


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
# reading YAML with limits


class _LimitedLoader(yaml.SafeLoader):
    """:class:`yaml.SafeLoader` that checks the composed node graph before building any object."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_nodes(node)
        return node


def _check_nodes(root: Any) -> None:
    """Refuse recursive aliases, documents that expand to more than :data:`MAX_YAML_NODES` values,
    over-long scalars and over-long integers. Cost: linear in the *composed* graph (shared nodes
    are visited once), so an alias bomb is measured without being expanded."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("the YAML document holds a recursive alias (an anchor used inside itself); remove it")
        if isinstance(node, yaml.ScalarNode):
            value = node.value
            if len(value) > MAX_SCALAR_CHARS:
                raise ConfigError(f"a YAML value is {len(value):,} characters long (the limit is {MAX_SCALAR_CHARS:,})")
            if node.tag == "tag:yaml.org,2002:int" and len(value.lstrip("+-").replace("_", "")) > _MAX_INT_DIGITS:
                raise ConfigError(f"a YAML integer has {len(value)} digits (at most {_MAX_INT_DIGITS} are accepted)")
            sizes[key] = 1
            return 1
        active.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else [c for pair in node.value for c in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise ConfigError(
                    f"the YAML document expands to more than {MAX_YAML_NODES:,} values (anchors and aliases "
                    "counted at every use); a recipe is far smaller, so it is refused"
                )
        active.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root)


def _load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with the limits of :class:`_LimitedLoader` (raises ``yaml.YAMLError`` or
    :class:`ConfigError`)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise ConfigError(f"the YAML text is {len(text):,} characters long (the limit is {MAX_RECIPE_BYTES:,})")
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except (ValueError, OverflowError, RecursionError) as e:  # a constructor's own refusal
        raise ConfigError(f"the YAML text holds a value that cannot be read ({type(e).__name__}: {e})") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# overrides


def _parse_value(text: str) -> Any:
    try:
        return _load_yaml_text(text) if text.strip() else None
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
    overridden: set[tuple[str, ...]] = set()
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
        overridden.add(tuple(parts))
        # train.amp is the old name of train.precision: an override of either replaces the
        # recipe's value of the other (a conflict is only an error when both come from the same
        # place, e.g. two overrides or one recipe file).
        if tuple(parts) in _PRECISION_KEYS:
            other = _PRECISION_KEYS[0] if tuple(parts) == _PRECISION_KEYS[1] else _PRECISION_KEYS[1]
            if other not in overridden and isinstance(node, dict):
                node.pop(other[-1], None)
    return out


_PRECISION_KEYS: tuple[tuple[str, ...], tuple[str, ...]] = (("train", "precision"), ("train", "amp"))


# ---------------------------------------------------------------------------------------------
# recipes


def _recipes_dir() -> Path:
    return Path(str(resources.files("flipnet") / "recipes"))


def _load_shipped_yaml(text: str) -> Any:
    """Parse a recipe shipped with flipnet: libyaml's ``CSafeLoader`` when PyYAML was built with it.

    Shipped recipes are part of the package, not user input, so the node limits of
    :class:`_LimitedLoader` (pure Python, about 6 ms per recipe) are not needed to list them;
    every file a user names still goes through :func:`_load_yaml_text`.
    """
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        return _load_yaml_text(text)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader


def list_recipes() -> dict[str, str]:
    """Recipe names shipped with flipnet (sorted) mapped to their one-line description."""
    out: dict[str, str] = {}
    for path in sorted(_recipes_dir().glob("*.yaml")):
        try:
            raw = _load_shipped_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {_one_line(e)}") from None
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a short YAML file")
    try:
        raw = _load_yaml_text(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; a recipe is a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
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


# ---------------------------------------------------------------------------------------------
# what changes a run's trajectory

#: Keys (and key prefixes) whose change does not change which weights training produces: names,
#: where files go, evaluation, logging and progress display, where the data and the init
#: weights are found and whether they may be downloaded or cached, and machine/speed settings.
#: Every other key is a trajectory key.
TRAJECTORY_NEUTRAL_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "output",
    "data.root",
    "data.options.download",
    "data.options.cache_dir",
    "data.options.cache",
    "data.eval_batch_size",
    "data.test_subset",
    "model.init_from",
    "train.eval_every",
    "train.nan_check_every",
    "train.track_signs",
    "train.progress",
    "train.tensorboard",
    "train.plots",
    "train.device",
    "train.compile",
    "train.channels_last",
    "train.cuda_graphs",
    "train.threads",
)


def _neutral(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in TRAJECTORY_NEUTRAL_KEYS)


def _leaves(value: Any, prefix: str, out: dict[str, Any]) -> None:
    # An empty mapping has no leaves: {} against {download: true} differs only in that key, so
    # a neutral key added to an empty mapping (data.options) is not a change of the mapping.
    if isinstance(value, dict):
        for k, v in value.items():
            _leaves(v, _join(prefix, str(k)), out)
    else:
        out[prefix] = value


def _as_config(config: Config | dict[str, Any], label: str) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        try:
            return config_from_dict(config)
        except ConfigError as e:
            raise ConfigError(f"the {label} config is not a valid recipe: {e}") from None
    raise TypeError(f"{label} must be a Config or a mapping, got {type(config).__name__}")


def trajectory_changes(
    stored: Config | dict[str, Any],
    new: Config | dict[str, Any],
    *,
    extra_stored: dict[str, Any] | None = None,
    extra_new: dict[str, Any] | None = None,
) -> list[str]:
    """The dotted keys whose values differ between two configs and change the training trajectory.

    Used by ``flipnet train --resume`` to refuse a resume that would not continue the same run
    (unless forced). Trajectory keys are every key except :data:`TRAJECTORY_NEUTRAL_KEYS`: the
    seed(s), every ``data`` key that selects or orders training samples (name, batch size,
    subset, validation split, augmentation, options), the model, every optimizer
    hyper-parameter and schedule, ``train.epochs`` (schedules stretch over the run),
    ``train.precision`` and ``train.grad_clip``. Mappings are compared key by key
    (``optim.binary_kwargs.gamma``), lists as a whole (``optim.schedules``); ``1`` and ``1.0``
    are equal.

    Args:
        stored: the run's config (a :class:`Config` or the mapping read from its config.yaml).
        new: the config of the resume.
        extra_stored, extra_new: facts outside the recipe that also fix the trajectory, e.g.
            ``{"world_size": 2}``; a key present in either and different is reported.

    Returns:
        Sorted dotted keys, empty when the resume continues the same trajectory.

    Raises:
        ConfigError: a mapping that is not a valid recipe.
    """
    a, b = {}, {}
    _leaves(config_to_dict(_as_config(stored, "stored")), "", a)
    _leaves(config_to_dict(_as_config(new, "new")), "", b)
    changed = {k for k in set(a) | set(b) if not _neutral(k) and (k not in a or k not in b or a[k] != b[k])}
    ea, eb = dict(extra_stored or {}), dict(extra_new or {})
    changed |= {k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k)}
    return sorted(changed)
