"""Lightning callbacks: the wiring between schedules, criteria, allocation and the mask store."""

from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.callbacks.distillation import Distillation
from pat_callbacks.callbacks.dynamic import DynamicSparseTraining
from pat_callbacks.callbacks.gradual import GradualPruning
from pat_callbacks.callbacks.keep import KeepSparsity
from pat_callbacks.callbacks.oneshot import OneShotPruning
from pat_callbacks.callbacks.quantization import QuantizationAwareTraining
from pat_callbacks.callbacks.structured import StructuredPruning
from pat_callbacks.callbacks.summary import PruningSummary

__all__ = [
    "Distillation",
    "DynamicSparseTraining",
    "GradualPruning",
    "KeepSparsity",
    "OneShotPruning",
    "PruningCallback",
    "PruningSummary",
    "QuantizationAwareTraining",
    "StructuredPruning",
]
