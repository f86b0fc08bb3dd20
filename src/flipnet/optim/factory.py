r"""The optimizer registry and the factory of a binary network's optimizer.

Every optimizer that :func:`create_optimizer` can build is described by one :class:`OptimInfo`
and registered with :func:`register_optimizer`; adding an optimizer is that one registration::

    register_optimizer(OptimInfo("lion", Lion, "real", description="Lion (Chen et al. 2023)"))

The *kind* of an optimizer says what it does with the weights, and so where it may go:

==========  ====================================================  =================================
kind        trains                                                routes
==========  ====================================================  =================================
``flip``    ±1 weights by flipping signs (:class:`FlipOptimizer`)  ``binary`` (layers in flip mode)
``latent``  latent weights of binary layers only                  ``binary`` (layers in latent mode)
``real``    real values (Adam, SGD, ...)                          ``real``, and ``binary`` as a
                                                                  latent-weight baseline
==========  ====================================================  =================================

:func:`create_optimizer` has no side effects on the model. Flip optimizers need the binary layers
in flip mode, and the ``"none"`` routes need their parameters frozen; both are done by the
explicit step :func:`prepare_model_for`, which is called first::

    prepare_model_for(model, binary="bop")        # flip mode: the binary weights become ±1
    opt = create_optimizer(model, binary="bop", binary_kwargs={"gamma": 1e-4})

See ``docs/optimizers.md``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..errors import did_you_mean
from .base import FlipOptimizer
from .routing import RoutedOptimizer

__all__ = [
    "OptimInfo",
    "register_optimizer",
    "list_optimizers",
    "get_optimizer_info",
    "prepare_model_for",
    "create_optimizer",
]

OptimKind = Literal["flip", "latent", "real"]
#: The kinds of :class:`OptimInfo`, in the order :func:`list_optimizers` lists them.
KINDS: tuple[str, ...] = ("flip", "latent", "real")
#: The name that leaves a route out (its parameters are frozen by :func:`prepare_model_for`).
NONE = "none"
#: Kinds accepted on each route of :func:`create_optimizer`.
_ROUTE_KINDS: dict[str, tuple[str, ...]] = {"binary": ("flip", "latent", "real"), "real": ("real",)}


def _key(name: str) -> str:
    """The registry key of a name: lower case, without ``_``, ``-`` and surrounding spaces."""
    return name.strip().lower().replace("_", "").replace("-", "")


@dataclass(frozen=True)
class OptimInfo:
    """Description of one registered optimizer.

    Attributes:
        name: the name used in code and recipes (``"bop"``); matched case-insensitively and
            ignoring ``_`` and ``-``.
        cls: the optimizer class (or a factory with the same signature), called as
            ``cls(params, **kwargs)``.
        kind: ``"flip"``, ``"latent"`` or ``"real"`` (module docstring: where it may go).
        aliases: other accepted names (``("bop2",)``).
        required: keyword arguments without a default that the user must pass.
        description: one line for listings and error messages (the method and its paper).
        defaults: keyword arguments passed unless the user gives them (for instance a
            convention that differs from the class's own defaults).
    """

    name: str
    cls: Callable[..., Optimizer]
    kind: OptimKind
    aliases: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or _key(self.name) == NONE:
            raise ValueError(f"OptimInfo.name must be a non-empty string other than 'none', got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"OptimInfo {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not callable(self.cls):
            raise TypeError(f"OptimInfo {self.name!r}: cls must be an optimizer class, got {self.cls!r}")
        if self.kind == "flip" and not (isinstance(self.cls, type) and issubclass(self.cls, FlipOptimizer)):
            raise TypeError(f"OptimInfo {self.name!r}: a 'flip' optimizer must subclass flipnet.optim.FlipOptimizer")
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "required", tuple(self.required))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def names(self) -> tuple[str, ...]:
        """``name`` and the aliases."""
        return (self.name, *self.aliases)


_REGISTRY: dict[str, OptimInfo] = {}  # key of the name or of an alias -> info


def register_optimizer(info: OptimInfo) -> OptimInfo:
    """Add ``info`` to the registry, so that :func:`create_optimizer` accepts its names.

    Returns ``info`` (so the call can stand where the value is needed).

    Raises:
        ValueError: its name or an alias is already taken by another registered optimizer.
    """
    if not isinstance(info, OptimInfo):
        raise TypeError(f"register_optimizer takes an OptimInfo, got {type(info).__name__}")
    keys = [_key(n) for n in info.names]
    for n, k in zip(info.names, keys):
        other = _REGISTRY.get(k)
        if other is not None and other is not info:
            raise ValueError(f"optimizer name {n!r} is already registered (by {other.name!r})")
    for k in keys:
        _REGISTRY[k] = info
    return info


def list_optimizers(kind: str | None = None) -> list[str]:
    """Names of the registered optimizers (not their aliases), of one ``kind`` if given.

    Listed by kind (flip, latent, real), then in the order of registration.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
    infos = list(dict.fromkeys(_REGISTRY.values()))
    order = KINDS if kind is None else (kind,)
    return [i.name for k in order for i in infos if i.kind == k]


def _valid_names(kinds: tuple[str, ...]) -> list[str]:
    infos = [i for i in dict.fromkeys(_REGISTRY.values()) if i.kind in kinds]
    return [n for k in kinds for i in infos if i.kind == k for n in i.names]


def get_optimizer_info(name: str, *, route: str | None = None) -> OptimInfo:
    """The :class:`OptimInfo` registered under ``name`` (or an alias).

    Args:
        name: an optimizer name; case, ``_`` and ``-`` are ignored.
        route: ``"binary"`` or ``"real"`` to accept only the kinds that route takes; ``None``
            accepts every kind.

    Raises:
        ValueError: unknown name, or one that the route does not take; the message names the
            closest valid name and lists all of them.
    """
    if route is not None and route not in _ROUTE_KINDS:
        raise ValueError(f"route must be 'binary', 'real' or None, got {route!r}")
    kinds = _ROUTE_KINDS[route] if route is not None else KINDS
    what = f"{route} optimizer" if route is not None else "optimizer"
    valid = _valid_names(kinds)
    listed = ", ".join(valid + ([NONE] if route is not None else []))
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a name, one of {listed}; got {name!r}")
    info = _REGISTRY.get(_key(name))
    if info is not None and info.kind not in kinds:
        raise ValueError(
            f"{name!r} is a {info.kind} optimizer, which the {route} route does not take; valid names: {listed}"
        )
    if info is None:
        hint = did_you_mean(_key(name), valid, cutoff=0.6)
        raise ValueError(f"unknown {what} {name!r}; {hint}valid names: {listed}")
    return info


def _is_none(name: Any) -> bool:
    return isinstance(name, str) and _key(name) == NONE


# ---------------------------------------------------------------------------- the explicit step
def prepare_model_for(model: nn.Module, binary: str = "bop", real: str = "adam") -> nn.Module:
    """Put ``model`` in the state that ``create_optimizer(model, binary, ..., real)`` expects.

    This is the one step that changes the model; :func:`create_optimizer` itself never does:

    * a flip optimizer (``kind="flip"``, e.g. ``"bop"``): every binary layer with 1-bit weights
      goes to flip mode (:func:`flipnet.set_weight_mode`), which replaces its weights by their
      signs (``sign(0) = +1``);
    * ``binary="none"``: the binary weights are frozen (``requires_grad=False``);
    * ``real="none"``: the real parameters are frozen;
    * a latent-weight baseline (``"adam"``, ``"sgd"``, ...) and a real optimizer change nothing
      (binary layers are built in latent mode; a model already in flip mode stays there, and
      :func:`create_optimizer` then says so).

    Calling it again with the same arguments changes nothing more. Returns ``model``.

    Raises:
        ValueError: an unknown optimizer name, or flip mode for a layer that cannot be in it
            (``scale='xnor'``), before anything is changed.
    """
    from ..layers import binary_parameters, real_parameters, set_weight_mode

    binary_info = None if _is_none(binary) else get_optimizer_info(binary, route="binary")
    if not _is_none(real):
        get_optimizer_info(real, route="real")
    if binary_info is not None and binary_info.kind == "flip":
        set_weight_mode(model, "flip")
    if _is_none(binary):
        for p in binary_parameters(model):
            p.requires_grad_(False)
    if _is_none(real):
        for p in real_parameters(model):
            p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- factory
def _weight_clip_constraint(model: nn.Module, weight_clip: float | None = None) -> Callable[[], None] | None:
    """A callable that clamps the latent binary weights of ``model`` after a step.

    Each latent-mode binary layer is clamped to ``[-c, c]`` with ``c = weight_clip`` if given,
    else the layer's own ``weight_clip``; layers with neither are left alone. Returns ``None``
    when there is nothing to clip.
    """
    from ..layers import binary_modules

    pairs: list[tuple[Tensor, float]] = []
    for _, m in binary_modules(model):
        if m.weight_mode != "latent":
            continue
        c = weight_clip if weight_clip is not None else m.weight_clip
        if c is not None:
            pairs.append((m.weight, float(c)))
    if not pairs:
        return None

    @torch.no_grad()
    def clip() -> None:
        for w, c in pairs:
            w.clamp_(-c, c)

    return clip


#: Keras/larq option names and torch's names for them, for the hint in an error message.
_KERAS_NAMES = {"epsilon": "eps", "learning_rate": "lr", "beta_1": "betas", "beta_2": "betas"}


def _check_kwargs(info: OptimInfo, kwargs: Mapping[str, Any], route: str) -> None:
    """Name the first keyword ``info.cls`` does not take, the closest valid one and all valid ones;
    reject a string where the option's default is a number and a missing required option."""
    given = dict(kwargs)
    missing = [k for k in info.required if k not in given]
    if missing:
        example = ", ".join(f"{k!r}: ..." for k in info.required)
        about = f" ({info.description})" if info.description else ""
        raise ValueError(
            f"{info.name!r}{about} has no default for {', '.join(missing)}: pass {route}_kwargs={{{example}}} "
            "(see docs/optimizers.md)"
        )
    try:
        params = inspect.signature(info.cls).parameters
    except (TypeError, ValueError):  # no signature to check against: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    # ``count_flips`` is create_optimizer's own argument, not a hyper-parameter of the recipe.
    valid = [k for k, p in params.items() if k not in ("params", "count_flips", "self")
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in given:
        if key not in valid:
            keras = _KERAS_NAMES.get(key)
            if keras is not None and keras in valid:
                hint = f"did you mean {keras!r} (Keras calls it {key!r})? "
            else:
                hint = did_you_mean(key, valid, cutoff=0.75)  # strict: 'gamma' is not a typo of 'amsgrad'
            raise ValueError(
                f"{route}_kwargs {given!r} do not fit optimizer {info.name!r}: it has no option {key!r}; "
                f"{hint}its options are: {', '.join(valid)}"
            )
    for key, value in given.items():
        default = params[key].default
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, (str, bool)) or value is None):
            raise ValueError(
                f"{route}_kwargs {given!r} do not fit optimizer {info.name!r}: {key} must be a number, got {value!r}"
            )


