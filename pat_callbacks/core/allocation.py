"""Split a global target sparsity over layers: ``allocate(allocation, scores_by_layer, target) -> {layer: sparsity}``.

- ``uniform``: every layer gets the target (the simplest baseline; small first layers suffer most).
- ``global``: one threshold over all layers' scores after dividing each layer's scores by their mean, so
  criteria whose scale differs between layers stay comparable (raw global magnitude can wipe out a layer whose
  weights are small). The overall count is exact to the weight.
- ``global_raw``: the same threshold on raw scores (what most libraries call global pruning).
- ``erk`` / ``er``: Erdos-Renyi(-Kernel) (Mocanu et al. 2018; Evci et al. 2020): density proportional to
  ``sum(shape) / prod(shape)`` (``er``: of the first two dimensions only), scaled to the target; layers that
  would exceed density 1 are kept dense and the rest rescaled. Shapes only, not scores.
- ``sensitivity``: density proportional to each layer's measured sensitivity (loss increase when that layer
  alone is pruned; see :func:`measure_sensitivity`), so the least sensitive layers are pruned most.
- ``owl``: OWL (Yin et al. 2024, :mod:`~pat_callbacks.core.owl`): layers (transformer blocks) with more outlier
  scores are pruned less, within ``target +- owl_lambda``; one-shot pruning gives it Wanda scores.

``global``, ``global_raw`` and ``sensitivity`` honour per-layer ``min_sparsity`` / ``max_sparsity`` caps.

Every allocation is an :class:`Allocation` in the :data:`ALLOCATIONS` registry: a function
``(scores_by_layer, target, **options) -> {layer: sparsity}`` and what it needs (scores or shapes only, measured
sensitivities, calibration statistics), so :func:`allocate` is one lookup and a new allocation is one decorated
function (``@ALLOCATIONS.register("name")``, see ``docs/extending.md``).

Example:
    >>> import torch
    >>> scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    >>> allocate("uniform", scores, 0.5)
    {'a': 0.5, 'b': 0.5}
    >>> allocate("global_raw", scores, 0.5)
    {'a': 1.0, 'b': 0.0}
    >>> allocate("global", scores, 0.5)  # same shape of scores in both layers: pruned alike
    {'a': 0.5, 'b': 0.5}
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor

from pat_callbacks.core._validation import check_fraction
from pat_callbacks.core.allocation_rules import (
    _max_count,
    erdos_renyi_allocation,
    global_allocation,
    mean_scale,
    measure_sensitivity,
    sensitivity_allocation,
    uniform_allocation,
)
from pat_callbacks.core.owl import OWL_LAMBDA, OWL_M, owl_sparsities
from pat_callbacks.core.patterns import prune_count
from pat_callbacks.core.registry import Registry

__all__ = [
    "ALLOCATIONS",
    "SHAPE_ALLOCATIONS",
    "Allocation",
    "allocate",
    "erdos_renyi_allocation",
    "global_allocation",
    "mean_scale",
    "measure_sensitivity",
    "plan_sparsities",
    "reachable_range",
    "sensitivity_allocation",
    "uniform_allocation",
]


@dataclass(frozen=True)
class Allocation:
    """An allocation: ``fn(scores_by_layer, target, **options) -> {layer: sparsity}`` and what it needs.

    ``options`` are the keywords :func:`allocate` passes on (``keep_one``, ``min_sparsity``, ``max_sparsity``,
    ``sensitivities``, ``pruned`` and any allocation-specific ones, e.g. ``owl_lambda``): a function takes those it
    uses and ``**options`` for the rest.

    Attributes:
        name: the name used in configs (``allocation="erk"``).
        fn: the split.
        needs_scores: whether it reads the scores' values; ``False``: only their shapes (each layer can then be
            scored and masked in turn, before any other is scored).
        capped: whether it honours the per-layer ``min_sparsity`` / ``max_sparsity`` caps.
        needs_sensitivities: whether it needs measured ``sensitivities`` (a model, batches and a loss).
        needs_calibration: whether its scores are calibration statistics (OWL's Wanda scores): one-shot pruning then
            computes them once on the dense model and plans every layer up front.
        unsharded_because: why it is refused on sharded (FSDP2) parameters, or ``None`` where it works there.

    Example:
        >>> import torch
        >>> ALLOCATIONS["erk"].needs_scores, ALLOCATIONS["owl"].needs_calibration
        (False, True)
        >>> ALLOCATIONS["uniform"]({"a": torch.zeros(2)}, 0.5)
        {'a': 0.5}
    """

    name: str
    fn: Callable[..., dict[str, float]]
    needs_scores: bool = True
    capped: bool = False
    needs_sensitivities: bool = False
    needs_calibration: bool = False
    unsharded_because: str | None = None

    def __call__(self, scores_by_layer: Mapping[str, Tensor], target: float, **options: Any) -> dict[str, float]:
        return self.fn(scores_by_layer, target, **options)

    @classmethod
    def of(cls, obj: Callable[..., dict[str, float]] | Allocation, name: str, **needs: Any) -> Allocation:
        """What :data:`ALLOCATIONS` stores for ``obj``: an :class:`Allocation` named ``name`` (a function gets the
        declared ``needs``)."""
        if isinstance(obj, Allocation):
            return replace(obj, name=name, **needs)
        if not callable(obj):
            raise TypeError(f"Expected a function (scores_by_layer, target, **options) to register, but got {obj!r}")
        return cls(name, obj, **needs)


ALLOCATIONS: Registry[Allocation] = Registry("allocation", wrap=Allocation.of)
"""The allocations by name (see the module docstring); a new one is ``@ALLOCATIONS.register("name", **needs)`` on a
function ``(scores_by_layer, target, **options) -> {layer: sparsity}``."""


class _ShapeAllocations(Collection[str]):
    """The registered allocations that read only the layers' shapes (a view of :data:`ALLOCATIONS`, never a second
    list): each layer can be scored and masked in turn."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in ALLOCATIONS and not ALLOCATIONS[name].needs_scores

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, a in ALLOCATIONS.items() if not a.needs_scores])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(tuple(self))


