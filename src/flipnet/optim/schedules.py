r"""Schedules for any optimizer hyperparameter (γ, τ, σ, α, lr, ...).

A *schedule* is a callable ``t ↦ value`` of the step or epoch index ``t = 0, 1, 2, ...``.
:class:`HyperparamScheduler` writes ``schedule(t)`` into one key of the parameter groups of an
optimizer (optionally only those of one route of a
:class:`~flipnet.optim.RoutedOptimizer`) and advances ``t`` by one per :meth:`~HyperparamScheduler.step`.

=================  ==========================================================================
schedule           value at index :math:`t`
=================  ==========================================================================
``Constant(v)``    :math:`v`
``StepDecay``      :math:`v_0\, f^{\lfloor t / N \rfloor}` (× ``factor`` every ``every`` units)
``Linear``         :math:`s + (e - s)\, \min(t, D)/D` (``start`` → ``end`` over ``duration``)
``Cosine``         :math:`e + \tfrac12 (s - e)\,(1 + \cos(\pi \min(t, D)/D))`
``Exponential``    :math:`v_0\, f^{t / N}` (smooth: × ``factor`` per ``every`` units)
``Lambda(fn)``     ``fn(t)``
=================  ==========================================================================

CEMA's α decays linearly to 0 over training, once per epoch as in the reference code of Quist
et al. 2023 (``alpha = alpha0 * (1 - epoch / epochs)``), in one line::

    HyperparamScheduler(opt, "alpha", Linear(alpha, 0.0, epochs), unit="epoch", route="binary")

or in a recipe: ``{key: alpha, route: binary, type: linear, end: 0.0, unit: epoch}``
(``unit: step`` decays it after every optimizer step instead).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

from torch import Tensor
from torch.optim import Optimizer

from ..errors import ConfigError, did_you_mean

__all__ = [
    "Schedule",
    "Constant",
    "StepDecay",
    "Linear",
    "Cosine",
    "Exponential",
    "Lambda",
    "HyperparamScheduler",
    "schedule_from_dict",
    "scheduler_from_dict",
    "SCHEDULE_TYPES",
    "UNITS",
]

#: Units a :class:`HyperparamScheduler` can count in.
UNITS: tuple[str, ...] = ("step", "epoch")


def _number(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Schedule(ABC):
    """A hyperparameter value as a function of the step or epoch index ``t >= 0``."""

    @abstractmethod
    def __call__(self, t: int) -> float:
        """The value at index ``t``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Schedule):
    """Always ``value``."""

    def __init__(self, value: float) -> None:
        self.value = _number("value", value)

    def __call__(self, t: int) -> float:
        return self.value


class StepDecay(Schedule):
    r"""``initial · factor ** (t // every)``: multiply by ``factor`` every ``every`` units.

    Example: ``StepDecay(1e-3, 0.1, 100)`` is 1e-3 for t < 100, 1e-4 for 100 ≤ t < 200, ...
    """

    def __init__(self, initial: float, factor: float, every: int) -> None:
        self.initial = _number("initial", initial)
        self.factor = _number("factor", factor, positive=True)
        self.every = _count("every", every)

    def __call__(self, t: int) -> float:
        return self.initial * self.factor ** (t // self.every)


class Linear(Schedule):
    r"""From ``start`` at t = 0 to ``end`` at t = ``duration`` in equal steps, then ``end``."""

    def __init__(self, start: float, end: float, duration: int) -> None:
        self.start = _number("start", start)
        self.end = _number("end", end)
        self.duration = _count("duration", duration)

    def __call__(self, t: int) -> float:
        if t >= self.duration:
            return self.end
        return self.start + (self.end - self.start) * (t / self.duration)


class Cosine(Schedule):
    r"""Half a cosine from ``start`` (t = 0) to ``end`` (t ≥ ``duration``); Loshchilov & Hutter 2017."""

    def __init__(self, start: float, end: float = 0.0, duration: int = 1) -> None:
        self.start = _number("start", start)
        self.end = _number("end", end)
        self.duration = _count("duration", duration)

    def __call__(self, t: int) -> float:
        if t >= self.duration:
            return self.end
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * t / self.duration))


