r"""BatchNorm followed by a sign, folded into one integer threshold per channel (exact).

Let a binary layer with binary inputs produce the integer :math:`y \in [-K, K]` (``K`` ±1 terms),
optionally scaled and shifted, :math:`z = s y + b` (``s`` the product of the magnitude of the
weight quantizer and the output scale :math:`\alpha`; ``s = 1``, ``b = 0`` without them). When the
next operations are BatchNorm and then a sign (the input quantizer of the next binary layer),

.. math::

    \mathrm{sign}\Big(\gamma\,\frac{z-\mu}{\sigma} + \beta\Big), \qquad \sigma = \sqrt{v + \epsilon} > 0,

with ``sign(0) = +1`` is +1 exactly when :math:`f(y) = \gamma(s y + b - \mu) + \beta\sigma \ge 0`
(multiply by :math:`\sigma > 0`). :math:`f` is affine in :math:`y` with slope :math:`g = \gamma s`:

* :math:`g > 0`: +1 iff :math:`y \ge r`, :math:`r = (\gamma(\mu - b) - \beta\sigma)/g`; with integer
  :math:`y` that is :math:`y \ge t`, :math:`t = \lceil r \rceil`. ``flip = False``.
* :math:`g < 0`: +1 iff :math:`y \le r`, i.e. not :math:`y \ge t` with :math:`t = \lfloor r \rfloor + 1`.
  ``flip = True`` (the comparison is inverted: a negative γ, or a negative scale).
* :math:`g = 0` (γ = 0 or s = 0): the output is the constant :math:`\mathrm{sign}(\gamma(b-\mu) + \beta\sigma)`;
  :math:`t = -K` (always true) with ``flip`` set when that constant is -1.

``t`` is clamped to :math:`[-K, K+1]` and stored as ``int32``: the layer becomes
:math:`\mathrm{out} = (y \ge t) \oplus \mathrm{flip}` (:class:`~flipnet.compress.packed.ThresholdSign`).
The thresholds are computed exactly: a float64 estimate of :math:`r` is corrected by evaluating the
predicate :math:`f(y) \ge 0` in exact rational arithmetic (the stored float32 parameters are exact
rationals; :math:`\beta\sigma` is compared through squares), so the folded layer reproduces the
real-arithmetic BatchNorm + sign for every integer :math:`y`. A float32 model can differ only where
its BatchNorm output is within rounding error of 0. Folding is skipped (BatchNorm kept in float)
where it would not be exact: real inputs (non-integer :math:`y`), a pad value other than 0/±1, a
non-positive or non-finite :math:`v + \epsilon`, BatchNorm without running statistics, no sign
after the BatchNorm, or a max-pool between layer and BatchNorm with some :math:`s \le 0` (max-pool
commutes with :math:`z(y)` only where it is non-decreasing). Between BatchNorm and the sign only
operations that commute with sign are allowed (max-pool, flatten, dropout, identity).

:func:`fold_entries` applies this to an export graph (:mod:`flipnet.compress.export.format`): every
``binary layer → [max-pool] → BatchNorm → (commuting ops) → sign`` chain inside one entry list
(the top level or one branch of a residual block) becomes ``binary layer → threshold``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from ...quantizers import sign
from .format import Entry, walk

__all__ = ["fold_bn_threshold", "bn_sign_reference", "fold_entries"]


def _frac(v: float) -> Fraction:
    return Fraction(float(v))


def _bn_predicate(y: int, g: Fraction, c0: Fraction, beta: Fraction, var: Fraction) -> bool:
    """Exactly: ``g*y + c0 + beta*sqrt(var) >= 0`` (``var > 0``)."""
    a = g * y + c0
    if beta == 0:
        return a >= 0
    if a >= 0 and beta > 0:
        return True
    if a <= 0 and beta < 0:
        return False
    if a >= 0:  # beta < 0: a >= |beta| sqrt(var)
        return a * a >= beta * beta * var
    return beta * beta * var >= a * a  # a < 0 < beta


def _threshold_estimate(gamma: Fraction, beta: Fraction, mean: Fraction, var: Fraction, s: Fraction, b: Fraction) -> float:
    """Float64 estimate of the real crossing ``r``; :func:`fold_bn_threshold` corrects it exactly."""
    return (float(gamma) * float(mean - b) - float(beta) * math.sqrt(float(var))) / float(gamma * s)


def fold_bn_threshold(
    k: int,
    gamma: Tensor | None,
    beta: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Integer thresholds equivalent to ``sign(BN(scale * y + bias))`` for integer ``|y| <= k``.

    Returns ``(threshold, flip)``: ``int32`` and ``bool`` tensors with one entry per channel such
    that, for every integer ``y`` in ``[-k, k]``, the sign (with ``sign(0) = +1``) of
    :math:`\gamma(s y + b - \mu)/\sqrt{v + \epsilon} + \beta` is +1 exactly when
    ``(y >= threshold) != flip``. See the module docstring for the derivation. ``gamma``/``beta``
    ``None`` mean 1/0 (BatchNorm without scale or shift).

    Raises:
        ValueError: ``var + eps`` not positive, or a parameter not finite, in some channel.
    """
    c = mean.numel()
    ones, zeros = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)

    def f64(t: Tensor | None, default: Tensor) -> Tensor:
        return default if t is None else t.detach().to(torch.float64).cpu().reshape(-1)

    g_, b_, m_, v_ = f64(gamma, ones), f64(beta, zeros), f64(mean, zeros), f64(var, zeros)
    s_, bb_ = f64(scale, ones), f64(bias, zeros)
    for name, t in (("gamma", g_), ("beta", b_), ("running_mean", m_), ("running_var", v_), ("scale", s_), ("bias", bb_)):
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} entries, expected {c}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds non-finite values; cannot fold BatchNorm into thresholds")
    eps_f = _frac(eps)
    thresholds: list[int] = []
    flips: list[bool] = []
    for i in range(c):
        gamma_i, beta_i, mu, v = _frac(g_[i]), _frac(b_[i]), _frac(m_[i]), _frac(v_[i]) + eps_f
        if v <= 0:
            raise ValueError(f"running_var + eps is {float(v)} <= 0 in channel {i}; cannot fold BatchNorm")
        s, b = _frac(s_[i]), _frac(bb_[i])
        g = gamma_i * s
        c0 = gamma_i * (b - mu)

        def p(y: int) -> bool:
            return _bn_predicate(y, g, c0, beta_i, v)

        if g == 0:
            thresholds.append(-k)
            flips.append(not p(0))
            continue
        r = _threshold_estimate(gamma_i, beta_i, mu, v, s, b)
        if g > 0:  # p is non-decreasing: smallest y in [-k, k] with p(y), or k + 1
            t = int(min(max(math.ceil(r), -k), k + 1)) if math.isfinite(r) else (k + 1 if r > 0 else -k)
            while t > -k and p(t - 1):
                t -= 1
            while t <= k and not p(t):
                t += 1
            thresholds.append(t)
            flips.append(False)
        else:  # p is non-increasing: largest y with p(y) is t - 1
            t = int(min(max(math.floor(r) + 1, -k), k + 1)) if math.isfinite(r) else (k + 1 if r > 0 else -k)
            while t <= k and p(t):
                t += 1
            while t > -k and not p(t - 1):
                t -= 1
            thresholds.append(t)
            flips.append(True)
    return torch.tensor(thresholds, dtype=torch.int32), torch.tensor(flips, dtype=torch.bool)


