"""How many entries each layer prunes at one update: the plan, made once per update.

An :class:`UpdatePlan` splits an overall target into layers that reach a sparsity of their own (``per_layer``:
uniform, ERK, pinned ``layer_sparsity`` layers, or every layer when the split depends on scores) and layers that share
one threshold over their scores (``shared``: the global allocations), with that group's exact budget. The selection
(:mod:`pat_callbacks.core.updates`) then only executes the plan, streamed or exact, in one process or over ranks.

Example:
    >>> from pat_callbacks.core.options import PruningOptions
    >>> planner = Planner(PruningOptions(allocation="global", layer_sparsity={"a": 0.5}), {"a": (100,), "b": (30, 10)})
    >>> plan = planner.plan(0.8)
    >>> plan.per_layer, plan.shared, plan.shared_budget, plan.scaled
    ({'a': 0.5}, ('b',), 270, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor

from pat_callbacks.core.allocation import SHAPE_ALLOCATIONS, plan_sparsities, reachable_range
from pat_callbacks.core.options import PruningOptions
from pat_callbacks.core.patterns import UnstructuredPattern, prune_count

__all__ = ["Planner", "UpdatePlan"]


@dataclass(frozen=True)
class UpdatePlan:
    """The per-layer split of one update.

    Attributes:
        sparsity: the overall target.
        per_layer: ``{name: sparsity}`` of the layers that reach a sparsity of their own.
        shared: the layers pruned by one threshold over their scores, in model order.
        shared_budget: entries of ``shared`` pruned after the update, in total (every layer keeps one).
        scaled: whether ``shared`` scores are divided by each layer's mean (``allocation="global"``).

    Example:
        >>> UpdatePlan(0.5, {"w": 0.5}).per_layer
        {'w': 0.5}
    """

    sparsity: float
    per_layer: dict[str, float]
    shared: tuple[str, ...] = ()
    shared_budget: int = 0
    scaled: bool = False


class Planner:
    """Plans updates for fixed options over parameters of fixed sizes.

    Args:
        options: the pruning options.
        shapes: ``{name: shape}`` of the pruned parameters (whole, not a rank's shard).

    Example:
        >>> from pat_callbacks.core.options import PruningOptions
        >>> Planner(PruningOptions(allocation="erk"), {"a": (10, 10), "b": (100, 100)}).plan(0.9).per_layer["a"] < 0.9
        True
    """

    def __init__(self, options: PruningOptions, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.options = options
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.numel = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self._warned_nearly_empty: set[str] = set()

    @property
    def one_threshold(self) -> bool:
        """Global allocations without caps on unstructured masks: one exact selection over all layers."""
        opts = self.options
        return (
            opts.allocation in ("global", "global_raw")
            and opts.min_sparsity == 0.0
            and opts.max_sparsity == 1.0
            and isinstance(opts.pattern, UnstructuredPattern)
        )

    @property
    def by_shape(self) -> bool:
        """Whether the split is known before any score is (shape allocations, or one threshold)."""
        return self.options.allocation in SHAPE_ALLOCATIONS or self.one_threshold

    def plan(self, sparsity: float, final_target: float | None = None) -> UpdatePlan | None:
        """The plan from the layers' sizes alone, or ``None`` when the split depends on scores (caps, sensitivity):
        then use :meth:`plan_from_scores`."""
        if not self.by_shape:
            return None
        opts = self.options
        shapes = {name: torch.empty(shape, device="meta") for name, shape in self.shapes.items()}
        method = "uniform" if opts.allocation in ("global", "global_raw") else opts.allocation
        planned = plan_sparsities(
            method, shapes, sparsity, final_target=final_target, layer_sparsity=opts.layer_sparsity, keep_one=True
        )
        if method == opts.allocation:
            return UpdatePlan(sparsity, planned)
        pinned = {n: planned[n] for n in self.numel if any(fnmatchcase(n, p) for p in opts.layer_sparsity or {})}
        shared = tuple(n for n in self.numel if n not in pinned)
        budget = prune_count(sum(self.numel.values()), sparsity) - sum(
            prune_count(self.numel[n], s) for n, s in pinned.items()
        )
        budget = min(max(budget, 0), sum(self.numel[n] for n in shared) - len(shared))
        return UpdatePlan(sparsity, pinned, shared, budget, scaled=opts.allocation == "global")

    def plan_from_scores(
        self,
        scores: Mapping[str, Tensor],
        sparsity: float,
        final_target: float | None = None,
        *,
        sensitivities: Mapping[str, float] | None = None,
        pruned: Mapping[str, Tensor] | None = None,
    ) -> UpdatePlan:
        """Every layer's sparsity from whole scores by the allocation, with its caps and floors (``pruned``: entries
        that stay pruned)."""
        opts = self.options
        planned = plan_sparsities(
            opts.allocation,
            scores,
            sparsity,
            final_target=final_target,
            layer_sparsity=opts.layer_sparsity,
            min_sparsity=opts.min_sparsity,
            max_sparsity=opts.max_sparsity,
            sensitivities=sensitivities,
            keep_one=True,
            pruned=pruned,
        )
        return UpdatePlan(sparsity, planned)

    def check_reachable(self, final_sparsity: float, key: str = "final_sparsity") -> None:
        """Refuse a final target the allocation cannot reach (caps, pinned layers, one weight kept per layer),
        naming the keys and the reachable range."""
        opts = self.options
        if opts.pattern.fixed_sparsity is not None:  # type: ignore[union-attr]
            return
        low, high = reachable_range(
            opts.allocation,
            self.numel,
            layer_sparsity=opts.layer_sparsity,
            min_sparsity=opts.min_sparsity,
            max_sparsity=opts.max_sparsity,
            keep_one=True,
        )
        total = sum(self.numel.values())
        target = round(final_sparsity * total)
        if round(low * total) <= target <= round(high * total) or final_sparsity == 0.0:
            return
        keys = [f"allocation={opts.allocation!r}"]
        if opts.allocation in ("global", "global_raw", "sensitivity"):
            keys += [f"min_sparsity={opts.min_sparsity:g}"] if opts.min_sparsity > 0 else []
            keys += [f"max_sparsity={opts.max_sparsity:g}"] if opts.max_sparsity < 1 else []
        if opts.layer_sparsity:
            keys.append(f"layer_sparsity={dict(opts.layer_sparsity)!r}")
        raise ValueError(
            f"{key}={final_sparsity:g} cannot be reached with {', '.join(keys)}; reachable: [{low:.4g}, {high:.4g}] "
            f"overall over the {total} pruned weights (every layer keeps at least one)"
        )

    def warn_nearly_empty(self, sparsities: Mapping[str, float], step: int | None, owner: str = "Pruner") -> None:
        """Warn (once per layer) about a layer pruned past 0.99."""
        for name, value in sparsities.items():
            if value > 0.99 and name not in self._warned_nearly_empty:
                self._warned_nearly_empty.add(name)
                where = f" at step {step}" if step is not None else ""
                numel = self.numel[name]
                warnings.warn(
                    f"{owner}: {name!r} is pruned to {value:.4g} (over 0.99){where}, keeping "
                    f"{numel - round(value * numel)} of {numel} weights: the layer nearly cuts the network off; pin "
                    "it lower with `layer_sparsity` or leave it out with `exclude`",
                    UserWarning,
                    stacklevel=4,
                )
