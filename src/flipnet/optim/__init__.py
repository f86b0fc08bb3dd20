"""Flip optimizers, routing of binary and real parameters, and hyperparameter schedules.

See ``docs/optimizers.md`` and ``docs/schedules.md``.
"""

from __future__ import annotations

from . import schedules
from .base import FlipOptimizer, HyperparamRange
from .bop import Bop
from .bop2 import Bop2ndOrder
from .cema import CEMA
from .routing import (
    BINARY_OPTIMIZERS,
    FLIP_OPTIMIZERS,
    REAL_OPTIMIZERS,
    RoutedOptimizer,
    create_optimizer,
    weight_clip_constraint,
)
from .schedules import (
    Constant,
    Cosine,
    Exponential,
    HyperparamScheduler,
    Lambda,
    Linear,
    Schedule,
    StepDecay,
    schedule_from_dict,
    scheduler_from_dict,
)

__all__ = [
    "FlipOptimizer",
    "HyperparamRange",
    "Bop",
    "Bop2ndOrder",
    "CEMA",
    "RoutedOptimizer",
    "create_optimizer",
    "weight_clip_constraint",
    "BINARY_OPTIMIZERS",
    "REAL_OPTIMIZERS",
    "FLIP_OPTIMIZERS",
    "schedules",
    "Schedule",
    "Constant",
    "StepDecay",
    "Linear",
    "Cosine",
    "Exponential",
    "Lambda",
    "HyperparamScheduler",
    "schedule_from_dict",
    "scheduler_from_dict",
]