def bn_sign_reference(y: Tensor, gamma: Tensor | None, beta: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                      scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``sign(BN(scale*y + bias))`` in float64 along dim 1 (the unfolded computation, for checks)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)

    def v(t: Tensor | None, d: float) -> Tensor | float:
        return d if t is None else t.detach().to(torch.float64).view(shape)

    z = y.to(torch.float64) * v(scale, 1.0) + v(bias, 0.0)
    out = (z - v(mean, 0.0)) / torch.sqrt(v(var, 0.0) + eps) * v(gamma, 1.0) + v(beta, 0.0)  # type: ignore[operator]
    return sign(out)


def _terms(e: Entry) -> int:
    shape = e["weight_shape"]
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _fold_list(entries: list[Entry], folds: list[dict[str, Any]]) -> None:
    """Replace ``binary layer → [maxpool] → BatchNorm → (commuting ops) → sign`` by thresholds, in place."""
    i = 0
    while i < len(entries):
        e = entries[i]
        if e["type"] not in ("binary_conv", "binary_linear") or (e.get("input") or {}).get("op") != "sign":
            i += 1
            continue
        if e["type"] == "binary_conv" and e["pad_value"] not in (0.0, 1.0, -1.0):
            i += 1
            continue
        j = i + 1
        pooled = False
        while j < len(entries) and entries[j]["type"] == "maxpool2d":
            pooled = True
            j += 1
        if j >= len(entries) or entries[j]["type"] != "batchnorm" or "running_mean" not in entries[j].tensors:
            i += 1
            continue
        bn = entries[j]
        k = j + 1
        while k < len(entries) and entries[k]["type"] in ("maxpool2d", "flatten"):
            k += 1
        if k >= len(entries):
            i += 1
            continue
        nxt = entries[k]
        consumes_sign = (nxt["type"] == "activation" and nxt["op"] == "sign") or (
            nxt["type"] in ("binary_conv", "binary_linear", "real_conv", "real_linear")
            and (nxt.get("input") or {}).get("op") == "sign"
        )
        scale, bias = e.tensors.get("scale"), e.tensors.get("bias")
        if not consumes_sign or (pooled and scale is not None and not bool((scale > 0).all())):
            i += 1
            continue
        try:
            t, flip = fold_bn_threshold(
                _terms(e), bn.tensors.get("weight"), bn.tensors.get("bias"), bn.tensors["running_mean"],
                bn.tensors["running_var"], bn["eps"], scale, bias,
            )
        except ValueError:
            i += 1
            continue
        th = Entry("threshold", bn["name"], channels=int(t.numel()), layer=e["name"])
        th.tensors["threshold"] = t
        th.tensors["flip"] = flip.to(torch.uint8)
        e.tensors.pop("scale", None)
        e.tensors.pop("bias", None)
        entries[j] = th
        folds.append({"layer": e["name"], "batchnorm": bn["name"], "threshold": j})
        i = j + 1


def fold_entries(entries: list[Entry]) -> list[dict[str, Any]]:
    """Fold every foldable BatchNorm of the graph into thresholds, in place (each entry list on its
    own: a chain never crosses a residual addition). Returns the fold records
    ``{"layer", "batchnorm", "threshold"}`` (``threshold``: the index of the threshold entry in its list)."""
    folds: list[dict[str, Any]] = []
    for branch in walk(entries):
        _fold_list(branch, folds)
    return folds
