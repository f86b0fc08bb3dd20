r"""Routing parameters to optimizers: :class:`RoutedOptimizer`.

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

__all__ = ["RoutedOptimizer"]


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
