"""The per-layer rules behind :mod:`~pat_callbacks.core.allocation`'s registered allocations, as pure functions of
scores (or shapes) and a target: ``uniform``, ``global`` / ``global_raw`` (one exact threshold, per-layer caps),
``erk`` / ``er`` (Erdos-Renyi(-Kernel) densities) and ``sensitivity`` (with :func:`measure_sensitivity`).

Example:
    >>> import torch
    >>> global_allocation({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([30.0, 40.0])}, 0.5, normalize=False)
    {'a': 1.0, 'b': 0.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.patterns import prune_count, unstructured_mask
from pat_callbacks.core.selection import ScoredLayer, layer_total, select_lowest

__all__ = [
    "erdos_renyi_allocation",
    "global_allocation",
    "mean_scale",
    "measure_sensitivity",
    "sensitivity_allocation",
    "uniform_allocation",
]


def uniform_allocation(
    scores_by_layer: Mapping[str, Tensor], target: float, *, keep_one: bool = False
) -> dict[str, float]:
    """The same sparsity in every layer (with ``keep_one``, at most all but one weight of each layer).

    Example:
        >>> import torch
        >>> uniform_allocation({"a": torch.zeros(3), "b": torch.zeros(5)}, 0.6)
        {'a': 0.6, 'b': 0.6}
        >>> uniform_allocation({"one": torch.zeros(1), "b": torch.zeros(5)}, 0.9, keep_one=True)
        {'one': 0.0, 'b': 0.9}"""
    if not keep_one:
        return dict.fromkeys(scores_by_layer, target)
    result = {}
    for name, s in scores_by_layer.items():
        n = s.numel()
        result[name] = target if prune_count(n, target) < n else (n - 1) / n
    return result


def global_allocation(
    scores_by_layer: Mapping[str, Tensor],
    target: float,
    *,
    normalize: bool = True,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    keep_one: bool = False,
    pruned: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """One threshold over all layers' (mean-normalised) scores, with per-layer caps.

    Caps are met by water-filling: a layer that would pass a cap is fixed at it and the threshold is found again
    over the other layers with what is left of the budget. ``keep_one`` caps every layer at all but one weight;
    entries marked in ``pruned`` (``True`` = already pruned) score lowest, so they stay pruned.

    Example:
        >>> import torch
        >>> scores = {"a": torch.arange(1.0, 5.0), "b": torch.arange(10.0, 50.0, 10.0)}
        >>> global_allocation(scores, 0.5, normalize=False, max_sparsity=0.75)
        {'a': 0.75, 'b': 0.25}
    """
    flat = {name: s.detach().reshape(-1).float() for name, s in scores_by_layer.items()}
    if normalize:
        flat = {name: s / mean_scale(layer_total(ScoredLayer.of(s)), s.numel()) for name, s in flat.items()}
    for name, entries in (pruned or {}).items():
        if name in flat:
            flat[name] = flat[name].masked_fill(entries.reshape(-1).to(flat[name].device), float("-inf"))
    numel = {name: s.numel() for name, s in flat.items()}
    ceiling = {name: _max_count(n, max_sparsity, keep_one) for name, n in numel.items()}
    budget = prune_count(sum(numel.values()), target)
    fixed: dict[str, int] = {}
    while True:
        free = {name: s for name, s in flat.items() if name not in fixed}
        remaining = max(0, budget - sum(fixed.values()))
        counts = _threshold_counts(free, min(remaining, sum(numel[n] for n in free)))
        over = {n for n, c in counts.items() if c > ceiling[n]}
        under = {n for n, c in counts.items() if c < prune_count(numel[n], min_sparsity)}
        if not free or not (over or under):
            counts.update(fixed)
            return {name: counts[name] / numel[name] for name in flat}
        for name in over:
            fixed[name] = ceiling[name]
        if not over:  # raise the layers below their floor only once no layer is over its ceiling
            for name in under:
                fixed[name] = prune_count(numel[name], min_sparsity)


def mean_scale(total: float, numel: int) -> float:
    """What ``allocation="global"`` divides a layer's scores by: their mean (``total / numel``, the total summed chunk
    by chunk, see :func:`~pat_callbacks.core.selection.layer_total`), or 1 where the mean is not positive. The one
    definition every selection path uses.

    Example:
        >>> mean_scale(50.0, 100), mean_scale(0.0, 100)
        (0.5, 1.0)
    """
    mean = total / numel if numel else 0.0
    return mean if mean > 0 else 1.0


def _max_count(numel: int, max_sparsity: float, keep_one: bool) -> int:
    """The most entries a layer may lose: its ``max_sparsity`` cap, and with ``keep_one`` all but one."""
    return min(prune_count(numel, max_sparsity), numel - 1 if keep_one else numel)


def _threshold_counts(flat: Mapping[str, Tensor], n_prune: int) -> dict[str, int]:
    """Per-layer counts of the ``n_prune`` lowest scores overall (the one exact selection,
    :func:`~pat_callbacks.core.selection.select_lowest`: ties in layer order, then index order)."""
    if n_prune <= 0 or not flat:
        return dict.fromkeys(flat, 0)
    chosen = select_lowest(list(flat.values()), n_prune)
    return {name: int(mask.sum()) for name, mask in zip(flat, chosen, strict=True)}


def erdos_renyi_allocation(
    scores_by_layer: Mapping[str, Tensor], target: float, *, kernel: bool = True, keep_one: bool = False
) -> dict[str, float]:
    """ERK (``kernel=True``) or ER densities for an overall ``target`` sparsity.

    Kept counts are rounded with largest remainders, so the overall count is exact to the weight. With
    ``keep_one``, a layer that would keep less than one weight keeps one and the others are rescaled.

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
    fixed: dict[str, float] = {}  # kept counts of layers kept dense (or, with keep_one, at one weight)
    epsilon = 0.0
    while True:
        budget = density * sum(numel.values()) - sum(fixed.values())
        divisor = sum(raw[name] * numel[name] for name in raw if name not in fixed)
        if divisor == 0:
            break
        epsilon = budget / divisor
        over = [name for name in raw if name not in fixed and epsilon * raw[name] > 1.0]
        if over:
            name = max(over, key=lambda name: raw[name])
            fixed[name] = float(numel[name])
            continue
        under = [name for name in raw if name not in fixed and epsilon * raw[name] * numel[name] < 1.0]
        if not keep_one or not under:
            break
        fixed.update(dict.fromkeys(under, 1.0))
    kept = {name: fixed[name] if name in fixed else epsilon * raw[name] * numel[name] for name in shapes}
    total = sum(numel.values())
    counts = _largest_remainder(kept, total - prune_count(total, target), numel)
    return {name: 1.0 - counts[name] / numel[name] for name in shapes}


