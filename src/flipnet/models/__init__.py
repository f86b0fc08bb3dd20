"""The flipnet model zoo, behind a registry.

>>> from flipnet.models import create_model, list_models
>>> list_models()
['binary_mlp', 'binarynet', 'birealnet18', 'birealnet34', 'reactnet_a', 'resnet18', 'resnet20', 'unet']
>>> model = create_model("binarynet", num_classes=10, weight_mode="flip")

Every model comes in three modes with one module tree and one set of parameter names:
``"bnn"`` (binary weights and activations), ``"bwn"`` (binary weights, real activations) and
``"float"`` (the full-precision twin; :func:`float_twin` builds it from a binary model, exactly
if asked). See ``docs/models.md`` for the architectures, parameter counts and references.
"""

from __future__ import annotations

from . import binarynet as _binarynet  # noqa: F401  (registers the models)
from . import bireal as _bireal  # noqa: F401
from . import mlp as _mlp  # noqa: F401
from . import reactnet as _reactnet  # noqa: F401
from . import resnet as _resnet  # noqa: F401
from . import unet as _unet  # noqa: F401
from .common import ModelSpec, SequentialModel, count_parameters
from .registry import ModelEntry, create_model, float_twin, list_models, model_entry, model_options, register_model
from .resnet import ResNet
from .unet import UNet

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "model_options",
    "model_entry",
    "ModelEntry",
    "ModelSpec",
    "float_twin",
    "count_parameters",
    "SequentialModel",
    "ResNet",
    "UNet",
]
