"""Flip optimizers, routing of binary and real parameters, and the optimizer registry.

Hyperparameter schedules live in :mod:`flipnet.optim.schedules`. See ``docs/optimizers.md``
and ``docs/schedules.md``.
"""

from __future__ import annotations

from .base import FlipOptimizer, HyperparamRange
from .routing import RoutedOptimizer
from .factory import (  # noqa: I001  (after routing: the factory builds RoutedOptimizers)
    OptimInfo,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    prepare_model_for,
    register_optimizer,
)
from .bop import Bop  # noqa: I001  (registers itself in the factory)
from .bop2 import Bop2ndOrder
from .cema import CEMA

__all__ = [
    "FlipOptimizer",
    "HyperparamRange",
    "Bop",
    "Bop2ndOrder",
    "CEMA",
    "RoutedOptimizer",
    "OptimInfo",
    "register_optimizer",
    "list_optimizers",
    "get_optimizer_info",
    "prepare_model_for",
    "create_optimizer",
]
