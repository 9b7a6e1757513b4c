"""The Trainer-free core: no module here imports Lightning.

Data flows one way, one module a step:

- :mod:`~pat_callbacks.core.schedules` / :mod:`~pat_callbacks.core.windows`: *how much, when* (step -> sparsity);
- :mod:`~pat_callbacks.core.targets`: *which parameters* (by role: what a matmul or convolution consumes);
- :mod:`~pat_callbacks.core.criteria`: *which entries matter* (weights and gradients -> scores);
- :mod:`~pat_callbacks.core.allocation`: *how much per layer* (uniform, global, ERK, sensitivity, OWL);
- :mod:`~pat_callbacks.core.patterns`: *what shape* (unstructured, N:M, blocks);
- :mod:`~pat_callbacks.core.selection`: the exact k lowest scores, whole, streamed or over ranks;
- :mod:`~pat_callbacks.core.masks`: the :class:`MaskStore`, enforced on weights, gradients and optimizer state;
- :mod:`~pat_callbacks.core.regrowth`: drop-and-grow (RigL, SET);
- :mod:`~pat_callbacks.core.pruner`: :class:`Pruner`, the facade a training loop drives;
- :mod:`~pat_callbacks.core.registry`: :class:`Registry`, the one way to extend (:data:`CRITERIA`,
  :data:`SCHEDULES`, :data:`ALLOCATIONS`; see ``docs/extending.md``).

Example:
    >>> from torch import nn
    >>> from pat_callbacks.core import Pruner
    >>> Pruner(nn.Linear(4, 4)).prune_to(0.5)
    True
"""

from pat_callbacks.core.allocation import ALLOCATIONS
from pat_callbacks.core.criteria import CRITERIA
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.pruner import Pruner, PruningOptions
from pat_callbacks.core.registry import Registry
from pat_callbacks.core.schedules import SCHEDULES

__all__ = ["ALLOCATIONS", "CRITERIA", "SCHEDULES", "MaskStore", "Pruner", "PruningOptions", "Registry"]
