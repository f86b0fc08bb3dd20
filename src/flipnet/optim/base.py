r"""Shared machinery of the flip optimizers: :class:`FlipOptimizer`.

A *flip optimizer* trains binary weights :math:`w \in \{-1, +1\}` directly: it keeps one or
more real-valued moving averages of the gradient per weight and, at every step, negates the
weights whose flip rule fires. The weights never leave :math:`\{-1, +1\}`.

This module provides what :class:`~flipnet.optim.Bop`, :class:`~flipnet.optim.Bop2ndOrder` and
:class:`~flipnet.optim.CEMA` have in common:

* binarisation of the parameters at construction (``sign``, with ``sign(0) = +1``);
* validation of per-group hyperparameters, which may be Python numbers or 0-d tensors;
* on-device ``int64`` flip counters per tensor (:meth:`FlipOptimizer.flip_counts`), updated
  without a host synchronisation, so a step can be captured in a CUDA graph;
* the step loop: the subclass updates its moving averages of a whole group at once
  (``torch._foreach_*`` kernels, in place) and gives each tensor's flip score (a state tensor,
  or one written into a reused scratch buffer); the base class applies the rule
  :math:`w s > \tau` with floating-point arithmetic only (no comparison masks, no
  ``torch.where``: on CPUs those cost several times an addition), counts and applies the
  flips. Once the scratch buffer exists, a step allocates no parameter-sized temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..quantizers import sign

__all__ = ["FlipOptimizer", "Hyperparameter", "HyperparamRange"]

#: A hyperparameter value: a Python number or a 0-d floating-point tensor.
Hyperparameter = Union[float, Tensor]

#: Largest float32 sum of ±1 values that is exact whatever the order of additions.
_EXACT_SUM = 2**24
#: Elements per slice of a large CPU tensor (1 MiB in float32; a multiple of every SIMD width,
#: so the kernels split a slice exactly as they split the whole tensor).
_CPU_SLICE = _CPU_SLICE_DEFAULT = 2**18


def _flat(t: Tensor) -> Tensor | None:
    """``t`` as a 1-D view in memory order (contiguous or channels-last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return None


def _slices(p: Tensor, g: Tensor, state: Mapping[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """1-D views of a large CPU parameter, its gradient and its per-element state, when they
    share one dense layout (so that slices of them hold the same elements); else None."""
    if p.device.type != "cpu" or p.numel() <= _CPU_SLICE:
        return None
    same = [g] + [v for v in state.values() if isinstance(v, Tensor) and v.shape == p.shape]
    if any(t.stride() != p.stride() or t.device != p.device for t in same):
        return None
    flats = [_flat(t) for t in [p, *same]]
    if any(f is None for f in flats):
        return None
    keys = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape]
    return flats[0], flats[1], dict(zip(keys, flats[2:]))


@dataclass(frozen=True)
class HyperparamRange:
    """Valid interval of one hyperparameter: ``low <(=) value <(=) high``."""

    low: float
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below

    def describe(self) -> str:
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive and math.isfinite(self.high) else ")"
        high = "inf" if math.isinf(self.high) else f"{self.high:g}"
        return f"{left}{self.low:g}, {high}{right}"


def _scalar_value(name: str, value: Any) -> float:
    """Read a hyperparameter for validation (construction time only, never in ``step``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got a bool")
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a Python number or a 0-d floating-point tensor, "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return float(value.detach().cpu())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"{name} must be a Python number or a 0-d floating-point tensor, got {type(value).__name__}")


def counts_snapshot(param_groups: Iterable[Mapping[str, Any]], counts: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
    """Copies of the on-device counters of every parameter in ``param_groups`` (0 where none yet)."""
    out: dict[Tensor, Tensor] = {}
    for group in param_groups:
        for p in group["params"]:
            c = counts.get(p)
            out[p] = c.clone() if c is not None else torch.zeros((), dtype=torch.int64, device=p.device)
    return out


def foreach_lerp_(targets: list[Tensor], ends: list[Tensor], weight: Hyperparameter) -> None:
    """``t ← t + weight·(e − t)`` for every pair, in place, without reading ``weight`` back.

    ``torch._foreach_lerp_`` takes a single weight only as a Scalar, so a 0-d tensor passed
    there is read back to the host (``.item()`` in C++: a device synchronisation every step,
    and a failed CUDA-graph capture). A tensor weight goes through the tensor-list overload.
    """
    if isinstance(weight, Tensor):
        torch._foreach_lerp_(targets, ends, [weight] * len(targets))
    else:
        torch._foreach_lerp_(targets, ends, weight)


class FlipOptimizer(Optimizer):
    r"""Base class of optimizers that train ±1 weights by flipping their signs.

    Subclasses declare their hyperparameters in :attr:`hyperparameters` (name → valid range)
    and implement ``_init_state`` (zero buffers), ``_update_moments`` (the moving averages of
    one group, vectorised) and ``_score`` (the per-weight score; a weight flips where
    ``score > threshold``). The base class negates the flipped weights and counts them.

    Memory: the state of the subclass plus one scratch buffer per (device, dtype) of the
    largest parameter's size (on CPU at most 2**18 elements: large tensors are stepped in
    slices, which gives the same numbers).

    Flip statistics
    ---------------
    :meth:`flip_counts` returns, per parameter, an ``int64`` tensor on the parameter's device
    holding the number of sign flips since the last :meth:`reset_flip_counts`;
    :attr:`num_steps` counts the calls of :meth:`step` over the same period. The counters are
    updated with tensor operations only (no ``.item()``), so :meth:`step` never waits for the
    device. They are not part of :meth:`state_dict`: they describe the current logging period,
    not the optimizer's trajectory. ``count_flips=False`` switches the counting off.

    Hyperparameters may be Python numbers or 0-d floating-point tensors (put such a tensor on
    the parameters' device if the step is to be captured in a CUDA graph, and update it in
    place; :class:`flipnet.optim.schedules.HyperparamScheduler` does so).
    """

    #: Hyperparameter name → valid range; checked for every parameter group at construction.
    hyperparameters: Mapping[str, HyperparamRange] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, count_flips: bool = True) -> None:
        self.count_flips = bool(count_flips)
        self._flip_counts: dict[Tensor, Tensor] = {}
        self._num_steps = 0
        self._scratch_buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: Mapping[str, Any]) -> None:
        for name, valid in self.hyperparameters.items():
            if name not in group:
                raise ValueError(f"{type(self).__name__}: parameter group is missing hyperparameter {name!r}")
            value = _scalar_value(name, group[name])
            if not valid.contains(value):
                raise ValueError(
                    f"{type(self).__name__}: {name} must be in {valid.describe()}, got {value!r}"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its hyperparameters are validated and its tensors binarised.

        Raises:
            ValueError: a hyperparameter is out of range, or a parameter is already in another
                group (the message names the group and the shape).
            TypeError: a parameter is not a floating-point tensor.
        """
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        taken = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        seen: set[Tensor] = set()
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__} optimizes tensors, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"{type(self).__name__} needs floating-point parameters, got dtype {p.dtype}")
            if p in taken or p in seen:
                where = f"group {taken[p]}" if p in taken else "this same group"
                raise ValueError(
                    f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} is already in {where}; "
                    "give every parameter to exactly one parameter group"
                )
            seen.add(p)
        param_group = {**param_group, "params": params}
        super().add_param_group(param_group)
        with torch.no_grad():
            for p in params:
                p.copy_(sign(p))

    # ------------------------------------------------------------------ stepping
    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """Create the state of ``p`` (buffers start at zero); subclasses override."""
        raise NotImplementedError(f"{type(self).__name__} must implement _init_state")

    def _update_moments(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        """Update the moving averages of one group in place (vectorised); subclasses override."""
        raise NotImplementedError(f"{type(self).__name__} must implement _update_moments")

    def _score(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], out: Tensor) -> Tensor:
        """The flip score :math:`s` of ``p``: the weight flips where :math:`w s > \\tau`.

        Return a state tensor as it is (Bop: ``m``) or write into ``out`` and return it; the
        score must not depend on ``p`` (the base class multiplies by the weight).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _score")

    def _threshold(self, group: dict[str, Any]) -> Hyperparameter:
        """The flip threshold of a group (``group["threshold"]`` unless overridden)."""
        return group["threshold"]

    def _scratch(self, p: Tensor) -> Tensor:
        """A scratch view shaped (and strided) like ``p``, of ``p``'s dtype.

        One flat buffer per (device, dtype), as large as the largest parameter (on CPU: as large
        as a slice, see :meth:`step`), is reused by every tensor and every step: a fresh allocation per step costs more than the arithmetic
        on CPU (page faults) and would break CUDA-graph capture.
        """
        key = (p.device, p.dtype)
        buf = self._scratch_buffers.get(key)
        n = p.numel()
        if buf is None or buf.numel() < n:
            cap = _CPU_SLICE if p.device.type == "cpu" else math.inf  # CPU: large tensors go in slices
            size = max(n, max((min(q.numel(), cap) for g in self.param_groups for q in g["params"]
                               if q.device == p.device and q.dtype == p.dtype), default=n))
            buf = self._scratch_buffers[key] = torch.empty(size, dtype=p.dtype, device=p.device)
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            # same strides as the parameter, so element-wise kernels see matching layouts
            return buf.as_strided(p.shape, p.stride())
        return buf[:n].view(p.shape)

    def _sign_sums(self, p: Tensor) -> list[Tensor]:
        """Sums of the ±1 entries of the scratch view of ``p``, each exact, as 0-d tensors.

        In float32 every partial sum of ±1 values is an integer of magnitude at most ``n``, so a
        sum is exact for ``n ≤ 2**24``; larger tensors are summed in slices of ``2**24``. Other
        dtypes (bf16, fp16) give ``n − 2·count(−1)`` from a comparison instead.
        """
        n = p.numel()
        flat = self._scratch_buffers[(p.device, p.dtype)][:n]  # the same elements as the view
        if p.dtype not in (torch.float32, torch.float64):
            return [n - 2 * torch.count_nonzero(torch.lt(flat, 0))]
        return [c.sum() for c in flat.split(_EXACT_SUM)]

    def _add_flips(self, owner: Tensor, sums: list[Tensor]) -> None:
        """Add ``(numel − Σ sums) / 2``, the number of −1 signs, to the flip counter of ``owner``."""
        counter = self._flip_counts.get(owner)
        if counter is None:
            counter = self._flip_counts[owner] = torch.zeros((), dtype=torch.int64, device=owner.device)
        total = (sums[0] if len(sums) == 1 else torch.stack(sums)).double().sum()
        counter.add_((owner.numel() - total).mul_(0.5).to(torch.int64))

    def _flip(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], tau: Tensor) -> list[Tensor]:
        """Apply the flip rule to ``p`` (a parameter or a slice of one); return its sign sums
        (see :meth:`_sign_sums`; empty when flips are not counted)."""
        buf = self._scratch(p)
        score = self._score(group, p, state, buf)
        torch.addcmul(tau, p, score, value=-1, out=buf)  # r = τ − w·s
        torch.nan_to_num(buf, nan=1.0, out=buf)  # NaN: no flip (±inf keep their sign)
        torch.copysign(p, buf, out=buf)  # |w| = 1 with the sign of r: +1 keep, −1 flip
        sums = self._sign_sums(p) if self.count_flips else []
        p.mul_(buf)  # w ∈ {−1, +1} times ±1 stays in {−1, +1}
        return sums

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        r"""Update the moving averages and flip the weights whose rule fires.

        The rule :math:`w s > \tau` is evaluated without comparisons or masks: with
        :math:`r = \tau - w s` (one rounding of an exact product, so the sign of ``r`` is that
        of the exact difference and ``r = +0`` on a tie), the new weight is
        :math:`w \cdot \operatorname{copysign}(1, r)`: it flips exactly where :math:`r < 0`.
        A NaN score never flips (``r`` is set to +1 there).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, else ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            states: list[dict[str, Any]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            if not params:
                continue
            threshold = self._threshold(group)
            # +0.0 turns a threshold of −0.0 into +0.0, so that a tie gives r = +0 (no flip).
            taus: dict[tuple[torch.device, torch.dtype], Tensor] = {}
            for p in params:
                if (p.device, p.dtype) not in taus:
                    taus[(p.device, p.dtype)] = (
                        threshold + 0.0 if isinstance(threshold, Tensor)
                        else torch.full((), float(threshold) + 0.0, dtype=p.dtype, device=p.device)
                    )
            sliced = [_slices(p, g, st) for p, g, st in zip(params, grads, states)]
            whole = [i for i, flat in enumerate(sliced) if flat is None]
            if whole:
                self._update_moments(group, [params[i] for i in whole], [grads[i] for i in whole],
                                     [states[i] for i in whole])
                for i in whole:
                    p = params[i]
                    sums = self._flip(group, p, states[i], taus[(p.device, p.dtype)])
                    if sums:
                        self._add_flips(p, sums)
            for p, state, flat in zip(params, states, sliced):
                if flat is None:
                    continue
                pf, gf, sf = flat
                # Large CPU tensors go slice by slice, moments and flips together, so that the
                # ten or so passes over a slice hit the caches instead of the memory.
                sums: list[Tensor] = []
                for a in range(0, pf.numel(), _CPU_SLICE):
                    pc, gc = pf[a:a + _CPU_SLICE], gf[a:a + _CPU_SLICE]
                    sc = {k: (v[a:a + _CPU_SLICE] if k in sf else v) for k, v in {**state, **sf}.items()}
                    self._update_moments(group, [pc], [gc], [sc])
                    sums += self._flip(group, pc, sc, taus[(p.device, p.dtype)])
                if sums:
                    self._add_flips(p, sums)
        self._num_steps += 1
        return loss

    # ------------------------------------------------------------------ statistics
    def flip_counts(self) -> dict[Tensor, Tensor]:
        """Flips per parameter since the last :meth:`reset_flip_counts` (0-d ``int64``, on device).

        Every parameter of every group is present (0 where it never had a gradient). The
        tensors are copies; reading them (``.item()``, ``.tolist()``) is what synchronises.
        """
        return counts_snapshot(self.param_groups, self._flip_counts)

    @property
    def num_steps(self) -> int:
        """Number of :meth:`step` calls since the last :meth:`reset_flip_counts`."""
        return self._num_steps

    def reset_flip_counts(self) -> None:
        """Zero the flip counters and :attr:`num_steps` (in place: no new allocations)."""
        for c in self._flip_counts.values():
            c.zero_()
        self._num_steps = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("count_flips", True)
        self.__dict__.setdefault("_flip_counts", {})
        self.__dict__.setdefault("_num_steps", 0)
        self.__dict__.setdefault("_scratch_buffers", {})
