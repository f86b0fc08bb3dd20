r"""BinaryNet for CIFAR-10, as in the Bop reference code.

The VGG-style network of Courbariaux et al. 2016 ("Binarized Neural Networks"), in the exact
form used for the CIFAR-10 experiments of Helwegen et al. 2019 ("Latent Weights Do Not Exist:
Rethinking Binarized Neural Network Optimization", NeurIPS; reference code written with larq):

==========  =============================================  ==========================
layer       operation (``f`` = ``filters`` = 128)           output (32×32 input)
==========  =============================================  ==========================
``conv1``   3×3 conv, f, no padding, **real** inputs          f × 30 × 30
``bn1``     BatchNorm (shift only)
``conv2``   3×3 conv, f, "same", binary inputs               f × 30 × 30
``pool2``   2×2 max-pool                                     f × 15 × 15
``bn2``     BatchNorm
``conv3``   3×3 conv, 2f, "same"; ``bn3``                    2f × 15 × 15
``conv4``   3×3 conv, 2f, "same"; ``pool4``; ``bn4``          2f × 7 × 7
``conv5``   3×3 conv, 4f, "same"; ``bn5``                    4f × 7 × 7
``conv6``   3×3 conv, 4f, "same"; ``pool6``; ``bn6``          4f × 3 × 3
``flatten``                                                  4608
``fc7``     dense 1024, binary inputs; ``bn7``               1024
``fc8``     dense 1024; ``bn8``                              1024
``fc9``     dense ``num_classes``; ``bn9`` (the logits)      10
==========  =============================================  ==========================

Every conv and dense layer has binary weights (the first and last included, as in the
reference), no bias, and binary inputs except ``conv1``; every BatchNorm has a learned shift and
no scale (Keras ``scale=False``) with Keras default statistics (``momentum=0.99``, i.e.
PyTorch ``bn_momentum=0.01``, and ``eps=1e-3``). The reference ends with a softmax; here the
model returns the BatchNorm'd logits (use cross-entropy on them).

With the default sizes it has 10,352,000 binary weights and 3,850 real parameters (the
BatchNorm shifts). ``dropout=p`` inserts ``Dropout(p)`` after ``bn1`` … ``bn8`` (the "Bop +
dropout" ablation). The model is a flat :class:`~flipnet.models.common.SequentialModel` so
that exporters can fold each BatchNorm into the layer before it.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ConfigError
from .common import ModelSpec, SequentialModel, conv_out, pair
from .registry import register_model

__all__ = ["binarynet"]


@register_model(bn_momentum=0.01, bn_eps=1e-3)
def binarynet(
    spec: ModelSpec,
    *,
    input_size: int | Sequence[int] = 32,
    filters: int = 128,
    dense_units: int = 1024,
) -> SequentialModel:
    """BinaryNet (Courbariaux et al. 2016) for CIFAR-10, exactly as in the Bop reference (Helwegen et al. 2019).

    Args:
        spec: shared options (see :func:`flipnet.models.create_model`).
        input_size: input height and width (int or pair); the flatten size follows.
        filters: channels of the first two convolutions (then 2× and 4×).
        dense_units: width of the two hidden dense layers.
    """
    h, w = pair(input_size, "input_size")
    for opt, value in (("filters", filters), ("dense_units", dense_units)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{opt} must be a positive int, got {value!r}")
    # conv1 is unpadded (-2), then three 2×2 max-pools
    fh, fw = conv_out(h, 3), conv_out(w, 3)
    for _ in range(3):
        fh, fw = fh // 2, fw // 2
    if fh < 1 or fw < 1:
        raise ConfigError(f"binarynet needs input_size of at least 10×10, got {h}×{w}")

    widths = [filters, filters, 2 * filters, 2 * filters, 4 * filters, 4 * filters]
    layers: dict[str, nn.Module] = {}

    def add_dropout(i: int) -> None:
        drop = spec.dropout_layer()
        if drop is not None:
            layers[f"drop{i}"] = drop

    c_in = spec.in_channels
    for i, c_out in enumerate(widths, start=1):
        first = i == 1
        layers[f"conv{i}"] = spec.conv(c_in, c_out, 3, padding=0 if first else "same", quantize_input=not first)
        if i % 2 == 0:
            layers[f"pool{i}"] = nn.MaxPool2d(2, 2)
        layers[f"bn{i}"] = spec.bn2d(c_out, gamma=False)
        add_dropout(i)
        c_in = c_out
    layers["flatten"] = nn.Flatten()
    features = c_in * fh * fw
    for i, units in ((7, dense_units), (8, dense_units), (9, spec.num_classes)):
        layers[f"fc{i}"] = spec.linear(features, units)
        layers[f"bn{i}"] = spec.bn1d(units, gamma=False)
        if i < 9:
            add_dropout(i)
        features = units
    return SequentialModel(layers, input_shape=(spec.in_channels, h, w), name="binarynet")
