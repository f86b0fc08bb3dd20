"""flipnet: train, understand and compress binary neural networks in PyTorch.

The key public API is available from the top-level package::

    import flipnet

    model = flipnet.create_model("binarynet", num_classes=10, in_channels=3)
    flipnet.optim.prepare_model_for(model, "bop")  # flip mode: the binary weights become ±1
    opt = flipnet.create_optimizer(model, "bop", {"gamma": 1e-4, "threshold": 1e-8}, "adam", {"lr": 1e-2})
    metrics = flipnet.Trainer.from_config(flipnet.load_config("digits_bop", ["train.epochs=5"])).fit()

Every name but the errors and ``__version__`` is imported on first use (PEP 562, see
:mod:`flipnet._lazy`), so ``import flipnet`` imports no torch and ``flipnet --help`` starts at once.
Submodules (``flipnet.quantizers``, ``flipnet.layers``, ``flipnet.train``, ...) import as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__
from .errors import ConfigError, FlipnetError

#: Public name -> module that defines it, imported on first attribute access.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("BinaryConv1d", "BinaryConv2d", "BinaryLayer", "BinaryLinear", "apply_constraints", "binary_modules",
         "binary_parameters", "named_binary_parameters", "named_real_parameters", "real_parameters", "set_weight_mode"),
        "flipnet.layers",
    ),
    "binarize": "flipnet.convert",
    "summary": "flipnet.compress",
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

__all__ = ["__version__", "ConfigError", "FlipnetError", *_LAZY]

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

if TYPE_CHECKING:  # pragma: no cover  (static type checkers and IDEs see the lazy names)
    from .compress import summary
    from .convert import binarize
    from .data import list_datasets, load_dataset
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
    from .metrics import FlipRatio
    from .models import create_model, list_models
    from .optim import CEMA, Bop, Bop2ndOrder, create_optimizer
    from .train import Trainer, load_config