class Exponential(Schedule):
    r"""``initial · factor ** (t / every)``: a smooth decay by ``factor`` per ``every`` units."""

    def __init__(self, initial: float, factor: float, every: int = 1) -> None:
        self.initial = _number("initial", initial)
        self.factor = _number("factor", factor, positive=True)
        self.every = _count("every", every)

    def __call__(self, t: int) -> float:
        return self.initial * self.factor ** (t / self.every)


class Lambda(Schedule):
    """``fn(t)`` for a user callable ``fn: int -> float``."""

    def __init__(self, fn: Callable[[int], float]) -> None:
        if not callable(fn):
            raise TypeError(f"Lambda needs a callable t -> value, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, t: int) -> float:
        return float(self.fn(t))


class HyperparamScheduler:
    r"""Drive one hyperparameter of an optimizer's parameter groups with a :class:`Schedule`.

    At construction the groups get ``schedule(0)``; each :meth:`step` advances the index by
    one and writes ``schedule(t)``. ``unit`` says what one index is: the caller (the trainer)
    calls :meth:`step` after every optimizer step for ``"step"`` and after every epoch for
    ``"epoch"``. A group value held in a 0-d tensor is updated in place (``fill_``), so a
    CUDA graph that captured the tensor sees the new value; Python numbers are replaced.

    Args:
        optimizer: any optimizer, including a :class:`~flipnet.optim.RoutedOptimizer`.
        key: the group key, e.g. ``"gamma"``, ``"threshold"``, ``"sigma"``, ``"alpha"``, ``"lr"``.
        schedule: a :class:`Schedule` (or any callable ``int -> float``).
        unit: ``"step"`` (default) or ``"epoch"``.
        route: only the groups whose ``"route"`` is this (``"binary"``/``"real"``); ``None``:
            every group that has ``key``.

    Raises:
        ValueError: unknown unit; no group on that route; no group (of the route) has ``key``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        key: str,
        schedule: Schedule | Callable[[int], float],
        unit: str = "step",
        route: str | None = None,
    ) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a Schedule or a callable t -> value, got {type(schedule).__name__}")
        self._setup(optimizer, key, unit, route)
        self.schedule = schedule
        self._schedules: list[Schedule | Callable[[int], float]] = [schedule] * len(self._groups)
        self._apply()

    def _setup(self, optimizer: Optimizer, key: str, unit: str, route: str | None) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        self.optimizer = optimizer
        self.key = key
        self.unit = unit
        self.route = route
        self._groups = _select_groups(optimizer, key, route)
        self.t = 0

    @classmethod
    def per_group(
        cls,
        optimizer: Optimizer,
        key: str,
        make: Callable[[float], Schedule | Callable[[int], float]],
        unit: str = "step",
        route: str | None = None,
    ) -> HyperparamScheduler:
        r"""One schedule per selected group, each built by ``make(v_g)`` from that group's own value.

        This is what a recipe's schedule means: ``{key: lr, type: cosine}`` without a route
        decays *each* route's learning rate from its own setting, so
        ``optim.real_kwargs.lr=0.1`` starts the real route at 0.1 even when the binary route
        starts at 0.01. (A single :class:`Schedule` passed to the constructor writes the same
        value into every selected group.)
        """
        self = cls.__new__(cls)
        self._setup(optimizer, key, unit, route)
        self._schedules = [make(_as_float(g[key])) for g in self._groups]
        if not all(callable(s) for s in self._schedules):
            raise TypeError("make must return a Schedule or a callable t -> value")
        self.schedule = self._schedules[0]
        self._apply()
        return self

    @property
    def value(self) -> float:
        """The value written at the current index (into the first selected group)."""
        return float(self._schedules[0](self.t))

    @property
    def values(self) -> list[float]:
        """The values written at the current index, one per selected group."""
        return [float(s(self.t)) for s in self._schedules]

    def _apply(self) -> None:
        # Re-select: load_state_dict on the optimizer replaces its group dicts.
        self._groups = _select_groups(self.optimizer, self.key, self.route)
        if len(self._groups) != len(self._schedules):
            raise ValueError(
                f"the optimizer now has {len(self._groups)} groups with key {self.key!r} "
                f"(route {self.route!r}), the scheduler was built for {len(self._schedules)}"
            )
        for group, schedule in zip(self._groups, self._schedules):
            value = float(schedule(self.t))
            current = group[self.key]
            if isinstance(current, Tensor):
                current.fill_(value)
            else:
                group[self.key] = value

    def step(self) -> None:
        """Advance one unit and write the new value."""
        self.t += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """``{"key", "route", "unit", "t"}``; the schedule itself is rebuilt from the recipe."""
        return {"key": self.key, "route": self.route, "unit": self.unit, "t": self.t}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the index (and write its value); the key and route must match."""
        for name in ("key", "route", "unit"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"scheduler state is for {name}={state[name]!r}, this scheduler has {name}={getattr(self, name)!r}; "
                    "create the schedulers in the same order as when the state was saved"
                )
        t = state.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"scheduler state has no valid index 't' (got {t!r})")
        self.t = t
        self._apply()

    def __repr__(self) -> str:
        where = f", route={self.route!r}" if self.route is not None else ""
        return f"HyperparamScheduler(key={self.key!r}, {self.schedule!r}, unit={self.unit!r}{where}, t={self.t})"