def _erdos_renyi_score(shape: tuple[int, ...], kernel: bool) -> float:
    dims = shape if kernel or len(shape) < 2 else shape[:2]
    return sum(dims) / math.prod(dims)


def sensitivity_allocation(
    sensitivities: Mapping[str, float],
    numel: Mapping[str, int],
    target: float,
    *,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    keep_one: bool = False,
    pruned_counts: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Densities proportional to sensitivity (clipped to the caps), scaled so the overall count is exact.

    ``keep_one`` keeps at least one weight per layer; ``pruned_counts`` are floors (entries already pruned).

    Example:
        >>> s = sensitivity_allocation({"robust": 0.01, "fragile": 1.0}, {"robust": 100, "fragile": 100}, 0.5)
        >>> s["robust"] > 0.5 > s["fragile"]
        True
    """
    names = list(sensitivities)
    values = {name: max(float(sensitivities[name]), 0.0) for name in names}
    mean = sum(values.values()) / len(values) if values else 0.0
    weight = {name: (values[name] + 1e-3 * mean + 1e-12) for name in names}
    low = {name: 1.0 - _max_count(numel[name], max_sparsity, keep_one) / numel[name] for name in names}
    high = {name: 1.0 - max(prune_count(numel[name], min_sparsity), 0) / numel[name] for name in names}
    for name, count in (pruned_counts or {}).items():
        if name in high:
            high[name] = max(low[name], min(high[name], 1.0 - count / numel[name]))
    total = sum(numel[name] for name in names)
    keep_total = total - prune_count(total, target)

    def kept(scale: float) -> float:
        return sum(min(high[n], max(low[n], scale * weight[n])) * numel[n] for n in names)

    lo, hi = 0.0, 1.0
    while kept(hi) < keep_total and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < keep_total else (lo, mid)
    ideal = {n: min(high[n], max(low[n], hi * weight[n])) * numel[n] for n in names}
    capacity = {n: round(high[n] * numel[n]) for n in names}
    counts = _largest_remainder(ideal, keep_total, capacity)
    return {name: 1.0 - counts[name] / numel[name] for name in names}


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    scores: Mapping[str, Tensor],
    probe_sparsity: float,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
) -> dict[str, float]:
    """Loss increase when each layer alone is pruned to ``probe_sparsity`` by ``scores`` (Li et al. 2016).

    The model is evaluated in eval mode on ``batches``; every weight is restored afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
        >>> scores = {name: p.abs() for name, p in params.items()}
        >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> sorted(measure_sensitivity(model, params, scores, 0.5, [batch], loss))
        ['0.weight', '2.weight']
    """
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        base = _mean_loss(model, batches, loss_fn)
        result = {}
        for name, param in params.items():
            original = param.detach().clone()
            param.mul_(unstructured_mask(scores[name], probe_sparsity).to(param.dtype))
            result[name] = _mean_loss(model, batches, loss_fn) - base
            param.copy_(original)
    finally:
        model.train(was_training)
    return result


def _mean_loss(model: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> float:
    return sum(float(loss_fn(model, batch)) for batch in batches) / max(len(batches), 1)


def _largest_remainder(ideal: Mapping[str, float], total: int, capacity: Mapping[str, int]) -> dict[str, int]:
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