SHAPE_ALLOCATIONS: Collection[str] = _ShapeAllocations()


def allocate(
    allocation: str,
    scores_by_layer: Mapping[str, Tensor],
    target: float,
    *,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    sensitivities: Mapping[str, float] | None = None,
    keep_one: bool = False,
    pruned: Mapping[str, Tensor] | None = None,
    **options: Any,
) -> dict[str, float]:
    """Per-layer sparsities for ``target`` by the named allocation (see the module docstring).

    ``keep_one`` leaves at least one weight in every layer; ``pruned`` (``True`` = already pruned) makes
    score-based allocations keep those entries pruned (``global``: they score lowest; ``sensitivity``: floors).
    ``options``: allocation-specific keywords (``owl_lambda``, ``owl_m``), passed on.

    Example:
        >>> import torch
        >>> allocate("erk", {"a": torch.zeros(10, 10), "b": torch.zeros(100, 100)}, 0.9)["a"] < 0.9
        True"""
    chosen = ALLOCATIONS[ALLOCATIONS.check(allocation)]
    target = check_fraction("target", target)
    if chosen.needs_sensitivities and sensitivities is None:
        raise ValueError(f"allocation={allocation!r} needs measured `sensitivities`, but got None")
    return chosen(
        scores_by_layer,
        target,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        sensitivities=sensitivities,
        keep_one=keep_one,
        pruned=pruned,
        **options,
    )


def _uniform(
    scores_by_layer: Mapping[str, Tensor], target: float, *, keep_one: bool = False, **_: Any
) -> dict[str, float]:
    return uniform_allocation(scores_by_layer, target, keep_one=keep_one)


def _global(normalize: bool) -> Callable[..., dict[str, float]]:
    def split(
        scores_by_layer: Mapping[str, Tensor],
        target: float,
        *,
        min_sparsity: float = 0.0,
        max_sparsity: float = 1.0,
        keep_one: bool = False,
        pruned: Mapping[str, Tensor] | None = None,
        **_: Any,
    ) -> dict[str, float]:
        return global_allocation(
            scores_by_layer,
            target,
            normalize=normalize,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            keep_one=keep_one,
            pruned=pruned,
        )

    return split


def _erdos_renyi(kernel: bool) -> Callable[..., dict[str, float]]:
    def split(
        scores_by_layer: Mapping[str, Tensor], target: float, *, keep_one: bool = False, **_: Any
    ) -> dict[str, float]:
        return erdos_renyi_allocation(scores_by_layer, target, kernel=kernel, keep_one=keep_one)

    return split


def _sensitivity(
    scores_by_layer: Mapping[str, Tensor],
    target: float,
    *,
    sensitivities: Mapping[str, float],
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    keep_one: bool = False,
    pruned: Mapping[str, Tensor] | None = None,
    **_: Any,
) -> dict[str, float]:
    numel = {name: s.numel() for name, s in scores_by_layer.items()}
    return sensitivity_allocation(
        {name: sensitivities[name] for name in scores_by_layer},
        numel,
        target,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        keep_one=keep_one,
        pruned_counts={name: int(entries.sum()) for name, entries in (pruned or {}).items()},
    )


def _owl(
    scores_by_layer: Mapping[str, Tensor],
    target: float,
    *,
    owl_lambda: float = OWL_LAMBDA,
    owl_m: float = OWL_M,
    **_: Any,
) -> dict[str, float]:
    return owl_sparsities(scores_by_layer, target, owl_lambda=owl_lambda, owl_m=owl_m)


