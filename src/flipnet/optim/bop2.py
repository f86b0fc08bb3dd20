r"""Bop2ndOrder, the second-order binary optimizer of Suarez-Ramirez et al. 2021.

Reference: Cuauhtemoc Daniel Suarez-Ramirez, Miguel Gonzalez-Mendoza, Leonardo Chang,
Gilberto Ochoa-Ruiz and Mario Alberto Duran-Vega, "A Bop and Beyond: A Second Order Optimizer
for Binarized Neural Networks", CVPR Workshops 2021 (arXiv:2104.05124); reference code
``CuauSuarez/Bop2ndOrder`` (``bnn_optimization/optimizers.py``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .base import FlipOptimizer, Hyperparameter, HyperparamRange, foreach_lerp_
from .factory import OptimInfo, register_optimizer

__all__ = ["Bop2ndOrder", "EPS"]

#: Added to :math:`\sqrt{v}` before dividing, as in the reference implementation.
EPS = 1e-10


class Bop2ndOrder(FlipOptimizer):
    r"""Bop with the gradient EMA normalised by the root of a second-moment EMA (Adam-like).

    For every binary weight :math:`w \in \{-1, +1\}` with gradient :math:`g_t`:

    .. math::

        m_t &= (1 - \gamma)\, m_{t-1} + \gamma\, g_t \\
        v_t &= (1 - \sigma)\, v_{t-1} + \sigma\, g_t^2 \\
        s_t &= w_{t-1}\, \frac{m_t}{\sqrt{v_t} + \epsilon} \\
        w_t &= -w_{t-1} \text{ if } s_t > \tau \text{, else } w_{t-1}

    with :math:`m_0 = v_0 = 0` and :math:`\epsilon = 10^{-10}`. With ``unbiased=True`` the
    moments are divided by their rates before the comparison (the paper's "bias-corrected"
    variant):

    .. math:: s_t = w_{t-1}\, \frac{m_t / \gamma}{\sqrt{v_t / \sigma} + \epsilon}

    This is a division by the constant rates, not Adam's step-dependent correction
    :math:`1 - (1-\gamma)^t`: for :math:`\sqrt{v_t} \gg \epsilon` it equals the biased score
    times :math:`\sqrt{\sigma}/\gamma`, i.e. a rescaled threshold.

    Args:
        params: parameters or parameter groups; real tensors are binarised at construction.
        gamma: first-moment rate :math:`\gamma \in (0, 1]`; default ``1e-6``.
        sigma: second-moment rate :math:`\sigma \in (0, 1]`; default ``1e-2``.
        threshold: flip threshold :math:`\tau \ge 0`; default ``1e-6``.
        unbiased: use the rate-corrected score above; default ``False``.
        count_flips: keep on-device flip counters; default True.

    The defaults are those of the reference implementation. Ties (:math:`s_t = \tau`) never
    flip (the reference sets such weights to +1; see :class:`~flipnet.optim.Bop`).
    """

    hyperparameters = {
        "gamma": HyperparamRange(0.0, 1.0, low_inclusive=False),
        "sigma": HyperparamRange(0.0, 1.0, low_inclusive=False),
        "threshold": HyperparamRange(0.0),
    }

    def __init__(
        self,
        params: Iterable[Any],
        gamma: Hyperparameter = 1e-6,
        sigma: Hyperparameter = 1e-2,
        threshold: Hyperparameter = 1e-6,
        unbiased: bool = False,
        *,
        count_flips: bool = True,
    ) -> None:
        if not isinstance(unbiased, bool):
            raise TypeError(f"unbiased must be True or False, got {unbiased!r}")
        defaults = {"gamma": gamma, "sigma": sigma, "threshold": threshold, "unbiased": unbiased}
        super().__init__(params, defaults, count_flips=count_flips)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update_moments(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        foreach_lerp_([s["m"] for s in states], grads, group["gamma"])  # m ← m + γ(g − m)
        vs = [s["v"] for s in states]
        for v, g in zip(vs, grads):  # v ← v + σ(g² − v), with g² in the scratch buffer
            v.lerp_(torch.mul(g, g, out=self._scratch(v)), group["sigma"])

    def _score(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], out: Tensor) -> Tensor:
        m, v = state["m"], state["v"]
        if group["unbiased"]:  # (m/γ) / (√(v/σ) + ε)
            torch.div(v, group["sigma"], out=out).sqrt_().add_(EPS)
            return torch.div(m, out, out=out).div_(group["gamma"])
        torch.sqrt(v, out=out).add_(EPS)  # m / (√v + ε)
        return torch.div(m, out, out=out)


register_optimizer(OptimInfo("bop2ndorder", Bop2ndOrder, "flip", aliases=("bop2",),
                             description="Bop2ndOrder (Suarez-Ramirez et al. 2021)"))
