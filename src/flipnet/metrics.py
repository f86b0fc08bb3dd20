r"""Metrics over training: :class:`FlipRatio`.

The flip ratio of a binary layer over a period (an epoch) is the fraction of its weights that
changed sign per optimizer step, averaged over the period:

.. math:: \text{flip ratio} = \frac{\text{number of sign flips}}{\text{numel} \cdot \text{steps}}

This is larq's ``FlipRatio`` metric (``larq.metrics.FlipRatio``) averaged over the epoch; the
total is the same quantity over all tracked binary weights together.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = ["FlipRatio", "FlipCounting"]


class FlipCounting(Protocol):
    """What :class:`FlipRatio` needs from an optimizer (:class:`flipnet.optim.FlipOptimizer`,
    :class:`flipnet.optim.RoutedOptimizer`)."""

    def flip_counts(self) -> dict[Tensor, Tensor]: ...

    def reset_flip_counts(self) -> None: ...

    @property
    def num_steps(self) -> int: ...


class FlipRatio:
    """Per-layer and total flip ratio of a model's binary weights since the last :meth:`reset`.

    Args:
        model: the network; binary weights are named with :func:`flipnet.named_binary_parameters`
            (the layer name is the parameter name without ``.weight``).
        optimizer: an optimizer that counts flips (``flip_counts()``, ``num_steps``,
            ``reset_flip_counts()``): a flip optimizer, or a :class:`~flipnet.optim.RoutedOptimizer`
            from :func:`~flipnet.optim.create_optimizer` (latent baselines included).

    Binary weights that the optimizer does not track (a frozen route) are left out.
    :meth:`compute` reads every counter with one device synchronisation; before any step it
    returns NaN ratios (no steps to average over).

    Example:
        >>> ratio = FlipRatio(model, opt)
        >>> ...  # train one epoch
        >>> ratio.compute()   # {"features.0": 1.2e-3, ..., "total": 8.0e-4}
        >>> ratio.reset()
    """

    def __init__(self, model: nn.Module, optimizer: FlipCounting) -> None:
        from .layers import named_binary_parameters

        for attr in ("flip_counts", "reset_flip_counts", "num_steps"):
            if not hasattr(optimizer, attr):
                raise TypeError(
                    f"FlipRatio needs an optimizer that counts flips ({type(optimizer).__name__} has no {attr!r}); "
                    "use a flipnet flip optimizer or flipnet.optim.create_optimizer(...)"
                )
        self.model = model
        self.optimizer = optimizer
        tracked = optimizer.flip_counts()
        self._layers: list[tuple[str, Tensor]] = []
        for name, p in named_binary_parameters(model):
            if p in tracked:
                layer = name[: -len(".weight")] if name.endswith(".weight") else name
                self._layers.append((layer, p))
        if not self._layers:
            raise ValueError(
                "the optimizer tracks none of the model's binary weights; "
                "pass the optimizer that trains this model's binary layers"
            )

    @property
    def layer_names(self) -> list[str]:
        """Names of the tracked binary layers, in model order."""
        return [name for name, _ in self._layers]

    def compute(self) -> dict[str, float]:
        """``{layer: ratio, ..., "total": ratio}`` over the steps since the last :meth:`reset`."""
        counts = self.optimizer.flip_counts()
        steps = self.optimizer.num_steps
        device = self._layers[0][1].device
        values = torch.stack([counts[p].to(device) for _, p in self._layers]).tolist()  # one sync
        numels = [p.numel() for _, p in self._layers]
        if steps == 0:
            nan = float("nan")
            return {**{name: nan for name, _ in self._layers}, "total": nan}
        out = {name: v / (n * steps) for (name, _), v, n in zip(self._layers, values, numels)}
        out["total"] = sum(values) / (sum(numels) * steps)
        return out

    def reset(self) -> None:
        """Start a new period: zero the optimizer's flip counters and step count."""
        self.optimizer.reset_flip_counts()