ALLOCATIONS.register(_uniform, name="uniform", needs_scores=False)
ALLOCATIONS.register(_global(True), name="global", capped=True)
ALLOCATIONS.register(_global(False), name="global_raw", capped=True)
ALLOCATIONS.register(_erdos_renyi(True), name="erk", needs_scores=False)
ALLOCATIONS.register(_erdos_renyi(False), name="er", needs_scores=False)
ALLOCATIONS.register(
    _sensitivity,
    name="sensitivity",
    capped=True,
    needs_sensitivities=True,
    unsharded_because="it evaluates the model with each layer pruned alone",
)
ALLOCATIONS.register(
    _owl, name="owl", needs_calibration=True, unsharded_because="its outlier ratios count whole layers"
)


def plan_sparsities(
    allocation: str,
    scores_by_layer: Mapping[str, Tensor],
    target: float,
    *,
    final_target: float | None = None,
    layer_sparsity: Mapping[str, float] | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    sensitivities: Mapping[str, float] | None = None,
    keep_one: bool = False,
    pruned: Mapping[str, Tensor] | None = None,
    **options: Any,
) -> dict[str, float]:
    """Per-layer sparsities for an overall ``target``: ``layer_sparsity`` overrides first, ``allocation`` for the
    rest (``options``: allocation-specific keywords, passed on).

    A layer matched by a ``layer_sparsity`` glob is pinned at its value at the ``final_target`` and follows the
    schedule proportionally before (``value * target / final_target``); the other layers share what is left of
    the budget, so the overall count still meets ``target`` (as far as the pinned layers allow).

    Example:
        >>> import torch
        >>> scores = {"fc1.weight": torch.rand(100), "fc2.weight": torch.rand(100)}
        >>> plan_sparsities("uniform", scores, 0.7, layer_sparsity={"fc1.*": 0.6})
        {'fc1.weight': 0.6, 'fc2.weight': 0.8}
        >>> plan_sparsities("uniform", scores, 0.35, final_target=0.7, layer_sparsity={"fc1.*": 0.6})
        {'fc1.weight': 0.3, 'fc2.weight': 0.4}
    """
    final = final_target or target
    fixed = {}
    for name, scores in scores_by_layer.items():
        value = _pinned(name, layer_sparsity)
        if value is not None:
            fixed[name] = min(value * target / final, value) if final > 0 else value
            if keep_one and prune_count(scores.numel(), fixed[name]) >= scores.numel():
                fixed[name] = (scores.numel() - 1) / scores.numel()
    rest = {name: s for name, s in scores_by_layer.items() if name not in fixed}
    if not rest:
        return fixed
    rest_target = target
    if fixed:
        numel = {name: s.numel() for name, s in scores_by_layer.items()}
        pruned_fixed = sum(prune_count(numel[n], s) for n, s in fixed.items())
        rest_total = sum(numel[n] for n in rest)
        rest_target = (prune_count(sum(numel.values()), target) - pruned_fixed) / rest_total
        rest_target = min(max(rest_target, 0.0), 1.0 - 1.0 / rest_total)
    planned = allocate(
        allocation,
        rest,
        rest_target,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        sensitivities=sensitivities,
        keep_one=keep_one,
        pruned=pruned,
        **options,
    )
    return {**fixed, **planned}


def _pinned(name: str, layer_sparsity: Mapping[str, float] | None) -> float | None:
    for pattern, value in (layer_sparsity or {}).items():
        if fnmatchcase(name, pattern):
            return value
    return None


def reachable_range(
    allocation: str,
    numel: Mapping[str, int],
    *,
    layer_sparsity: Mapping[str, float] | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    keep_one: bool = False,
) -> tuple[float, float]:
    """The lowest and highest overall sparsity ``allocation`` can reach at the end of a schedule, given the per-layer
    caps (``global``, ``global_raw``, ``sensitivity``), the pinned ``layer_sparsity`` layers and ``keep_one``.

    Example:
        >>> reachable_range("global", {"a": 100, "b": 300}, max_sparsity=0.5)
        (0.0, 0.5)
        >>> reachable_range("uniform", {"a": 100, "b": 300}, layer_sparsity={"b": 0.0}, keep_one=True)
        (0.0, 0.2475)
    """
    capped = ALLOCATIONS[allocation].capped
    low = high = 0
    for name, n in numel.items():
        value = _pinned(name, layer_sparsity)
        if value is not None:
            count = prune_count(n, value)
            count = min(count, n - 1) if keep_one else count
            low, high = low + count, high + count
        else:
            low += prune_count(n, min_sparsity) if capped else 0
            high += _max_count(n, max_sparsity if capped else 1.0, keep_one)
    total = sum(numel.values())
    return (low / total, high / total) if total else (0.0, 0.0)
