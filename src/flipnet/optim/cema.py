r"""CEMA, the cascaded-EMA flip optimizer of Quist et al. 2023.

Reference: Joris Quist, Yunqiang Li and Jan van Gemert, "Understanding weight-magnitude
hyperparameters in training binary networks", ICLR 2023 (OpenReview uBKBoix9NXa); reference
code ``jorisquist/Understanding-WM-HP-in-BNNs`` (``optimizers/cema_optimizer.py``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .base import FlipOptimizer, Hyperparameter, HyperparamRange, foreach_lerp_
from .factory import OptimInfo, register_optimizer

__all__ = ["CEMA"]


class CEMA(FlipOptimizer):
    r"""Cascaded exponential moving averages: latent-weight SGD rewritten as a flip rule.

    For every binary weight :math:`w \in \{-1, +1\}` with gradient :math:`g_t`:

    .. math::

        m_t &= (1 - \gamma)\, m_{t-1} + \gamma\, g_t \\
        I_t &= (1 - \alpha)\, I_{t-1} + \alpha\, m_t \\
        w_t &= -w_{t-1} \text{ if } I_t\, w_{t-1} > 0 \text{, else } w_{t-1}

    with :math:`m_0 = I_0 = 0`. After a step, :math:`w = -\mathrm{sign}(I)` wherever
    :math:`I \ne 0`. The *inertia* :math:`I` plays the role of the (negated, rescaled) latent
    weight: latent-weight SGD with momentum :math:`\mu`, learning rate :math:`\eta` and
    decoupled weight decay :math:`\lambda` produces exactly the same binary weights as CEMA
    with :math:`\alpha = \eta\lambda` and :math:`\gamma = 1 - \mu` (derivation in
    ``docs/optimizers.md``; checked step by step in ``tests/test_optim_equivalence.py``).
    The paper decays :math:`\alpha` linearly to 0 over training:
    ``HyperparamScheduler(opt, "alpha", Linear(alpha, 0.0, total_steps))``.

    Args:
        params: parameters or parameter groups; every tensor is set to its sign at construction
            (``sign(0) = +1``; the reference's ``Tensor.sign_`` would leave zeros at 0).
        alpha: inertia rate :math:`\alpha \in [0, 1]` (the weight-decay analogue
            :math:`\eta\lambda`). No default: the paper tunes it per setting.
        gamma: momentum rate :math:`\gamma \in (0, 1]` (:math:`1 - \mu`). No default.
        count_flips: keep on-device flip counters; default True.
    """

    hyperparameters = {
        "alpha": HyperparamRange(0.0, 1.0),
        "gamma": HyperparamRange(0.0, 1.0, low_inclusive=False),
    }

    def __init__(
        self,
        params: Iterable[Any],
        alpha: Hyperparameter,
        gamma: Hyperparameter,
        *,
        count_flips: bool = True,
    ) -> None:
        super().__init__(params, {"alpha": alpha, "gamma": gamma}, count_flips=count_flips)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["inertia"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update_moments(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        ms = [s["m"] for s in states]
        foreach_lerp_(ms, grads, group["gamma"])  # m ← m + γ(g − m)
        foreach_lerp_([s["inertia"] for s in states], ms, group["alpha"])  # I ← I + α(m − I)

    def _threshold(self, group: dict[str, Any]) -> float:
        return 0.0

    def _score(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], out: Tensor) -> Tensor:
        return state["inertia"]  # flips where w·I > 0


register_optimizer(OptimInfo(
    "cema", CEMA, "flip", required=("alpha", "gamma"),
    description="CEMA (Quist et al. 2023); alpha = eta*lambda and gamma = 1 - mu of the latent SGD it replaces",
))
