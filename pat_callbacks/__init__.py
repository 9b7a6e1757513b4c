"""pat-callbacks: pruning-aware training as PyTorch Lightning callbacks.

Example:
    >>> from pat_callbacks import GradualPruning
    >>> GradualPruning(final_sparsity=0.9, schedule="cubic", start_step=100, end_step=2000).schedule.end_step
    2000
"""

from pat_callbacks.callbacks import DynamicSparseTraining, GradualPruning, PruningCallback, StructuredPruning
from pat_callbacks.masks import MaskStore
from pat_callbacks.schedules import (
    ConstantSchedule,
    CubicSchedule,
    ExponentialSchedule,
    LinearSchedule,
    OddEvenSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    Schedule,
    make_schedule,
)
from pat_callbacks.targets import select_parameters

__version__ = "0.1.0"

__all__ = [
    "ConstantSchedule",
    "CubicSchedule",
    "DynamicSparseTraining",
    "ExponentialSchedule",
    "GradualPruning",
    "LinearSchedule",
    "MaskStore",
    "OddEvenSchedule",
    "OneShotSchedule",
    "PolynomialSchedule",
    "PruningCallback",
    "Schedule",
    "StructuredPruning",
    "make_schedule",
    "select_parameters",
]