def _select_groups(optimizer: Optimizer, key: str, route: str | None) -> list[dict[str, Any]]:
    groups = optimizer.param_groups
    # A RoutedOptimizer gives groups without an "lr" (flip optimizers) a placeholder lr = 0.0
    # that nothing reads: such a key is neither scheduled nor offered in a suggestion.
    owners = {id(g): opt for opt in (getattr(optimizer, "optimizers", None) or {}).values() for g in opt.param_groups}

    def real_keys(g: dict[str, Any]) -> list[str]:
        owner = owners.get(id(g))
        return sorted(k for k in g if k not in ("params", "route") and (owner is None or k in owner.defaults))

    if route is not None:
        routes = sorted({str(g.get("route")) for g in groups if "route" in g})
        groups = [g for g in groups if g.get("route") == route]
        if not groups:
            raise ValueError(f"no parameter group on route {route!r}; routes present: {routes or 'none'}")
        missing = [i for i, g in enumerate(groups) if key not in g]
        if missing:
            keys = real_keys(groups[missing[0]])
            raise ValueError(f"groups of route {route!r} have no key {key!r}; {did_you_mean(key, keys, cutoff=0.75)}their keys: {', '.join(keys)}")
        return groups
    selected = [g for g in groups if key in g]
    # Without a route, a placeholder-lr group must neither be scheduled nor start a schedule.
    used = [g for g in selected if id(g) not in owners or key in owners[id(g)].defaults]
    selected = used or selected
    if not selected:
        keys = sorted({k for g in groups for k in real_keys(g)})
        raise ValueError(f"no parameter group has key {key!r}; {did_you_mean(key, keys, cutoff=0.75)}keys present: {', '.join(keys)}")
    return selected


# ---------------------------------------------------------------------------- recipes
#: Schedule type → (required keys, optional keys) accepted by :func:`schedule_from_dict`.
SCHEDULE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "constant": ((), ("value",)),
    "step": (("factor", "every"), ()),
    "linear": (("end",), ("start", "duration")),
    "cosine": ((), ("start", "end", "duration")),
    "exponential": (("factor",), ("every",)),
}


