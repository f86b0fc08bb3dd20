"""flipnet: train, understand and compress binary neural networks in PyTorch."""

from __future__ import annotations

from . import quantizers
from .layers import (
    BinaryConv1d,
    BinaryConv2d,
    BinaryLayer,
    BinaryLinear,
    apply_constraints,
    binary_modules,
    binary_parameters,
    named_binary_parameters,
    named_real_parameters,
    real_parameters,
    set_weight_mode,
)

__version__ = "0.1.0"
