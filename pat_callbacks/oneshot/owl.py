"""OWL, outlier-weighted layer-wise sparsity: an allocation (``allocation="owl"``), whose math lives in
:mod:`pat_callbacks.core.owl` (the core's allocations use it too); this module keeps its former path.

Example:
    >>> from pat_callbacks.oneshot.owl import owl_sparsities
    >>> import torch
    >>> owl_sparsities({"a": torch.ones(4), "b": torch.ones(4)}, 0.5)
    {'a': 0.5, 'b': 0.5}
"""

from pat_callbacks.core.owl import OWL_LAMBDA, OWL_M, check_owl_lambda, layer_groups, outlier_ratios, owl_sparsities

__all__ = ["OWL_LAMBDA", "OWL_M", "check_owl_lambda", "layer_groups", "outlier_ratios", "owl_sparsities"]
