"""The model registry: :func:`register_model`, :func:`create_model`, :func:`list_models`.

A model is a builder function registered by name::

    @register_model(bn_momentum=0.01, bn_eps=1e-3)
    def binarynet(spec: ModelSpec, *, input_size: int = 32) -> nn.Module:
        '''One-line description (shown by ``flipnet models``).'''
        ...

The builder receives a validated :class:`~flipnet.models.common.ModelSpec` (the options every
model shares) and its own keyword-only options, whose names and defaults the registry reads from
the signature. :func:`create_model` routes the keyword arguments, rejects unknown ones with the
list of valid ones, and records the resolved options on the model as ``model.model_config``
(``create_model(**model.model_config)`` rebuilds it) and ``model.spec``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from typing import Any, Callable, TypeVar, overload

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from ..layers import binary_modules
from .common import ModelSpec

__all__ = [
    "SHARED_OPTIONS",
    "ModelEntry",
    "register_model",
    "create_model",
    "list_models",
    "model_entry",
    "model_options",
    "is_model",
    "float_twin",
]

#: Options every model accepts besides ``num_classes``, ``in_channels``, ``mode``,
#: ``weight_mode``, ``scale`` and ``dropout`` (see :class:`~flipnet.models.common.ModelSpec`).
SHARED_OPTIONS: tuple[str, ...] = (
    "weight_clip",
    "weight_quantizer",
    "activation",
    "twin_of",
    "pad_value",
    "bn_momentum",
    "bn_eps",
)
_CORE_OPTIONS: tuple[str, ...] = ("num_classes", "in_channels", "mode", "weight_mode", "scale", "dropout")

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    Attributes:
        name: registry name.
        builder: ``builder(spec, **options) -> nn.Module``.
        description: first line of the builder's docstring.
        options: the model's own options and their defaults.
        num_classes, in_channels: defaults of these shared options for this model.
        binary_activation: default sign quantizer of ``mode="bnn"``.
        bn_momentum, bn_eps: default BatchNorm momentum (PyTorch convention) and epsilon.
    """

    name: str
    builder: Builder
    description: str
    options: dict[str, Any]
    num_classes: int = 10
    in_channels: int = 3
    binary_activation: str = "ste_sign"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def shared_defaults(self) -> dict[str, Any]:
        """Defaults of the shared options for this model (``activation=None``: per mode)."""
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "mode": "bnn",
            "weight_mode": "latent",
            "scale": "none",
            "dropout": 0.0,
            "weight_clip": None,
            "weight_quantizer": "ste_sign",
            "activation": None,
            "twin_of": None,
            "pad_value": 0.0,
            "bn_momentum": self.bn_momentum,
            "bn_eps": self.bn_eps,
        }


_REGISTRY: dict[str, ModelEntry] = {}


def _builder_options(fn: Builder) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise TypeError(f"model builder {fn.__name__} must take the ModelSpec as its first positional argument")
    options: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind is not p.KEYWORD_ONLY or p.default is p.empty:
            raise TypeError(f"model builder {fn.__name__}: option {p.name!r} must be keyword-only with a default")
        if p.name in _CORE_OPTIONS or p.name in SHARED_OPTIONS:
            raise TypeError(f"model builder {fn.__name__}: option {p.name!r} is a shared option (it is in the spec)")
        options[p.name] = p.default
    return options


