r"""Routing parameters to optimizers: :class:`RoutedOptimizer` and :func:`create_optimizer`.

A binary network has two kinds of parameters: binary weights (trained by a flip optimizer, or
as latent weights by Adam/SGD) and real parameters (BatchNorm, biases, scales, full-precision
layers; trained by Adam/SGD). :class:`RoutedOptimizer` holds one optimizer per *route* and
presents them as a single :class:`torch.optim.Optimizer`, like larq's ``CaseOptimizer``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping as MappingABC
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .base import FlipOptimizer, counts_snapshot

__all__ = [
    "RoutedOptimizer",
    "create_optimizer",
    "BINARY_OPTIMIZERS",
    "REAL_OPTIMIZERS",
    "FLIP_OPTIMIZERS",
    "weight_clip_constraint",
]

#: Names accepted for the flip optimizers (``bop2`` is an alias of ``bop2ndorder``).
FLIP_OPTIMIZERS: tuple[str, ...] = ("bop", "bop2ndorder", "bop2", "cema")
#: Names accepted for ``create_optimizer(binary=...)``.
BINARY_OPTIMIZERS: tuple[str, ...] = FLIP_OPTIMIZERS + ("adam", "adamw", "sgd", "none")
#: Names accepted for ``create_optimizer(real=...)``.
REAL_OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "none")


class _RoutedState(MappingABC):
    """Read-only view of the children's ``state``: ``routed.state[p]`` is the owner's state."""

    def __init__(self, optimizers: Mapping[str, Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, p: Tensor) -> Any:
        for opt in self._optimizers.values():
            if p in opt.state:
                return opt.state[p]
        raise KeyError("no optimizer of this RoutedOptimizer holds state for that tensor")

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers.values())


class RoutedOptimizer(Optimizer):
    r"""Several optimizers, each owning a disjoint set of parameters, used as one.

    Args:
        optimizers: route name → optimizer (e.g. ``{"binary": Bop(...), "real": Adam(...)}``).
            Every group of every optimizer gets a ``"route"`` key with its route name.
        model: if given, a warning lists the trainable parameters of ``model`` that no route
            claims (they would silently never change).
        constraints: route name → callable run after that route's step (e.g. clipping latent
            weights to ``[-c, c]``).
        count_flips: routes whose parameters are latent binary weights: their sign changes are
            counted per step, on device, so :meth:`flip_counts` (and
            :class:`flipnet.metrics.FlipRatio`) covers latent training too. Flip optimizers
            count their own flips and need not be listed.

    Behaviour:
        * :attr:`param_groups` is the concatenation of the routes' groups: the very same dicts,
          so a change made through the router (by ``torch.optim.lr_scheduler`` or
          :class:`~flipnet.optim.schedules.HyperparamScheduler`) reaches the optimizer.
          Groups without an ``"lr"`` (the flip optimizers have no learning rate) get
          ``lr = 0.0``, which nothing reads, so that ``torch.optim.lr_scheduler`` schedulers
          can run over all groups; they then change only the routes that have a learning rate.
        * :meth:`step` evaluates ``closure`` once, then steps every route in order, then runs
          its constraint.
        * :meth:`state_dict` is ``{"routes": {name: optimizer.state_dict()}}``;
          :meth:`load_state_dict` needs the same route names and loads each route.
        * :meth:`add_param_group` needs a ``"route"`` key and forwards the group to that route.

    Raises:
        ValueError: a parameter is claimed by two routes (or twice by one); a route name is not
            a non-empty string; ``optimizers`` is empty.
    """

    def __init__(
        self,
        optimizers: Mapping[str, Optimizer],
        model: nn.Module | None = None,
        *,
        constraints: Mapping[str, Callable[[], None]] | None = None,
        count_flips: Iterable[str] = (),
    ) -> None:
        if not isinstance(optimizers, MappingABC) or not optimizers:
            raise ValueError("RoutedOptimizer needs a non-empty dict of route name → optimizer")
        for name, opt in optimizers.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"route names must be non-empty strings, got {name!r}")
            if not isinstance(opt, Optimizer):
                raise TypeError(f"route {name!r}: expected a torch.optim.Optimizer, got {type(opt).__name__}")
            if isinstance(opt, RoutedOptimizer):
                raise TypeError(f"route {name!r}: nesting RoutedOptimizers is not supported; merge their routes")
        self.optimizers: dict[str, Optimizer] = dict(optimizers)
        self.constraints: dict[str, Callable[[], None]] = dict(constraints or {})
        self.count_flips_routes: tuple[str, ...] = tuple(count_flips)
        for name in list(self.constraints) + list(self.count_flips_routes):
            if name not in self.optimizers:
                raise ValueError(f"unknown route {name!r}; routes are {sorted(self.optimizers)}")
        for name in self.count_flips_routes:
            if isinstance(self.optimizers[name], FlipOptimizer):
                raise ValueError(f"route {name!r} holds a flip optimizer, which counts its own flips")
        self._owner: dict[Tensor, str] = {}
        self._names: dict[Tensor, str] = {p: n for n, p in model.named_parameters()} if model is not None else {}
        self._latent_counts: dict[Tensor, Tensor] = {}
        self._num_steps = 0
        self._initialising = True
        groups = []
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["route"] = name
                group.setdefault("lr", 0.0)
                groups.append(group)
        super().__init__(groups, {})
        self._initialising = False
        self.state = _RoutedState(self.optimizers)  # type: ignore[assignment]
        if model is not None:
            self._warn_unclaimed(model)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the route named by ``param_group["route"]`` (and to :attr:`param_groups`)."""
        if self._initialising:
            self._claim(param_group)
            self.param_groups.append(param_group)
            return
        route = param_group.get("route")
        if route not in getattr(self, "optimizers", {}):
            raise ValueError(
                f"add_param_group on a RoutedOptimizer needs a 'route' key naming one of "
                f"{sorted(self.optimizers)}, got {route!r}"
            )
        params = param_group["params"]
        # materialise once: a generator would be used up by the check below
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        for p in params:
            if p in self._owner:
                raise ValueError(self._claimed_twice_message(p, self._owner[p], route))
        opt = self.optimizers[route]
        opt.add_param_group(param_group)
        group = opt.param_groups[-1]
        group["route"] = route
        group.setdefault("lr", 0.0)
        self._claim(group)
        self.param_groups.append(group)

    def _claim(self, group: Mapping[str, Any]) -> None:
        route = group["route"]
        seen_here: set[Tensor] = set()
        for p in group["params"]:
            if p in self._owner:
                raise ValueError(self._claimed_twice_message(p, self._owner[p], route))
            if p in seen_here:
                raise ValueError(self._claimed_twice_message(p, route, route))
            seen_here.add(p)
        for p in seen_here:
            self._owner[p] = route

    def _param_name(self, p: Tensor) -> str:
        if p in self._names:
            return repr(self._names[p])
        return f"of shape {tuple(p.shape)}"

    def _claimed_twice_message(self, p: Tensor, first: str, second: str) -> str:
        where = f"route {first!r} and route {second!r}" if first != second else f"route {first!r} twice"
        return (
            f"parameter {self._param_name(p)} is claimed by {where}; "
            "give every parameter to exactly one optimizer"
        )

    def _warn_unclaimed(self, model: nn.Module) -> None:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p not in self._owner]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            warnings.warn(
                f"{len(missing)} trainable parameter(s) of the model are in no route and will not be "
                f"updated: {shown}. Add them to an optimizer or set requires_grad=False.",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (once), then step every route and apply its constraint."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, opt in self.optimizers.items():
            counted = name in self.count_flips_routes
            before = self._signs(opt) if counted else None
            opt.step()
            constraint = self.constraints.get(name)
            if constraint is not None:
                constraint()
            if before is not None:
                self._count_sign_changes(opt, before)
        self._num_steps += 1
        return loss

    @staticmethod
    def _signs(opt: Optimizer) -> list[tuple[Tensor, Tensor]]:
        # "negative" marks sign −1 under flipnet's sign(0) = +1 (−0.0 < 0 is False, as it should be)
        return [(p, p < 0) for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def _count_sign_changes(self, opt: Optimizer, before: list[tuple[Tensor, Tensor]]) -> None:
        for p, was_negative in before:
            changed = torch.ne(was_negative, p < 0, out=was_negative)
            counter = self._latent_counts.get(p)
            if counter is None:
                counter = self._latent_counts[p] = torch.zeros((), dtype=torch.int64, device=p.device)
            counter.add_(torch.count_nonzero(changed))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of every route."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ statistics
    def flip_counts(self) -> dict[Tensor, Tensor]:
        """Flips (sign changes) per binary tensor since :meth:`reset_flip_counts`, on device.

        Covers the flip-optimizer routes and the routes listed in ``count_flips``.
        """
        out: dict[Tensor, Tensor] = {}
        for name, opt in self.optimizers.items():
            if isinstance(opt, FlipOptimizer):
                out.update(opt.flip_counts())
            elif name in self.count_flips_routes:
                out.update(counts_snapshot(opt.param_groups, self._latent_counts))
        return out

    @property
    def num_steps(self) -> int:
        """Number of :meth:`step` calls since the last :meth:`reset_flip_counts`."""
        return self._num_steps

    def reset_flip_counts(self) -> None:
        """Zero every flip counter and :attr:`num_steps`."""
        for opt in self.optimizers.values():
            if isinstance(opt, FlipOptimizer):
                opt.reset_flip_counts()
        for c in self._latent_counts.values():
            c.zero_()
        self._num_steps = 0

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"routes": {route: optimizer.state_dict()}}``."""
        return {"routes": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` of a RoutedOptimizer with the same routes and groups."""
        if not isinstance(state_dict, MappingABC) or "routes" not in state_dict:
            raise ValueError(
                "not a RoutedOptimizer state dict (no 'routes' key); save it with RoutedOptimizer.state_dict()"
            )
        saved = state_dict["routes"]
        if set(saved) != set(self.optimizers):
            raise ValueError(
                f"the state dict has routes {sorted(saved)} but this optimizer has {sorted(self.optimizers)}; "
                "build the optimizer with the same routes (e.g. the same create_optimizer arguments)"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        # load_state_dict replaces the children's group dicts: rebuild the merged view.
        self.param_groups.clear()
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["route"] = name
                group.setdefault("lr", 0.0)
                self.param_groups.append(group)

    def __repr__(self) -> str:
        inner = "\n".join(f"  {name}: {opt!r}".replace("\n", "\n  ") for name, opt in self.optimizers.items())
        return f"RoutedOptimizer(\n{inner}\n)"


# ---------------------------------------------------------------------------- factory
def weight_clip_constraint(model: nn.Module, weight_clip: float | None = None) -> Callable[[], None] | None:
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


def _normalise(name: str, valid: tuple[str, ...], what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} must be one of {', '.join(valid)}; got {name!r}")
    key = name.strip().lower().replace("_", "").replace("-", "")
    if key not in valid:
        raise ValueError(f"unknown {what} optimizer {name!r}; valid names: {', '.join(valid)}")
    return "bop2ndorder" if key == "bop2" else key


def _check_kwargs(name: str, cls: Callable[..., Optimizer], kwargs: Mapping[str, Any], route: str) -> None:
    """Name the first keyword ``cls`` does not take, the closest valid one and all valid ones."""
    import inspect

    from ..errors import did_you_mean

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to check against: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    # ``count_flips`` is create_optimizer's own argument, not a hyper-parameter of the recipe.
    valid = [k for k, p in params.items() if k not in ("params", "count_flips", "self")
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key, value in kwargs.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            raise ValueError(
                f"{route}_kwargs {dict(kwargs)!r} do not fit optimizer {name!r}: {key} must be a number, got {value!r}"
            )
    for key in kwargs:
        if key not in params or key == "params":
            hint = did_you_mean(key, valid, cutoff=0.75)  # strict: 'gamma' is not a typo of 'amsgrad'
            raise ValueError(
                f"{route}_kwargs {dict(kwargs)!r} do not fit optimizer {name!r}: it has no option {key!r}; "
                f"{hint}its options are: {', '.join(valid)}"
            )


def _build(name: str, params: list[Tensor], kwargs: Mapping[str, Any], route: str, count_flips: bool) -> Optimizer:
    from .bop import Bop
    from .bop2 import Bop2ndOrder
    from .cema import CEMA

    classes: dict[str, Callable[..., Optimizer]] = {
        "bop": Bop,
        "bop2ndorder": Bop2ndOrder,
        "cema": CEMA,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
    }
    given = dict(kwargs)
    kwargs = dict(kwargs)
    _check_kwargs(name, classes[name], given, route)
    if name in ("bop", "bop2ndorder", "cema"):
        kwargs.setdefault("count_flips", count_flips)
    if name == "cema" and not {"alpha", "gamma"} <= set(kwargs):
        raise ValueError(
            "CEMA has no default hyperparameters: pass binary_kwargs={'alpha': ..., 'gamma': ...} "
            "(α = ηλ and γ = 1 − μ of the latent SGD it replaces; see docs/optimizers.md)"
        )
    try:
        return classes[name](params, **kwargs)
    except TypeError as err:
        raise ValueError(f"{route}_kwargs {given!r} do not fit optimizer {name!r}: {err}") from err


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

    Args:
        model: the network; binary weights are found with :func:`flipnet.binary_parameters`,
            everything else with :func:`flipnet.real_parameters`. Only parameters with
            ``requires_grad`` are routed.
        binary: optimizer of the binary weights: a flip optimizer (``"bop"``,
            ``"bop2ndorder"`` or its alias ``"bop2"``, ``"cema"``), which puts every binary
            layer in flip mode (:func:`flipnet.set_weight_mode`); a latent-weight baseline
            (``"adam"``, ``"adamw"``, ``"sgd"``), which needs the layers in latent mode; or
            ``"none"``, which freezes the binary weights (``requires_grad=False``).
        binary_kwargs: keyword arguments of that optimizer (e.g. ``{"gamma": 1e-3}``).
        real: optimizer of the real parameters: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"none"``.
        real_kwargs: keyword arguments of that optimizer (e.g. ``{"lr": 1e-2}``).
        weight_clip: latent baselines only: clamp latent weights to ``[-c, c]`` after every step;
            ``None`` uses each layer's own ``weight_clip`` (larq's ``weight_clip`` constraint).
        count_flips: count flips (flip optimizers) or sign changes of the latent weights (latent
            baselines) on device, for :class:`flipnet.metrics.FlipRatio`.

    Returns:
        A :class:`RoutedOptimizer` with routes ``"binary"`` and ``"real"`` (a route with no
        parameters, or set to ``"none"``, is left out).

    Raises:
        ValueError: unknown optimizer name (the message lists the valid ones), a latent
            baseline on flip-mode layers, ``weight_clip`` with a flip optimizer or not positive,
            CEMA without ``alpha``/``gamma``, keyword arguments the optimizer does not take, or
            a model with nothing left to train.

    Example:
        >>> opt = create_optimizer(model, "bop", {"gamma": 1e-3, "threshold": 1e-6}, "adam", {"lr": 1e-2})
    """
    from ..layers import binary_modules, binary_parameters, real_parameters, set_weight_mode

    binary_name = _normalise(binary, BINARY_OPTIMIZERS, "binary")
    real_name = _normalise(real, REAL_OPTIMIZERS, "real")
    is_flip = binary_name in FLIP_OPTIMIZERS
    is_latent = binary_name in ("adam", "adamw", "sgd")
    if weight_clip is not None:
        if not is_latent:
            raise ValueError(
                f"weight_clip clamps latent weights; binary={binary!r} has none. "
                "Leave weight_clip unset or use binary='adam', 'adamw' or 'sgd'"
            )
        if isinstance(weight_clip, bool) or not isinstance(weight_clip, (int, float)) or not weight_clip > 0:
            raise ValueError(f"weight_clip must be a positive number or None, got {weight_clip!r}")
    layers = list(binary_modules(model))
    if is_latent:
        flip_layers = [name or "<root>" for name, m in layers if m.weight_mode == "flip"]
        if flip_layers:
            raise ValueError(
                f"binary={binary!r} trains latent weights, but layer(s) {', '.join(flip_layers[:5])} are in flip "
                "mode; build the model with weight_mode='latent' or call flipnet.set_weight_mode(model, 'latent')"
            )
    elif is_flip and layers:
        set_weight_mode(model, "flip")

    binary_params = [p for p in binary_parameters(model) if p.requires_grad]
    real_params = [p for p in real_parameters(model) if p.requires_grad]
    optimizers: dict[str, Optimizer] = {}
    constraints: dict[str, Callable[[], None]] = {}
    counted: list[str] = []
    if binary_name == "none":
        for p in binary_params:
            p.requires_grad_(False)
    elif binary_params:
        optimizers["binary"] = _build(binary_name, binary_params, binary_kwargs or {}, "binary", count_flips)
        if is_latent:
            clip = weight_clip_constraint(model, weight_clip)
            if clip is not None:
                constraints["binary"] = clip
            if count_flips:
                counted.append("binary")
    if real_name == "none":
        for p in real_params:
            p.requires_grad_(False)
    elif real_params:
        optimizers["real"] = _build(real_name, real_params, real_kwargs or {}, "real", count_flips)
    if not optimizers:
        raise ValueError(
            f"nothing to train: binary={binary!r} and real={real!r} leave no trainable parameter in the model"
        )
    return RoutedOptimizer(optimizers, model, constraints=constraints, count_flips=counted)
