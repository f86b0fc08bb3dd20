r"""Weight initialisation schemes for recipes that reproduce code written in another framework.

PyTorch and Keras initialise layers differently: PyTorch's ``nn.Conv2d``/``nn.Linear`` draw
weights and biases from :math:`U(-b, b)` with :math:`b = 1/\sqrt{\text{fan\_in}}` (Kaiming
uniform with :math:`a = \sqrt5`), Keras draws kernels with Glorot uniform and sets biases to 0.
The Bop, Bop2ndOrder and BinaryNet reference code is Keras/larq, so a recipe that reproduces it
sets ``model.init: glorot_uniform``; :func:`init_weights` re-draws every convolution and dense
kernel of a freshly built model (binary layers included: their latent weights, whose signs are
the initial binary weights) and zeroes their biases. BatchNorm scale and shift start at 1 and 0
in both frameworks and are left alone.

Schemes (fans :math:`n_i, n_o` count the receptive field, the same way in both frameworks):

* ``torch``: PyTorch's defaults, unchanged.
* ``glorot_uniform``: :math:`U(-l, l)`, :math:`l = \sqrt{6 / (n_i + n_o)}` (Glorot & Bengio
  2010; Keras' default).
* ``glorot_normal``: :math:`\mathcal N(0, 2 / (n_i + n_o))` truncated at 2σ, as Keras does.
* ``he_normal``: :math:`\mathcal N(0, 2 / n_i)` truncated at 2σ (He et al. 2015; Keras' ``he_normal``).

Adding a scheme is one entry in :data:`INIT_SCHEMES`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from flipnet.errors import ConfigError, did_you_mean

__all__ = ["INIT_SCHEMES", "init_weights", "list_init_schemes"]

_KERNEL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return int(fan_in), int(fan_out)


def _glorot_uniform(weight: torch.Tensor) -> None:
    fan_in, fan_out = _fans(weight)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -limit, limit)


def _truncated_normal(weight: torch.Tensor, variance: float) -> None:
    # Keras' truncated normal: a normal cut at two standard deviations, with the std scaled so
    # that the *truncated* distribution has the requested variance (0.8796... is its std ratio).
    std = math.sqrt(variance) / 0.87962566103423978
    nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def _glorot_normal(weight: torch.Tensor) -> None:
    fan_in, fan_out = _fans(weight)
    _truncated_normal(weight, 2.0 / (fan_in + fan_out))


def _he_normal(weight: torch.Tensor) -> None:
    fan_in, _ = _fans(weight)
    _truncated_normal(weight, 2.0 / fan_in)


#: Scheme name → kernel initialiser (``None``: keep PyTorch's initialisation).
INIT_SCHEMES: dict[str, Callable[[torch.Tensor], None] | None] = {
    "torch": None,
    "glorot_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal,
    "he_normal": _he_normal,
}


def list_init_schemes() -> tuple[str, ...]:
    """The names :func:`init_weights` accepts."""
    return tuple(INIT_SCHEMES)


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str | None) -> nn.Module:
    """Re-initialise every convolution and dense kernel of ``model`` with ``scheme``; zero their biases.

    Call it on a freshly built model, before the optimizer is created and before binary layers
    are put in flip mode (their initial binary weights are the signs of the latent weights drawn
    here). Uses the global torch RNG, so a seeded run draws the same weights.

    Args:
        model: the network (modified in place and returned).
        scheme: a name of :data:`INIT_SCHEMES`; ``None`` or ``"torch"`` changes nothing.

    Raises:
        ConfigError: unknown scheme (the message lists the known ones).
    """
    if scheme is None:
        return model
    key = scheme.strip().lower() if isinstance(scheme, str) else scheme
    if key not in INIT_SCHEMES:
        raise ConfigError(
            f"unknown model.init scheme {scheme!r}; {did_you_mean(str(key), INIT_SCHEMES)}"
            f"choose one of: {', '.join(INIT_SCHEMES)}"
        )
    draw = INIT_SCHEMES[key]
    if draw is None:
        return model
    for module in model.modules():
        if isinstance(module, _KERNEL_LAYERS):
            draw(module.weight)
            if module.bias is not None:
                module.bias.zero_()
    from flipnet.layers import apply_constraints

    apply_constraints(model)  # a layer's weight_clip holds from the start, as at construction
    return model
