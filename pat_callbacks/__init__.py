"""pat-callbacks: pruning-aware training as PyTorch Lightning callbacks.

Example:
    >>> from pat_callbacks import GradualPruning
    >>> GradualPruning(sparsity=0.9, schedule="cubic", start_step=100, end_step=2000).schedule.end_step
    2000
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.pruner import Pruner, PruningOptions
from pat_callbacks.core.schedules import (
    ConstantSchedule,
    CubicSchedule,
    ExponentialSchedule,
    FunctionSchedule,
    LinearSchedule,
    OddEvenSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    Schedule,
    make_schedule,
    register_schedule,
)
from pat_callbacks.core.targets import select_parameters
from pat_callbacks.core.windows import ScheduleSpec
from pat_callbacks.structured import StructuredPruner

if TYPE_CHECKING:
    from pat_callbacks.callbacks import (
        Distillation,
        DynamicSparseTraining,
        GradualPruning,
        KeepSparsity,
        OneShotPruning,
        PruningCallback,
        PruningSummary,
        QuantizationAwareTraining,
        StructuredPruning,
    )

# The Lightning callbacks load on first use, so the core (Pruner, schedules, ...) imports without Lightning.
_CALLBACKS = (
    "Distillation",
    "DynamicSparseTraining",
    "GradualPruning",
    "KeepSparsity",
    "OneShotPruning",
    "PruningCallback",
    "PruningSummary",
    "QuantizationAwareTraining",
    "StructuredPruning",
)


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        return getattr(importlib.import_module("pat_callbacks.callbacks"), name)
    raise AttributeError(f"module 'pat_callbacks' has no attribute {name!r}")


__version__ = "0.4.0"  # the same as pyproject.toml's `version` (tests/test_layout.py checks)

__all__ = [
    "ConstantSchedule",
    "CubicSchedule",
    "Distillation",
    "DynamicSparseTraining",
    "ExponentialSchedule",
    "FunctionSchedule",
    "GradualPruning",
    "KeepSparsity",
    "LinearSchedule",
    "MaskStore",
    "OddEvenSchedule",
    "OneShotPruning",
    "OneShotSchedule",
    "PolynomialSchedule",
    "Pruner",
    "PruningCallback",
    "PruningOptions",
    "PruningSummary",
    "QuantizationAwareTraining",
    "Schedule",
    "ScheduleSpec",
    "StructuredPruner",
    "StructuredPruning",
    "make_schedule",
    "register_schedule",
    "select_parameters",
]
