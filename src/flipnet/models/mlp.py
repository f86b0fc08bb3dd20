r"""A binary multilayer perceptron for small images (digits 8×8, MNIST 28×28).

Structure (``hidden_sizes=(256, 256)``)::

    flatten → fc1 (real inputs) → bn1 → fc2 → bn2 → fc3 → bn3 (the logits)

Every dense layer has binary weights and no bias; ``fc2`` and ``fc3`` get binary inputs (the
sign of the previous BatchNorm output) in ``bnn`` mode. As in BinaryNet, each BatchNorm has a
learned shift but no scale, with Keras default statistics (``bn_momentum=0.01``, ``bn_eps=1e-3``).
``dropout=p`` adds ``Dropout(p)`` after each hidden BatchNorm. It is the multilayer perceptron of
Courbariaux et al. 2016 ("Binarized Neural Networks", MNIST) scaled down for quick runs.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ConfigError
from .common import ModelSpec, SequentialModel, pair
from .registry import register_model

__all__ = ["binary_mlp"]


@register_model(in_channels=1, bn_momentum=0.01, bn_eps=1e-3)
def binary_mlp(
    spec: ModelSpec,
    *,
    input_size: int | Sequence[int] = 28,
    hidden_sizes: Sequence[int] = (256, 256),
) -> SequentialModel:
    """Binary MLP (Courbariaux et al. 2016 style) for 8×8 digits or 28×28 MNIST: dense layers with shift-only BatchNorm.

    Args:
        spec: shared options (see :func:`flipnet.models.create_model`; ``in_channels`` defaults to 1).
        input_size: input height and width (int or pair): 8 for scikit-learn digits, 28 for MNIST.
        hidden_sizes: widths of the hidden layers (at least one).
    """
    h, w = pair(input_size, "input_size")
    if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence) or len(hidden_sizes) == 0:
        raise ConfigError(f"hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes!r}")
    for size in hidden_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes!r}")
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    features = spec.in_channels * h * w
    sizes = list(hidden_sizes) + [spec.num_classes]
    for i, units in enumerate(sizes, start=1):
        layers[f"fc{i}"] = spec.linear(features, units, quantize_input=i > 1)
        layers[f"bn{i}"] = spec.bn1d(units, gamma=False)
        if i < len(sizes):
            drop = spec.dropout_layer()
            if drop is not None:
                layers[f"drop{i}"] = drop
        features = units
    return SequentialModel(layers, input_shape=(spec.in_channels, h, w), name="binary_mlp")
