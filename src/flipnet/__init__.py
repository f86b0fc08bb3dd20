"""flipnet: train, understand and compress binary neural networks in PyTorch.

The key public API is available from the top-level package::

    import flipnet

    model = flipnet.create_model("binarynet", num_classes=10, in_channels=3)
    opt = flipnet.create_optimizer(model, "bop", {"gamma": 1e-4, "threshold": 1e-8}, "adam", {"lr": 1e-2})
    metrics = flipnet.Trainer(flipnet.load_config("digits_bop", ["train.epochs=5"])).fit()

Layers and quantizers are imported with the package; every other name below is imported on first
use (PEP 562), so ``import flipnet`` costs no more than importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import quantizers
from .errors import ConfigError, FlipnetError
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

#: Public name -> module that defines it, imported on first attribute access.
_LAZY: dict[str, str] = {
    "binarize": "flipnet.convert",
    "summary": "flipnet.compress.summary",
    "Bop": "flipnet.optim",
    "Bop2ndOrder": "flipnet.optim",
    "CEMA": "flipnet.optim",
    "create_optimizer": "flipnet.optim",
    "FlipRatio": "flipnet.metrics",
    "create_model": "flipnet.models",
    "list_models": "flipnet.models",
    "load_dataset": "flipnet.data",
    "list_datasets": "flipnet.data",
    "Trainer": "flipnet.train",
    "load_config": "flipnet.train",
}

__all__ = [
    "__version__",
    "quantizers",
    "ConfigError",
    "FlipnetError",
    "BinaryConv1d",
    "BinaryConv2d",
    "BinaryLayer",
    "BinaryLinear",
    "apply_constraints",
    "binary_modules",
    "binary_parameters",
    "named_binary_parameters",
    "named_real_parameters",
    "real_parameters",
    "set_weight_mode",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flipnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover  (static type checkers and IDEs see the lazy names)
    from .compress.summary import summary
    from .convert import binarize
    from .data import list_datasets, load_dataset
    from .metrics import FlipRatio
    from .models import create_model, list_models
    from .optim import CEMA, Bop, Bop2ndOrder, create_optimizer
    from .train import Trainer, load_config