def schedule_from_dict(spec: Mapping[str, Any], initial: float, duration: int) -> Schedule:
    """Build a :class:`Schedule` from a recipe dict.

    Args:
        spec: ``{"type": ..., ...}`` with the keys of :data:`SCHEDULE_TYPES`:

            * ``{type: constant, value: v}`` (``value`` defaults to ``initial``);
            * ``{type: step, factor: 0.1, every: 100}``;
            * ``{type: linear, start: 1e-5, end: 1e-8}`` (``start`` defaults to ``initial``,
              ``duration`` to the ``duration`` argument);
            * ``{type: cosine, end: 0.0}`` (``start``: ``initial``; ``end``: 0);
            * ``{type: exponential, factor: 0.5, every: 10}`` (``every``: 1).
        initial: the hyperparameter's current value (the optimizer's setting).
        duration: the length of training in the schedule's unit (steps or epochs).

    Raises:
        flipnet.errors.ConfigError: missing or unknown ``type``, unknown or missing keys, or
            bad values; the message lists what is valid.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a schedule must be a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    if kind not in SCHEDULE_TYPES:
        hint = did_you_mean(kind, SCHEDULE_TYPES) if isinstance(kind, str) else ""
        raise ConfigError(f"unknown schedule type {kind!r}; {hint}valid types: {', '.join(SCHEDULE_TYPES)}")
    required, optional = SCHEDULE_TYPES[kind]
    given = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(given) - set(required) - set(optional))
    if unknown:
        valid = ", ".join(required + optional) or "(none)"
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} for schedule type {kind!r}; "
            f"{did_you_mean(unknown[0], required + optional)}valid keys: {valid}"
        )
    missing = [k for k in required if k not in given]
    if missing:
        raise ConfigError(f"schedule type {kind!r} needs key(s) {', '.join(map(repr, missing))}")
    try:
        if kind == "constant":
            return Constant(given.get("value", initial))
        if kind == "step":
            return StepDecay(initial, given["factor"], given["every"])
        if kind == "linear":
            return Linear(given.get("start", initial), given["end"], given.get("duration", duration))
        if kind == "cosine":
            return Cosine(given.get("start", initial), given.get("end", 0.0), given.get("duration", duration))
        return Exponential(initial, given["factor"], given.get("every", 1))
    except ValueError as err:
        raise ConfigError(f"schedule {dict(spec)!r}: {err}") from err


def scheduler_from_dict(
    optimizer: Optimizer, spec: Mapping[str, Any], *, epochs: int, steps_per_epoch: int
) -> HyperparamScheduler:
    """Build a :class:`HyperparamScheduler` from a recipe entry.

    ``spec`` is a :func:`schedule_from_dict` spec plus ``key`` (required), ``route`` and
    ``unit`` (``"step"`` by default), e.g. ``{key: gamma, route: binary, type: step,
    factor: 0.1, every: 100, unit: epoch}``. Each selected group gets its own schedule that
    starts from that group's current value of ``key`` (the optimizer's setting: without a
    ``route``, the binary and the real route each start from their own learning rate; see
    :meth:`HyperparamScheduler.per_group`); its default duration is ``epochs`` (unit epoch) or
    ``epochs * steps_per_epoch`` (unit step).
    """
    if not isinstance(spec, Mapping) or "key" not in spec:
        raise ConfigError(f"a schedule entry needs a 'key' (the hyperparameter to schedule), got {spec!r}")
    rest = {k: v for k, v in spec.items() if k not in ("key", "route", "unit")}
    key, route, unit = spec["key"], spec.get("route"), spec.get("unit", "step")
    if unit not in UNITS:
        raise ConfigError(f"schedule unit must be one of {UNITS}, got {unit!r}")
    try:
        _select_groups(optimizer, key, route)
    except ValueError as err:
        raise ConfigError(f"schedule {dict(spec)!r}: {err}") from err
    duration = _count("epochs", epochs) if unit == "epoch" else _count("epochs", epochs) * _count("steps_per_epoch", steps_per_epoch)
    schedule_from_dict(rest, 1.0, duration)  # check the spec once, before touching the optimizer
    return HyperparamScheduler.per_group(
        optimizer, key, lambda initial: schedule_from_dict(rest, initial, duration), unit=unit, route=route
    )


def _as_float(value: Any) -> float:
    return float(value.detach().cpu()) if isinstance(value, Tensor) else float(value)
