"""One-shot pruning of a trained model from calibration data (Trainer-free; never imports Lightning).

- :mod:`~pat_callbacks.oneshot.calibration`: per-layer input statistics (``||X_j||^2``, ``X^T X``) over calibration
  batches, read by hooks that exist only while calibrating;
- :mod:`~pat_callbacks.oneshot.wanda`: Wanda scores ``|W| * ||X||`` (for ``Pruner.prune_to(scores=...)`` or per
  output row);
- :mod:`~pat_callbacks.oneshot.sparsegpt`: SparseGPT's OBS update from the input Hessian, blockwise, unstructured
  and N:M;
- OWL layer-wise sparsities from outlier ratios are an allocation (``allocation="owl"``, :mod:`pat_callbacks.core.owl`,
  re-exported here);
- :mod:`~pat_callbacks.oneshot.blocks`: a model's repeated blocks run one at a time from cached block inputs
  (calibration linear in depth; ``offload`` moves one block at a time to the device);
- :mod:`~pat_callbacks.oneshot.sequential`: the layer groups calibrated and pruned in order, validated before any
  weight changes;
- :mod:`~pat_callbacks.oneshot.methods`: :data:`ONE_SHOT_METHODS`, the registry of one-shot methods;
- :mod:`~pat_callbacks.oneshot.prune`: :func:`one_shot_prune`, the entry point.

Recovery training keeps the masks: ``result.pruner.mask_grads()`` in a plain loop, or the
:class:`~pat_callbacks.callbacks.oneshot.OneShotPruning` callback, which prunes at fit start and keeps them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pat_callbacks.oneshot import one_shot_prune
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> result = one_shot_prune(model, "wanda", 0.5, allocation="owl", calibration=[torch.randn(32, 8)])
    >>> result.sparsity
    0.5
"""

from typing import Any

from pat_callbacks.core.owl import OWL_LAMBDA, OWL_M, layer_groups, outlier_ratios, owl_sparsities
from pat_callbacks.oneshot import prune as _prune
from pat_callbacks.oneshot.blocks import BlockInputs, Blocks, find_blocks
from pat_callbacks.oneshot.calibration import (
    Calibration,
    InputReader,
    attention_mask_of,
    default_forward,
    input_readers,
)
from pat_callbacks.oneshot.prune import (
    ONE_SHOT_METHODS,
    PIPELINES,
    MagnitudeMethod,
    OneShotMethod,
    OneShotOptions,
    OneShotResult,
    SparseGPTMethod,
    WandaMethod,
    one_shot_allocations,
    one_shot_prune,
)
from pat_callbacks.oneshot.sparsegpt import refuse_sharded, sparsegpt_prune
from pat_callbacks.oneshot.wanda import row_mask, row_masks, wanda_score, wanda_scores

__all__ = [
    "ONE_SHOT_METHODS",
    "OWL_LAMBDA",
    "OWL_M",
    "PIPELINES",
    "BlockInputs",
    "Blocks",
    "Calibration",
    "InputReader",
    "MagnitudeMethod",
    "OneShotMethod",
    "OneShotOptions",
    "OneShotResult",
    "SparseGPTMethod",
    "WandaMethod",
    "attention_mask_of",
    "default_forward",
    "find_blocks",
    "input_readers",
    "layer_groups",
    "one_shot_allocations",
    "one_shot_prune",
    "outlier_ratios",
    "owl_sparsities",
    "refuse_sharded",
    "row_mask",
    "row_masks",
    "sparsegpt_prune",
    "wanda_score",
    "wanda_scores",
]


def __getattr__(name: str) -> Any:
    if name == "ONE_SHOT_ALLOCATIONS":  # deprecated: one_shot_allocations(), a view of core.allocation.ALLOCATIONS
        return getattr(_prune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