@overload
def register_model(fn: F) -> F: ...
@overload
def register_model(
    *,
    name: str | None = None,
    num_classes: int = 10,
    in_channels: int = 3,
    binary_activation: str = "ste_sign",
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
) -> Callable[[F], F]: ...
def register_model(
    fn: F | None = None,
    *,
    name: str | None = None,
    num_classes: int = 10,
    in_channels: int = 3,
    binary_activation: str = "ste_sign",
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
) -> F | Callable[[F], F]:
    """Register a model builder under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with per-model defaults of shared options
    (``@register_model(num_classes=3, bn_momentum=0.01)``). Registering a name twice raises
    ``ValueError``.
    """

    def decorate(f: F) -> F:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"a model named {key!r} is already registered")
        doc = inspect.getdoc(f) or ""
        _REGISTRY[key] = ModelEntry(
            name=key,
            builder=f,
            description=doc.splitlines()[0] if doc else "",
            options=_builder_options(f),
            num_classes=num_classes,
            in_channels=in_channels,
            binary_activation=binary_activation,
            bn_momentum=bn_momentum,
            bn_eps=bn_eps,
        )
        return f

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a shell pattern (``"resnet*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def is_model(name: str) -> bool:
    """True where ``name`` is a registered model."""
    return name in _REGISTRY


def model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of ``name``; an unknown name raises ``ConfigError`` listing the valid ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; {did_you_mean(name, _REGISTRY)}valid models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_options(name: str) -> dict[str, Any]:
    """Every option of model ``name`` with its default: shared options first, then its own."""
    entry = model_entry(name)
    return {**entry.shared_defaults(), **entry.options}


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    mode: str = "bnn",
    weight_mode: str = "latent",
    scale: str = "none",
    dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        num_classes: number of outputs (``None``: the model's default, 10 for the CIFAR/MNIST
            classifiers, 1000 for ``resnet18``, 3 for ``unet``).
        in_channels: input channels (``None``: the model's default, 3, or 1 for ``binary_mlp``).
        mode: ``"bnn"`` binary weights and activations; ``"bwn"`` binary weights, real
            activations; ``"float"`` the full-precision twin (same parameter names and shapes).
        weight_mode: ``"latent"`` (real latent weights, for Adam/SGD + STE) or ``"flip"``
            (±1 weights for flip optimizers such as Bop).
        scale: per-channel output scaling of binary layers: ``"none"``, ``"xnor"``, ``"learnable"``.
        dropout: dropout probability (where it goes is model specific).
        **kwargs: the other shared options (:data:`SHARED_OPTIONS`: ``weight_clip``,
            ``weight_quantizer``, ``activation``, ``twin_of``, ``pad_value``, ``bn_momentum``,
            ``bn_eps``) and the model's own options (:func:`model_options`).

    Returns:
        The model, in training mode, with attributes ``model_name``, ``model_config`` (resolved
        options; ``create_model(**model.model_config)`` rebuilds it), ``spec`` and
        ``input_shape`` (the nominal ``(C, H, W)`` of one sample).

    Raises:
        ConfigError: unknown model name, unknown option, or an invalid value.
    """
    entry = model_entry(name)
    shared = {k: kwargs.pop(k) for k in list(kwargs) if k in SHARED_OPTIONS}
    unknown = sorted(set(kwargs) - set(entry.options))
    if unknown:
        own = ", ".join(entry.options) or "none"
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"{did_you_mean(unknown[0], [*entry.options, *_CORE_OPTIONS, *SHARED_OPTIONS])}its own options: {own}; "
            f"shared options: {', '.join(_CORE_OPTIONS + SHARED_OPTIONS)}"
        )
    shared.setdefault("bn_momentum", entry.bn_momentum)
    shared.setdefault("bn_eps", entry.bn_eps)
    spec = ModelSpec.create(
        num_classes=entry.num_classes if num_classes is None else num_classes,
        in_channels=entry.in_channels if in_channels is None else in_channels,
        mode=mode,
        weight_mode=weight_mode,
        scale=scale,
        dropout=dropout,
        binary_activation=entry.binary_activation,
        **shared,
    )
    options = {**entry.options, **kwargs}
    model = entry.builder(spec, **options)
    model.model_name = name
    model.model_config = {"name": name, **spec.as_options(), **options}
    model.spec = spec
    return model


def float_twin(model: nn.Module, *, exact: bool = False, activation: str | None = None) -> nn.Module:
    """The full-precision twin of a binary ``model`` built by :func:`create_model`, with its weights.

    The twin has the same architecture and parameter names and shapes, with
    :class:`~flipnet.models.common.FloatConv2d` / ``FloatLinear`` at the binary positions.

    Args:
        model: a ``bnn`` or ``bwn`` model from :func:`create_model`.
        exact: if True, the twin uses the model's own activation at every binary position (its
            sign quantizer in ``bnn`` mode) and the binarised weights (including the XNOR scale
            or a magnitude-aware weight quantizer's scale): in eval mode it computes the same
            function as ``model`` with ordinary float layers (a check of export and of the
            binary kernels). If False, the latent (or ±1) weights are copied as they are.
        activation: activation of the twin when ``exact`` is False (default: ReLU for a ``bnn``
            model, the model's own activation for a ``bwn`` model).

    Returns:
        The float twin, on the model's device, in the model's train/eval state.
    """
    config = getattr(model, "model_config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("float_twin needs a model built by flipnet.models.create_model (it has no model_config)")
    if config["mode"] == "float":
        raise ValueError("the model is already a float model (mode='float')")
    if exact and activation is not None:
        raise ValueError("float_twin(exact=True) uses the model's own activation; leave activation=None")
    options = dict(config)
    name = options.pop("name")
    if exact or (activation is None and config["mode"] == "bwn"):
        twin_activation: str | None = config["activation"]
    else:
        twin_activation = activation
    options.update(
        mode="float",
        twin_of=config["mode"],
        weight_mode="latent",
        weight_clip=None,
        weight_quantizer=None,
        scale="none" if config["scale"] == "xnor" else config["scale"],
        activation=twin_activation,
    )
    twin = create_model(name, **options)
    state = model.state_dict()
    if exact:
        with torch.no_grad():
            for layer_name, layer in binary_modules(model):
                w = layer.quantized_weight().detach()
                if layer.scale_mode == "xnor":
                    alpha = layer.output_scale().detach()  # type: ignore[union-attr]
                    w = w * alpha.view((-1,) + (1,) * (w.dim() - 1))
                state[f"{layer_name}.weight" if layer_name else "weight"] = w
    twin.load_state_dict(state)
    first = next(model.parameters(), None)
    if first is not None:
        twin.to(device=first.device, dtype=first.dtype)
    return twin.train(model.training)
