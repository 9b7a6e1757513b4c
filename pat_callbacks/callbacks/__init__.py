"""Lightning callbacks: the wiring between schedules, criteria, allocation and the mask store.

Every hook of :class:`PruningCallback` lists what a pruning callback does there, in order; a subclass's hook
calls it and adds its own step before or after, visibly.

Step words, one per concept (all in optimizer steps, ``trainer.global_step``):

- ``start_step`` / ``end_step`` (or ``_epoch`` / ``_fraction``): the window in which masks change:
  :class:`GradualPruning` and :class:`StructuredPruning` (the schedule's ramp), :class:`DynamicSparseTraining`
  (connectivity updates end at ``end_step`` / ``end_fraction``, formerly ``stop_step`` / ``stop_fraction``),
  :class:`QuantizationAwareTraining` (``start_step``: fake quantization from there to the end);
- ``at_step``: the one moment a one-time callback acts (:class:`OneShotPruning` prunes before that step);
- ``<event>_step``: a moment of a second event of a callback, named by the event: ``rewind_step``
  (:class:`GradualPruning`: the weights rewinding returns to), ``teacher_step`` (:class:`Distillation`: the model
  the teacher copies, and where distillation starts; ``"pruning_start"`` follows the pruning window);
- ``update_every``, ``phase_steps``: lengths, not moments.
"""

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