def _build(info: OptimInfo, params: list[Tensor], kwargs: Mapping[str, Any], route: str, count_flips: bool) -> Optimizer:
    given = dict(kwargs)
    _check_kwargs(info, given, route)
    call = {**info.defaults, **given}
    if info.kind == "flip":
        call.setdefault("count_flips", count_flips)
    try:
        return info.cls(params, **call)
    except (TypeError, ValueError) as err:
        if isinstance(err, ValueError) and getattr(info.cls, "__module__", "").startswith("flipnet."):
            raise  # flipnet's own optimizers already name the hyperparameter and its range
        raise ValueError(f"{route}_kwargs {given!r} do not fit optimizer {info.name!r}: {err}") from err


def create_optimizer(
    model: nn.Module,
    binary: str = "bop",
    binary_kwargs: Mapping[str, Any] | None = None,
    real: str = "adam",
    real_kwargs: Mapping[str, Any] | None = None,
    weight_clip: float | None = None,
    count_flips: bool = True,
) -> RoutedOptimizer:
    r"""Build the optimizer of a binary network: one route for binary weights, one for the rest.

    The model is not changed: call :func:`prepare_model_for` with the same ``binary`` and
    ``real`` first (it puts the layers in flip mode for a flip optimizer and freezes the
    ``"none"`` routes).

    Args:
        model: the network; binary weights are found with :func:`flipnet.binary_parameters`,
            everything else with :func:`flipnet.real_parameters`. Only parameters with
            ``requires_grad`` are routed.
        binary: optimizer of the binary weights, any registered name
            (:func:`list_optimizers`): a flip optimizer (``"bop"``, ``"bop2ndorder"`` or its
            alias ``"bop2"``, ``"cema"``), which needs the binary layers in flip mode; a
            latent-weight baseline (``"adam"``, ``"adamw"``, ``"sgd"``), which needs them in
            latent mode; or ``"none"`` (no route; the weights must be frozen).
        binary_kwargs: keyword arguments of that optimizer (e.g. ``{"gamma": 1e-3}``).
        real: optimizer of the real parameters (a ``"real"`` kind, e.g. ``"adam"``,
            ``"adamw"``, ``"sgd"``) or ``"none"``.
        real_kwargs: keyword arguments of that optimizer (e.g. ``{"lr": 1e-2}``, or
            ``{"lr": 1e-3, "eps": 1e-7}`` for Keras's and larq's Adam convention).
        weight_clip: latent baselines only: clamp latent weights to ``[-c, c]`` after every step;
            ``None`` uses each layer's own ``weight_clip`` (larq's ``weight_clip`` constraint).
        count_flips: count flips (flip optimizers) or sign changes of the latent weights (latent
            baselines) on device, for :class:`flipnet.metrics.FlipRatio`.

    Returns:
        A :class:`RoutedOptimizer` with routes ``"binary"`` and ``"real"`` (a route with no
        parameters, or set to ``"none"``, is left out).

    Raises:
        ValueError: unknown optimizer name (the message lists the valid ones); a flip optimizer
            on layers not in flip mode, or ``"none"`` for parameters that still require grad
            (both: call :func:`prepare_model_for`); a latent baseline on flip-mode layers;
            ``weight_clip`` with a flip optimizer or not positive; a required hyperparameter
            missing (CEMA's ``alpha``, ``gamma``); keyword arguments the optimizer does not
            take; or a model with nothing left to train.

    Example:
        >>> prepare_model_for(model, "bop")
        >>> opt = create_optimizer(model, "bop", {"gamma": 1e-3, "threshold": 1e-6}, "adam", {"lr": 1e-2})
    """
    from ..layers import binary_modules, binary_parameters, real_parameters

    binary_info = None if _is_none(binary) else get_optimizer_info(binary, route="binary")
    real_info = None if _is_none(real) else get_optimizer_info(real, route="real")
    is_flip = binary_info is not None and binary_info.kind == "flip"
    is_latent = binary_info is not None and not is_flip
    call = f"flipnet.optim.prepare_model_for(model, binary={binary!r}, real={real!r})"
    if weight_clip is not None:
        if not is_latent:
            raise ValueError(
                f"weight_clip clamps latent weights; binary={binary!r} has none. "
                f"Leave weight_clip unset or use a latent baseline ({', '.join(_valid_names(('latent', 'real')))})"
            )
        if isinstance(weight_clip, bool) or not isinstance(weight_clip, (int, float)) or not weight_clip > 0:
            raise ValueError(f"weight_clip must be a positive number or None, got {weight_clip!r}")
    layers = [(name or "<root>", m) for name, m in binary_modules(model) if m.has_binary_weight]
    if is_latent:
        flip_layers = [name for name, m in layers if m.weight_mode == "flip"]
        if flip_layers:
            raise ValueError(
                f"binary={binary!r} trains latent weights, but layer(s) {', '.join(flip_layers[:5])} are in flip "
                "mode; build the model with weight_mode='latent' or call flipnet.set_weight_mode(model, 'latent')"
            )
    elif is_flip:
        latent_layers = [name for name, m in layers if m.weight_mode != "flip"]
        if latent_layers:
            raise ValueError(
                f"binary={binary!r} flips ±1 weights, but layer(s) {', '.join(latent_layers[:5])} are in latent "
                f"mode; call {call} first (it puts them in flip mode)"
            )

    binary_params = [p for p in binary_parameters(model) if p.requires_grad]
    real_params = [p for p in real_parameters(model) if p.requires_grad]
    for info, params, route in ((binary_info, binary_params, "binary"), (real_info, real_params, "real")):
        if info is None and params:
            raise ValueError(
                f"{route}={NONE!r} leaves the {route} parameters untrained, but {len(params)} of them still "
                f"require grad; call {call} first (it freezes them)"
            )
    optimizers: dict[str, Optimizer] = {}
    constraints: dict[str, Callable[[], None]] = {}
    counted: list[str] = []
    if binary_info is not None and binary_params:
        optimizers["binary"] = _build(binary_info, binary_params, binary_kwargs or {}, "binary", count_flips)
        if is_latent:
            clip = _weight_clip_constraint(model, weight_clip)
            if clip is not None:
                constraints["binary"] = clip
            if count_flips and not isinstance(optimizers["binary"], FlipOptimizer):
                counted.append("binary")
    if real_info is not None and real_params:
        optimizers["real"] = _build(real_info, real_params, real_kwargs or {}, "real", count_flips)
    if not optimizers:
        raise ValueError(
            f"nothing to train: binary={binary!r} and real={real!r} leave no trainable parameter in the model"
        )
    return RoutedOptimizer(optimizers, model, constraints=constraints, count_flips=counted)


# ---------------------------------------------------------------------------- torch's optimizers
register_optimizer(OptimInfo("adam", torch.optim.Adam, "real",
                             description="Adam (Kingma and Ba 2015); Keras/larq use eps=1e-7, torch 1e-8"))
register_optimizer(OptimInfo("adamw", torch.optim.AdamW, "real",
                             description="AdamW, Adam with decoupled weight decay (Loshchilov and Hutter 2019)"))
register_optimizer(OptimInfo("sgd", torch.optim.SGD, "real", description="SGD with optional momentum"))
