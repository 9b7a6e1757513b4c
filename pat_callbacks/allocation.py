"""Split a global target sparsity over layers: ``allocate(scores_by_layer, target) -> {layer: sparsity}``.

- ``uniform``: every layer gets the target (the simplest baseline; small first layers suffer most).
- ``global``: one score threshold across all layers, so layers with many low scores are pruned more;
  the overall sparsity equals the target exactly (to the nearest weight).
- ``erk`` / ``er``: Erdos-Renyi(-Kernel) (Mocanu et al. 2018; Evci et al. 2020): layer density proportional to
  ``sum(shape) / prod(shape)`` (``er``: of the first two dimensions only), scaled to the global target; layers
  that would exceed density 1 are kept dense and the rest rescaled. Depends on shapes only, not on scores.

Example:
    >>> import torch
    >>> scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    >>> allocate("uniform", scores, 0.5)
    {'a': 0.5, 'b': 0.5}
    >>> allocate("global", scores, 0.5)
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from pat_callbacks._validation import check_choice, check_fraction
from pat_callbacks.patterns import prune_count

__all__ = ["ALLOCATIONS", "allocate", "erdos_renyi_allocation", "global_allocation", "uniform_allocation"]


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


def erdos_renyi_allocation(
    scores_by_layer: dict[str, Tensor], target: float, *, kernel: bool = True
) -> dict[str, float]:
    """ERK (``kernel=True``) or ER densities for an overall ``target`` sparsity.

    Kept counts are rounded with largest remainders, so the overall count is exact to the weight.

    Example:
        >>> import torch
        >>> shapes = {"conv": torch.zeros(25, 1, 5), "fc": torch.zeros(10, 125)}
        >>> {k: round(v, 4) for k, v in erdos_renyi_allocation(shapes, 0.5).items()}
        {'conv': 0.0, 'fc': 0.5504}
    """
    shapes = {name: tuple(s.shape) for name, s in scores_by_layer.items()}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _erdos_renyi_score(shape, kernel) for name, shape in shapes.items()}
    density = 1.0 - target
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[name] for name in dense)
        divisor = sum(raw[name] * numel[name] for name in raw if name not in dense)
        if divisor == 0:
            break
        epsilon = budget / divisor
        over = [name for name in raw if name not in dense and epsilon * raw[name] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda name: raw[name]))
    kept = {name: float(numel[name]) if name in dense else epsilon * raw[name] * numel[name] for name in shapes}
    total = sum(numel.values())
    counts = _largest_remainder(kept, total - prune_count(total, target), numel)
    return {name: 1.0 - counts[name] / numel[name] for name in shapes}


def _erdos_renyi_score(shape: tuple[int, ...], kernel: bool) -> float:
    dims = shape if kernel or len(shape) < 2 else shape[:2]
    return sum(dims) / math.prod(dims)


def _largest_remainder(ideal: dict[str, float], total: int, capacity: dict[str, int]) -> dict[str, int]:
    """Integer counts close to ``ideal`` that sum to ``total`` (each at most its capacity)."""
    counts = {name: min(capacity[name], math.floor(value)) for name, value in ideal.items()}
    order = sorted(ideal, key=lambda name: ideal[name] - math.floor(ideal[name]), reverse=True)
    missing = total - sum(counts.values())
    while missing > 0:
        progressed = False
        for name in order:
            if missing and counts[name] < capacity[name]:
                counts[name] += 1
                missing -= 1
                progressed = True
        if not progressed:
            break
    return counts


ALLOCATIONS: dict[str, Callable[[dict[str, Tensor], float], dict[str, float]]] = {
    "uniform": uniform_allocation,
    "global": global_allocation,
    "erk": erdos_renyi_allocation,
    "er": partial(erdos_renyi_allocation, kernel=False),
}


def allocate(method: str, scores_by_layer: dict[str, Tensor], target: float) -> dict[str, float]:
    """Per-layer sparsities for ``target`` by the named method (see module docstring)."""
    check_choice("allocation", method, ALLOCATIONS)
    target = check_fraction("target", target, allow_one=False)
    return ALLOCATIONS[method](scores_by_layer, target)
