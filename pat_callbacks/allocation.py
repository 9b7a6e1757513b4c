"""Split a global target sparsity over layers: ``allocate(scores_by_layer, target) -> {layer: sparsity}``.

- ``uniform``: every layer gets the target (the simplest baseline; small first layers suffer most).
- ``global``: one score threshold across all layers, so layers with many low scores are pruned more;
  the overall sparsity equals the target exactly (to the nearest weight).

Example:
    >>> import torch
    >>> scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    >>> allocate("uniform", scores, 0.5)
    {'a': 0.5, 'b': 0.5}
    >>> allocate("global", scores, 0.5)
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pat_callbacks._validation import check_choice, check_fraction
from pat_callbacks.patterns import prune_count

__all__ = ["ALLOCATIONS", "allocate", "global_allocation", "uniform_allocation"]


def uniform_allocation(scores_by_layer: dict[str, Tensor], target: float) -> dict[str, float]:
    """The same sparsity in every layer."""
    return dict.fromkeys(scores_by_layer, target)


def global_allocation(scores_by_layer: dict[str, Tensor], target: float) -> dict[str, float]:
    """One threshold over the concatenated scores of all layers (a k-th value selection, not a sort).

    Ties at the threshold are assigned in layer order so the total pruned count is exact.
    """
    flat = {name: s.detach().reshape(-1).float() for name, s in scores_by_layer.items()}
    total = sum(s.numel() for s in flat.values())
    n_prune = prune_count(total, target)
    if n_prune == 0:
        return dict.fromkeys(flat, 0.0)
    device = next(iter(flat.values())).device
    everything = torch.cat([s.to(device) for s in flat.values()])
    threshold = torch.kthvalue(everything, n_prune).values
    below = {name: int((s < threshold).sum()) for name, s in flat.items()}
    remaining = n_prune - sum(below.values())
    result = {}
    for name, s in flat.items():
        ties = min(remaining, int((s == threshold).sum())) if remaining > 0 else 0
        remaining -= ties
        result[name] = (below[name] + ties) / s.numel()
    return result


ALLOCATIONS: dict[str, Callable[[dict[str, Tensor], float], dict[str, float]]] = {
    "uniform": uniform_allocation,
    "global": global_allocation,
}


def allocate(method: str, scores_by_layer: dict[str, Tensor], target: float) -> dict[str, float]:
    """Per-layer sparsities for ``target`` by the named method (see module docstring)."""
    check_choice("allocation", method, ALLOCATIONS)
    target = check_fraction("target", target, allow_one=False)
    return ALLOCATIONS[method](scores_by_layer, target)
