r"""Bop, the binary optimizer of Helwegen et al. 2019.

Reference: Koen Helwegen, James Widdicombe, Lukas Geiger, Zechun Liu, Kwang-Ting Cheng and
Roeland Nusselder, "Latent Weights Do Not Exist: Rethinking Binarized Neural Network
Optimization", NeurIPS 2019 (arXiv:1906.02107); larq's ``lq.optimizers.Bop``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .base import FlipOptimizer, Hyperparameter, HyperparamRange, foreach_lerp_
from .factory import OptimInfo, register_optimizer

__all__ = ["Bop"]


class Bop(FlipOptimizer):
    r"""Binary optimizer (Bop): flip a weight when the gradient EMA agrees with it strongly enough.

    For every binary weight :math:`w \in \{-1, +1\}` with gradient :math:`g_t`, one step is

    .. math::

        m_t &= (1 - \gamma)\, m_{t-1} + \gamma\, g_t \\
        w_t &= \begin{cases} -w_{t-1} & \text{if } w_{t-1} m_t > \tau \\
                             \phantom{-}w_{t-1} & \text{otherwise} \end{cases}

    with :math:`m_0 = 0`. A weight flips when the exponential moving average of its gradient
    has the weight's own sign (the loss decreases by flipping it) and a magnitude above the
    threshold :math:`\tau`. :math:`\gamma` (the *adaptivity rate*) sets how quickly the
    average forgets; it plays the role of the learning rate.

    Args:
        params: parameters or parameter groups (dicts). Real-valued tensors are binarised to
            ``sign(x)`` (``sign(0) = +1``) at construction.
        gamma: adaptivity rate :math:`\gamma \in (0, 1]`; default ``1e-4`` (larq's default).
        threshold: flip threshold :math:`\tau \ge 0`; default ``1e-8`` (larq's default).
        count_flips: keep on-device flip counters (see :class:`FlipOptimizer`); default True.

    Both hyperparameters may differ per parameter group and may be 0-d tensors.

    Note:
        larq computes ``w ← sign(−sign(w·m − τ)·w)`` with ``sign(0) = +1``, so where
        :math:`w m = \tau` exactly it sets the weight to +1 whatever its sign. Here ties never
        flip (:math:`w m > \tau` strictly); the two agree everywhere else.

    Example:
        >>> model = flipnet.set_weight_mode(model, "flip")  # or flipnet.optim.prepare_model_for(model, "bop")
        >>> opt = Bop(flipnet.binary_parameters(model), gamma=1e-3, threshold=1e-6)
    """

    hyperparameters = {
        "gamma": HyperparamRange(0.0, 1.0, low_inclusive=False),
        "threshold": HyperparamRange(0.0),
    }

    def __init__(
        self,
        params: Iterable[Any],
        gamma: Hyperparameter = 1e-4,
        threshold: Hyperparameter = 1e-8,
        *,
        count_flips: bool = True,
    ) -> None:
        super().__init__(params, {"gamma": gamma, "threshold": threshold}, count_flips=count_flips)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update_moments(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        foreach_lerp_([s["m"] for s in states], grads, group["gamma"])  # m ← m + γ(g − m)

    def _score(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], out: Tensor) -> Tensor:
        return state["m"]  # flips where w·m > τ


register_optimizer(OptimInfo("bop", Bop, "flip", description="Bop (Helwegen et al. 2019)"))
