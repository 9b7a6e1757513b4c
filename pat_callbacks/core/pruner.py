"""The Trainer-free pruning core: criterion -> allocation -> pattern -> mask store, over a model's parameters.

:class:`Pruner` is what the Lightning callbacks drive, and what a plain PyTorch loop (or another trainer) can
drive directly. It never imports ``lightning`` and keeps no notion of steps: the caller decides *when*
(e.g. with a :mod:`~pat_callbacks.core.schedules` schedule) and the pruner does *which weights*.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pat_callbacks.core.schedules import CubicSchedule
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    >>> pruner = Pruner(model, criterion="taylor", allocation="global")
    >>> schedule = CubicSchedule(final_sparsity=0.8, start_step=10, end_step=50, update_every=10)
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> for step in range(60):
    ...     optimizer.zero_grad()
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     pruner.accumulate()                      # gradient criteria keep a history; a no-op for magnitude
    ...     if schedule.is_update_step(step):
    ...         _ = pruner.prune_to(schedule(step), optimizers=[optimizer])  # False if scores were NaN/Inf
    ...     pruner.mask_grads()                      # pruned weights get no update
    ...     optimizer.step()
    >>> round(pruner.sparsity(), 4), float((model[0].weight == 0).float().mean()) > 0.5
    (0.8, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core import selection
from pat_callbacks.core._validation import check_choice, check_fraction
from pat_callbacks.core.allocation import ALLOCATIONS, measure_sensitivity, plan_sparsities, reachable_range
from pat_callbacks.core.criteria import Criterion, get_criterion
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.patterns import BlockPattern, NMPattern, Pattern, UnstructuredPattern, make_pattern, prune_count
from pat_callbacks.core.regrowth import GROWTH_METHODS, swapped_entries
from pat_callbacks.core.selection import (
    NonFiniteScores,
    ScoredLayer,
    all_finite,
    select_lowest,
    select_lowest_streamed,
    sum_over_ranks,
)
from pat_callbacks.core.sharding import gather_full, local, local_rows
from pat_callbacks.core.targets import normalize_patterns, select_parameters, target_roles

__all__ = ["SHAPE_ALLOCATIONS", "Pruner", "PruningOptions", "broadcast_masks"]

# Allocations that split the target from the layers' shapes alone: each layer can be scored and masked in turn.
SHAPE_ALLOCATIONS = ("uniform", "erk", "er")


@dataclass
class PruningOptions:
    """What to prune and how, validated at construction (before any model is seen).

    Args:
        criterion: importance score: ``"magnitude"``, ``"taylor"``, ``"movement"``, ``"fisher"``, ``"random"``
            or a :class:`~pat_callbacks.core.criteria.Criterion`.
        allocation: how an overall target is split over layers: ``"uniform"``, ``"global"`` (mean-normalised
            scores), ``"global_raw"``, ``"erk"``, ``"er"``, ``"sensitivity"`` (see
            :mod:`pat_callbacks.core.allocation`).
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``) or ``"block:RxC"`` (see
            :mod:`pat_callbacks.core.patterns`).
        include: glob patterns of parameter names to prune (default: see :mod:`pat_callbacks.core.targets`).
        exclude: glob patterns of parameter names to keep dense.
        keep_first, keep_last: keep the first / last pruned parameter (in model order) dense.
        layer_sparsity: ``{glob pattern: final sparsity}`` for layers pinned at a given sparsity.
        min_sparsity, max_sparsity: per-layer caps for ``global``, ``global_raw`` and ``sensitivity``.
        allow_vectors: let ``include`` select norm gains and biases (refused by default: rarely intended).

    Example:
        >>> PruningOptions(allocation="global", max_sparsity=0.95).allocation
        'global'
        >>> PruningOptions(pattern="2:4", allocation="global")
        Traceback (most recent call last):
        ...
        ValueError: pattern='2:4' fixes the sparsity of every layer: use allocation='uniform', not 'global'
    """

    criterion: str | Criterion = "magnitude"
    allocation: str = "uniform"
    pattern: str | Pattern = "unstructured"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    keep_first: bool = False
    keep_last: bool = False
    layer_sparsity: Mapping[str, float] | None = field(default=None)
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    allow_vectors: bool = False

    def __post_init__(self) -> None:
        self.criterion = get_criterion(self.criterion)
        self.allocation = check_choice("allocation", self.allocation, ALLOCATIONS)
        self.pattern = make_pattern(self.pattern)
        self.include = normalize_patterns("include", self.include)
        self.exclude = normalize_patterns("exclude", self.exclude)
        self.keep_first, self.keep_last = bool(self.keep_first), bool(self.keep_last)
        self.allow_vectors = bool(self.allow_vectors)
        if self.layer_sparsity is not None and not isinstance(self.layer_sparsity, Mapping):
            raise ValueError(
                f"Expected `layer_sparsity` to be a mapping of pattern -> sparsity, got {self.layer_sparsity!r}"
            )
        self.layer_sparsity = {
            str(pattern): check_fraction(f"layer_sparsity[{pattern!r}]", value)
            for pattern, value in (self.layer_sparsity or {}).items()
        }
        self.min_sparsity = check_fraction("min_sparsity", self.min_sparsity, allow_one=True)
        self.max_sparsity = check_fraction("max_sparsity", self.max_sparsity, allow_one=True)
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(
                f"Expected `min_sparsity` <= `max_sparsity`, but got {self.min_sparsity} > {self.max_sparsity}"
            )
        if self.pattern.fixed_sparsity is not None and self.allocation != "uniform":
            raise ValueError(
                f"pattern={self.pattern.name!r} fixes the sparsity of every layer: use allocation='uniform', "
                f"not {self.allocation!r}"
            )


class Pruner:
    """Masks over a model's prunable parameters, scored by a criterion, split by an allocation, shaped by a pattern.

    Args:
        model_or_params: a module (its targets are chosen by ``include`` / ``exclude``, see
            :func:`~pat_callbacks.core.targets.select_parameters`) or a ``{name: parameter}`` mapping used as given.
        options: a :class:`PruningOptions`; or give its fields as keyword arguments.

    The main calls, in the order a training step makes them: :meth:`accumulate` (after ``backward``, for
    criteria with history), :meth:`prune_to` / :meth:`regrow` at update steps, :meth:`mask_grads` before
    ``optimizer.step()``. Pass the optimizers to :meth:`prune_to` / :meth:`regrow` (or call
    :meth:`reset_optimizer_state`) so momentum and Adam moments of newly pruned weights are zeroed.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        >>> pruner = Pruner(model, allocation="global")
        >>> pruner.prune_to(0.5)
        True
        >>> pruner.sparsity(), sorted(pruner.params)
        (0.5, ['0.weight', '1.weight'])
        >>> Pruner(model, criterion="snip")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `criterion` 'snip'; expected one of: 'fisher', 'magnitude', 'movement', 'random', 'taylor'
    """

    def __init__(
        self,
        model_or_params: nn.Module | Mapping[str, nn.Parameter],
        options: PruningOptions | None = None,
        **kwargs: Any,
    ) -> None:
        if options is not None and kwargs:
            raise TypeError(f"Give either `options` or keyword options, not both (got {sorted(kwargs)})")
        self.options = options if options is not None else PruningOptions(**kwargs)
        self.model = model_or_params if isinstance(model_or_params, nn.Module) else None
        _refuse_uninitialized(model_or_params)
        params = self._select(model_or_params)
        roles = target_roles(self.model) if self.model is not None else {}
        # Matrices stored in x out (Hugging Face Conv1D): patterns run along their inputs, i.e. on the transpose.
        self.transposed = {name for name in params if name in roles and roles[name].transposed}
        for name, param in params.items():
            shape = tuple(param.shape)
            self.options.pattern.check(name, shape[::-1] if name in self.transposed else shape)  # type: ignore[union-attr]
        self.criterion: Criterion = self.options.criterion  # type: ignore[assignment]
        frozen = [name for name, param in params.items() if not param.requires_grad]
        if frozen and self.criterion.needs_grad:
            raise ValueError(
                f"criterion={self.scorer_name!r} reads gradients, but {frozen} are frozen (requires_grad=False) and "
                "get none: exclude them, or use criterion='magnitude'"
            )
        self.store = MaskStore(params)
        self.group = self.store.group  # set when the parameters are sharded (FSDP2): masks are local shards
        if self.group is not None:
            self._check_shardable()
        self.criterion_state: dict[str, dict[str, Tensor]] = {}
        self.target_sparsity = 0.0
        self.sensitivities: dict[str, float] | None = None
        self.last_changed: dict[str, Tensor] = {}  # entries pruned or regrown at the last update
        self._warned_nearly_empty: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.params)} parameters, sparsity={self.sparsity():.4f})"

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the pruned parameters."""
        return self.store.params

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{name: bool mask}`` of the currently masked parameters (``True`` = kept)."""
        return self.store.masks

    @property
    def needs_grad(self) -> bool:
        """Whether scoring reads gradients (then ``prune_to`` must run between ``backward`` and the step)."""
        return self.criterion.needs_grad

    @property
    def scorer_name(self) -> str:
        """The criterion's name, for messages and reports."""
        return self.criterion.name or type(self.criterion).__name__

    # ------------------------------------------------------------------ scoring
    def accumulate(self) -> None:
        """Add this step's weights and dense gradients to the criterion's history (no-op without history).

        Call after ``backward`` and before :meth:`mask_grads`, while pruning is under way.
        """
        if not self.criterion.needs_history:
            return
        for name, param in self.params.items():
            if param.grad is not None:
                self.criterion.accumulate(local(param), local(param.grad), self.criterion_state.setdefault(name, {}))

    def scores(self) -> dict[str, Tensor]:
        """Importance of every entry of every pruned parameter (higher = keep); this rank's rows when sharded."""
        return {name: self._score(name) for name in self.params}

    def _score(self, name: str) -> Tensor:
        param = self.params[name]
        if self.criterion.needs_grad and param.grad is None:
            raise RuntimeError(f"criterion={self.scorer_name!r} needs a gradient, but {name!r} has none")
        grad = None if param.grad is None else local(param.grad)
        return self.criterion.score(local(param), grad, self.criterion_state.get(name, {}))

    def measure_sensitivity(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        probe_sparsity: float = 0.9,
        model: nn.Module | None = None,
    ) -> dict[str, float]:
        """Measure (and keep, for ``allocation="sensitivity"``) each layer's loss increase when pruned alone.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> pruner = Pruner(model, allocation="sensitivity")
            >>> batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
            >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
            >>> sorted(pruner.measure_sensitivity([batch], loss, 0.5))
            ['0.weight', '2.weight']
        """
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("measure_sensitivity needs the model: build the Pruner from it or pass `model`")
        self.sensitivities = measure_sensitivity(model, self.params, self.scores(), probe_sparsity, batches, loss_fn)
        return self.sensitivities

    # ------------------------------------------------------------------ updates
    def prune_to(
        self,
        sparsity: float,
        *,
        final_sparsity: float | None = None,
        scores: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        step: int | None = None,
    ) -> bool:
        """Mask to ``sparsity`` overall (``0.0`` lifts every mask): score, allocate, shape, commit.

        Args:
            sparsity: the overall target now.
            final_sparsity: the target at the end of the schedule (``layer_sparsity`` layers follow it
                proportionally); default ``sparsity``.
            scores: scores to use instead of the criterion's (e.g. random scores for a random initial mask).
            optimizers: their state for newly pruned entries is zeroed.
            step: only for the warning below.

        Returns ``False`` (masks untouched, with a warning) when a score is NaN or infinite; the criterion's history
        restarts, so the next call tries again on clean numbers.

        Masks only shrink while the target does not go down: entries pruned before stay pruned, whatever the
        criterion now scores them (gradient criteria would otherwise revive them); a lower target lifts masks. Every
        layer keeps at least one weight, and a layer pruned past 0.99 is warned about (once).
        """
        sparsity = check_fraction("sparsity", sparsity)
        if sparsity == 0.0:
            self.clear()
            return True
        if self.options.allocation == "sensitivity" and self.sensitivities is None:
            raise RuntimeError("allocation='sensitivity' needs measure_sensitivity(...) before the first prune_to")
        if self._streamable(sparsity):
            try:
                chosen = self._prune_streamed(sparsity, final_sparsity, scores, step)
            except _NeedsExactSelection:
                chosen = {}
            except _NonFinite:
                return False
            if self.group is None and not _all_ranks_agree(bool(chosen)):
                chosen = {}  # DDP ranks whose scores differ: all take the exact path, whose masks are broadcast
            if chosen:
                self.target_sparsity = sparsity
                self.prune_entries(chosen, optimizers=optimizers)
                return True
        if self.group is None and self.options.allocation in SHAPE_ALLOCATIONS:
            masks = self._masks_layer_by_layer(sparsity, final_sparsity, scores, step)
        elif self.group is not None or self._one_threshold():
            masks = self._masks_by_selection(sparsity, final_sparsity, scores, step)
        else:
            masks = self._masks_by_allocation(sparsity, final_sparsity, scores, step)
        if masks is None:
            return False
        self.target_sparsity = sparsity
        self.set_masks(masks, optimizers=optimizers)
        return True

    def _masks_by_allocation(
        self, sparsity: float, final_sparsity: float | None, scores: Mapping[str, Tensor] | None, step: int | None
    ) -> dict[str, Tensor] | None:
        """Score every layer, split the target by the allocation (with caps and floors), mask each layer."""
        scores = dict(scores) if scores is not None else self.scores()
        if not self._all_finite(scores, step):
            return None
        pruned = self._pruned_before(sparsity)
        sparsities = plan_sparsities(
            self.options.allocation,
            scores,
            sparsity,
            final_target=final_sparsity,
            layer_sparsity=self.options.layer_sparsity,
            min_sparsity=self.options.min_sparsity,
            max_sparsity=self.options.max_sparsity,
            sensitivities=self.sensitivities,
            keep_one=True,
            pruned=pruned,
        )
        self._warn_nearly_empty(sparsities, step)
        return {name: self._mask(name, scores[name], sparsities[name], (pruned or {}).get(name)) for name in scores}

    def _masks_layer_by_layer(
        self, sparsity: float, final_sparsity: float | None, scores: Mapping[str, Tensor] | None, step: int | None
    ) -> dict[str, Tensor] | None:
        """Allocations that need only shapes (uniform, ERK): each layer is scored and masked in turn, so an update
        holds one layer's scores at a time (plus the new bool masks), not every layer's."""
        shapes = {name: torch.empty(p.shape, device="meta") for name, p in self.params.items()}
        sparsities = plan_sparsities(
            self.options.allocation,
            shapes,
            sparsity,
            final_target=final_sparsity,
            layer_sparsity=self.options.layer_sparsity,
            keep_one=True,
        )
        self._warn_nearly_empty(sparsities, step)
        pruned = self._pruned_before(sparsity) or {}
        masks = {}
        for name in self.params:
            layer = scores[name] if scores is not None else self._score(name)
            if not self._all_finite({name: layer}, step):
                return None
            masks[name] = self._mask(name, layer, sparsities[name], pruned.get(name))
            del layer
        return masks

    # ------------------------------------------------ streamed updates (unstructured and N:M; one process or sharded)
    def _streamable(self, sparsity: float) -> bool:
        """Updates that only shrink unstructured or N:M masks (one process or sharded): scored chunk by chunk, masks
        pruned in place (see :func:`~pat_callbacks.core.selection.select_lowest_streamed`)."""
        opts = self.options
        return (
            (isinstance(opts.pattern, UnstructuredPattern) and opts.allocation in SHAPE_ALLOCATIONS)
            or self._one_threshold()
            or (isinstance(opts.pattern, NMPattern) and opts.allocation == "uniform")
        ) and not (self.masks and sparsity < self.target_sparsity)

    def _prune_streamed(
        self, sparsity: float, final_sparsity: float | None, scores: Mapping[str, Tensor] | None, step: int | None
    ) -> dict[str, Tensor]:
        """The entries to prune now, per parameter (bool, among the kept ones), by streamed selections: per layer
        for uniform / ERK / pinned layers and N:M, one threshold over the other layers for global allocations.
        Raises :class:`_NonFinite` (warned) on NaN/Inf scores and :class:`_NeedsExactSelection` where a streamed pass
        cannot decide (a layer's target below what it already prunes, a layer left empty, a missed bracket)."""
        opts = self.options
        shapes = {name: torch.empty(p.shape, device="meta") for name, p in self.params.items()}
        method = "uniform" if opts.allocation in ("global", "global_raw") else opts.allocation
        planned = plan_sparsities(
            method, shapes, sparsity, final_target=final_sparsity, layer_sparsity=opts.layer_sparsity, keep_one=True
        )
        numel = {name: p.numel() for name, p in self.params.items()}
        kept = {name: mask.reshape(-1) for name, mask in self.masks.items()}
        already = self._pruned_now(kept)
        fixed = [n for n in self.params if any(fnmatchcase(n, p) for p in opts.layer_sparsity or {})]
        per_layer = list(self.params) if method == opts.allocation else fixed
        chosen: dict[str, Tensor] = {}
        for name in per_layer:
            if isinstance(opts.pattern, NMPattern):
                chosen[name] = self._nm_streamed(name, planned[name], kept.get(name), scores, step)
                continue
            needed = prune_count(numel[name], planned[name]) - already[name]
            chosen.update(self._select_streamed([name], needed, kept, scores, step, scaled=False))
        rest = [name for name in self.params if name not in chosen]
        if rest:
            budget = prune_count(sum(numel.values()), sparsity) - sum(prune_count(numel[n], planned[n]) for n in chosen)
            budget = min(max(budget, 0), sum(numel[n] for n in rest) - len(rest))
            selected = self._select_streamed(
                rest, budget - sum(already[n] for n in rest), kept, scores, step, scaled=opts.allocation == "global"
            )
            counts = self._sum_over_ranks([int(selected[n].count_nonzero()) for n in rest])
            if any(already[n] + count >= numel[n] for n, count in zip(rest, counts, strict=True)):
                raise _NeedsExactSelection  # a layer left empty: the allocation keeps one weight per layer
            chosen.update(selected)
        names = list(self.params)
        counts = self._sum_over_ranks([int(chosen[n].count_nonzero()) for n in names])
        self._warn_nearly_empty(
            {n: (already[n] + count) / numel[n] for n, count in zip(names, counts, strict=True)}, step
        )
        return {name: chosen[name].view(local(self.params[name]).shape) for name in self.params}

    def _pruned_now(self, kept: Mapping[str, Tensor]) -> dict[str, int]:
        """Entries pruned now per parameter, from its (flat) mask, over every rank."""
        names = list(self.params)
        local_counts = [kept[n].numel() - int(kept[n].count_nonzero()) if n in kept else 0 for n in names]
        return dict(zip(names, self._sum_over_ranks(local_counts), strict=True))

    def _raise_if_not_finite(self, name: str, finite: bool, step: int | None) -> None:
        """Every rank raises :class:`_NonFinite` (warned) if a rank saw NaN/Inf in ``name``'s scores."""
        if self._sum_over_ranks([int(not finite)])[0]:
            self._warn_non_finite([name], step)
            raise _NonFinite

    def _nm_streamed(
        self, name: str, sparsity: float, kept: Tensor | None, scores: Mapping[str, Tensor] | None, step: int | None
    ) -> Tensor:
        """An N:M layer's entries to prune now (flat bool, among the kept ones), a block of whole rows at a time:
        each group lies in one row, so rows are masked independently. Matrices stored in x out take the whole
        layer at once (their groups run down the columns)."""
        pattern: Pattern = self.options.pattern  # type: ignore[assignment]
        layer = self._scored_layer(name, kept, scores)
        shape = local(self.params[name]).shape
        if name in self.transposed:
            whole = layer.chunk(0, layer.numel).view(shape)
            self._raise_if_not_finite(name, all_finite(whole), step)
            new = self._mask(name, whole, sparsity, None if kept is None else ~kept.view(shape)).reshape(-1)
            return ~new if kept is None else kept & ~new
        width = max(1, layer.numel // max(shape[0], 1))  # a shard may hold no rows
        rows = max(1, selection.CHUNK_SIZE // width)
        chosen = torch.zeros(layer.numel, dtype=torch.bool, device=local(self.params[name]).device)
        finite = True
        for start in range(0, shape[0], rows):
            a, b = start * width, min(start + rows, shape[0]) * width
            block = layer.chunk(a, b).view(-1, width)  # may be a view of given scores: never written to
            if not all_finite(block):
                finite = False
                break
            if kept is not None:  # entries pruned before score lowest: they stay pruned
                block = block.masked_fill(~kept[a:b].view(-1, width), float("-inf"))
            part = chosen[a:b].view(-1, width)
            torch.logical_not(pattern.mask(block, sparsity), out=part)
            if kept is not None:
                part.logical_and_(kept[a:b].view(-1, width))
        self._raise_if_not_finite(name, finite, step)
        return chosen

    def _select_streamed(
        self,
        names: list[str],
        count: int,
        kept: Mapping[str, Tensor],
        scores: Mapping[str, Tensor] | None,
        step: int | None,
        *,
        scaled: bool,
    ) -> dict[str, Tensor]:
        """The ``count`` lowest-scoring kept entries over ``names`` (divided by each layer's mean score when
        ``scaled``, the global allocation's normalisation)."""
        if count < 0:
            raise _NeedsExactSelection  # the target is below what is pruned already: masks would grow back
        layers = [self._scored_layer(name, kept.get(name), scores) for name in names]
        if scaled:
            totals = [self._layer_total(layer) for layer in layers]
            totals = self._sum_over_ranks(totals, torch.float64)
            if not all(math.isfinite(t) for t in totals):
                self._warn_non_finite([n for n, t in zip(names, totals, strict=True) if not math.isfinite(t)], step)
                raise _NonFinite
            means = [total / self.params[name].numel() for name, total in zip(names, totals, strict=True)]
            layers = [
                replace(layer, scale=mean if mean > 0 else 1.0) for layer, mean in zip(layers, means, strict=True)
            ]
        try:
            selected = select_lowest_streamed(layers, count, group=self.group)
        except NonFiniteScores as error:
            self._warn_non_finite([names[i] for i in error.layers], step)
            raise _NonFinite from None
        if selected is None:
            raise _NeedsExactSelection
        return dict(zip(names, selected, strict=True))

    def _scored_layer(self, name: str, kept: Tensor | None, scores: Mapping[str, Tensor] | None) -> ScoredLayer:
        """The layer's scores as a streamed source: computed on slices for elementwise criteria, else whole."""
        if scores is not None:
            return ScoredLayer.of(scores[name], kept)
        if not self.criterion.elementwise:
            return ScoredLayer.of(self._score(name), kept)
        param = local(self.params[name]).detach()
        if self.criterion.needs_grad and self.params[name].grad is None:
            raise RuntimeError(f"criterion={self.scorer_name!r} needs a gradient, but {name!r} has none")
        grad = None if self.params[name].grad is None else local(self.params[name].grad).detach().reshape(-1)
        flat = param.reshape(-1)
        state = {
            key: value.reshape(-1) if value.shape == param.shape else value
            for key, value in self.criterion_state.get(name, {}).items()
        }

        def score(where: slice | Tensor) -> Tensor:
            part = {
                key: value[where] if value.dim() and value.numel() == flat.numel() else value
                for key, value in state.items()
            }
            return self.criterion.score(flat[where], None if grad is None else grad[where], part).float()

        return ScoredLayer(flat.numel(), lambda a, b: score(slice(a, b)), score, kept, device=flat.device)

    @staticmethod
    def _layer_total(layer: ScoredLayer) -> float:
        """Sum of a layer's scores over every entry (pruned ones too), for the global allocation's mean: chunk by
        chunk (each chunk's float32 sum is exact to ~1e-7; a float32 L1 norm of a whole large layer is not)."""
        return sum(
            float(layer.chunk(start, min(start + selection.CHUNK_SIZE, layer.numel)).sum())
            for start in range(0, layer.numel, selection.CHUNK_SIZE)
        )

    def prune_entries(self, entries: Mapping[str, Tensor], *, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Prune ``entries`` (bool per parameter, among the kept ones) in place, the same on every rank: masks
        shrink where they lie, weights are zeroed and the optimizer state of the entries is reset.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(2, 2)
            >>> pruner = Pruner(layer)
            >>> pruner.prune_entries({"weight": torch.tensor([[True, False], [False, False]])})
            >>> pruner.sparsity(), layer.weight[0, 0].item() == 0
            (0.25, True)
        """
        self._change_in_place(entries, self.store.prune, optimizers)

    def _change_in_place(
        self,
        entries: Mapping[str, Tensor],
        change: Callable[[Mapping[str, Tensor]], None],
        optimizers: Iterable[torch.optim.Optimizer],
    ) -> dict[str, Tensor]:
        """Apply ``change`` (the store's ``prune`` or ``flip``) to ``entries`` agreed over DDP ranks (a sharded
        rank keeps its own), zero the pruned weights and reset the optimizer state of the entries; returns them."""
        agreed = broadcast_masks(dict(entries)) if self.group is None else dict(entries)
        self.last_changed = {}  # the previous update's entries are not held through this one
        change(agreed)
        self.store.apply()
        self.last_changed = agreed
        self.reset_optimizer_state(optimizers)
        return agreed

    def _one_threshold(self) -> bool:
        """Global allocations without caps on unstructured masks: one exact selection over all layers."""
        opts = self.options
        return (
            opts.allocation in ("global", "global_raw")
            and opts.min_sparsity == 0.0
            and opts.max_sparsity == 1.0
            and isinstance(opts.pattern, UnstructuredPattern)
        )

    def _pruned_before(self, sparsity: float) -> dict[str, Tensor] | None:
        """Entries pruned before, which stay pruned while the target does not go down (``None`` otherwise)."""
        if not self.masks or sparsity < self.target_sparsity:
            return None
        return {name: ~mask for name, mask in self.masks.items()}

    def check_reachable(self, final_sparsity: float, key: str = "final_sparsity") -> None:
        """Refuse a final target the allocation cannot reach on these parameters (caps, pinned layers, one weight
        kept per layer), naming the keys and the reachable range.

        Example:
            >>> from torch import nn
            >>> pruner = Pruner(nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10)), allocation="global",
            ...                 max_sparsity=0.5)
            >>> pruner.check_reachable(0.9)
            Traceback (most recent call last):
            ...
            ValueError: final_sparsity=0.9 cannot be reached with allocation='global', max_sparsity=0.5; reachable: \
[0, 0.5] overall over the 200 pruned weights (every layer keeps at least one)
        """
        opts = self.options
        if opts.pattern.fixed_sparsity is not None:  # type: ignore[union-attr]
            return
        numel = {name: p.numel() for name, p in self.params.items()}
        low, high = reachable_range(
            opts.allocation,
            numel,
            layer_sparsity=opts.layer_sparsity,
            min_sparsity=opts.min_sparsity,
            max_sparsity=opts.max_sparsity,
            keep_one=True,
        )
        total = sum(numel.values())
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

    def _warn_nearly_empty(self, sparsities: Mapping[str, float], step: int | None) -> None:
        for name, value in sparsities.items():
            if value > 0.99 and name not in self._warned_nearly_empty:
                self._warned_nearly_empty.add(name)
                where = f" at step {step}" if step is not None else ""
                warnings.warn(
                    f"{type(self).__name__}: {name!r} is pruned to {value:.4g} (over 0.99){where}, keeping "
                    f"{self.params[name].numel() - round(value * self.params[name].numel())} of "
                    f"{self.params[name].numel()} weights: the layer nearly cuts the network off; pin it lower with "
                    "`layer_sparsity` or leave it out with `exclude`",
                    UserWarning,
                    stacklevel=3,
                )

    def _mask(self, name: str, scores: Tensor, sparsity: float, pruned: Tensor | None = None) -> Tensor:
        pattern: Pattern = self.options.pattern  # type: ignore[assignment]
        if pruned is not None:  # entries pruned before score lowest: they stay pruned
            scores = scores.float().masked_fill(pruned.to(scores.device), float("-inf"))
        if name in self.transposed and scores.dim() == 2:
            return pattern.mask(scores.t(), sparsity).t()
        return pattern.mask(scores, sparsity)

    def regrow(
        self,
        fraction: float,
        method: str = "rigl",
        *,
        generator: torch.Generator | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        step: int | None = None,
    ) -> dict[str, float] | None:
        """Swap ``fraction`` of each masked layer's active weights for inactive ones (see
        :func:`~pat_callbacks.core.regrowth.swapped_entries`): drop the lowest |w|, regrow by dense-gradient magnitude
        (``"rigl"``) or at random (``"set"``). Regrown entries restart at zero with zeroed optimizer state; each
        layer's count is unchanged. Returns metrics, or ``None`` (with a warning) if weights or gradients are not
        finite.

        Example:
            >>> from torch import nn
            >>> model = nn.Linear(8, 8)
            >>> pruner = Pruner(model)
            >>> _ = pruner.prune_to(0.5)
            >>> metrics = pruner.regrow(0.25, "set", generator=torch.Generator().manual_seed(0))
            >>> metrics["pruning/regrown"], metrics["pruning/dropped"], pruner.sparsity()
            (8.0, 8.0, 0.5)
        """
        check_choice("method", method, GROWTH_METHODS)
        if not self.options.pattern.allows_regrowth:  # type: ignore[union-attr]
            raise ValueError(f"regrowth would break the {self.options.pattern!r} pattern")
        inputs: dict[str, Tensor | None] = {name: local(p) for name, p in self.params.items()}
        if method == "rigl":
            inputs.update({f"{name} (grad)": _local_or_none(p.grad) for name, p in self.params.items()})
        if not self._all_finite(inputs, step):
            return None
        return self._regrow_in_place(fraction, method, generator, optimizers)

    def _regrow_in_place(
        self,
        fraction: float,
        method: str,
        generator: torch.Generator | None,
        optimizers: Iterable[torch.optim.Optimizer],
    ) -> dict[str, float]:
        """Drop-and-grow: each layer's swapped entries chosen by streamed selections (over the ranks of a sharded
        layer; the same on every DDP rank), flipped in its mask in place."""
        swapped: dict[str, Tensor] = {}
        n_active = 0
        for name, mask in self.masks.items():
            param = self.params[name]
            if method == "rigl" and param.grad is None:
                continue  # a layer without a gradient this step keeps its mask
            grad = None if param.grad is None else local(param.grad)
            swapped[name] = swapped_entries(mask, local(param), grad, fraction, method, generator, group=self.group)
            n_active += int(mask.count_nonzero())
        swapped = self._change_in_place(swapped, self.store.flip, optimizers)
        n_swapped, n_active = self._sum_over_ranks([sum(int(e.count_nonzero()) for e in swapped.values()), n_active])
        n_regrown = n_swapped // 2  # as many as dropped
        return {
            "pruning/drop_fraction": fraction,
            "pruning/regrown": float(n_regrown),
            "pruning/dropped": float(n_regrown),
            "pruning/mask_change_rate": n_regrown / max(n_active, 1),
        }

    # ------------------------------------------------------------- sharded (FSDP2)
    def _check_shardable(self) -> None:
        opts = self.options
        problems = []
        if opts.allocation == "sensitivity":
            problems.append("allocation='sensitivity' (it evaluates the model with each layer pruned alone)")
        if isinstance(opts.pattern, BlockPattern):
            problems.append(f"pattern={opts.pattern.name!r} (blocks may straddle two ranks' rows)")
        if opts.pattern.fixed_sparsity is not None and self.transposed:  # type: ignore[union-attr]
            problems.append(f"pattern={opts.pattern.name!r} on in x out matrices {sorted(self.transposed)}")
        if opts.allocation in ("global", "global_raw") and (opts.min_sparsity > 0 or opts.max_sparsity < 1):
            problems.append("min_sparsity / max_sparsity caps with a global allocation")
        if problems:
            raise ValueError(
                "These options are not supported with sharded (FSDP2) parameters yet: " + "; ".join(problems)
            )

    def _sum_over_ranks(self, values: list[Any], dtype: torch.dtype = torch.int64) -> list[Any]:
        """Element-wise sums over the ranks of a sharded pruner (``values`` unchanged in one process)."""
        device = local(next(iter(self.params.values()))).device
        return sum_over_ranks(values, self.group, device, dtype)

    def _masks_by_selection(
        self, sparsity: float, final_sparsity: float | None, scores: Mapping[str, Tensor] | None, step: int | None
    ) -> dict[str, Tensor] | None:
        """Masks by exact selections (no concatenation of all scores, no second per-layer pass): per layer for
        uniform / ERK / pinned layers, one threshold over every other layer for global allocations; across ranks
        for sharded parameters (no layer is gathered)."""
        opts = self.options
        pattern: Pattern = opts.pattern  # type: ignore[assignment]
        scores = dict(scores) if scores is not None else self.scores()
        if not self._all_finite(scores, step):
            return None
        if opts.allocation == "global":  # mean-normalised, the mean taken over every rank's entries
            sums = self._sum_over_ranks([float(s.float().sum()) for s in scores.values()], torch.float64)
            for (name, layer), total in zip(list(scores.items()), sums, strict=True):
                mean = total / self.params[name].numel()
                scores[name] = layer.float() / mean if mean > 0 else layer.float()
        pruned = self._pruned_before(sparsity) or {}
        for name, entries in pruned.items():  # entries pruned before stay pruned
            scores[name] = scores[name].float().masked_fill(entries, float("-inf"))
        shapes = {name: torch.empty(self.params[name].shape, device="meta") for name in scores}
        method = "uniform" if opts.allocation in ("global", "global_raw") else opts.allocation
        pinned = plan_sparsities(
            method, shapes, sparsity, final_target=final_sparsity, layer_sparsity=opts.layer_sparsity, keep_one=True
        )
        masks: dict[str, Tensor] = {}
        fixed = {n for n in scores if any(fnmatchcase(n, p) for p in opts.layer_sparsity or {})}
        per_layer = scores if method == opts.allocation else {n: scores[n] for n in fixed}
        for name, layer_scores in per_layer.items():
            if pattern.fixed_sparsity is not None:
                masks[name] = pattern.mask(layer_scores, pinned[name])
            else:
                k = prune_count(self.params[name].numel(), pinned[name])
                masks[name] = ~select_lowest([layer_scores], k, self.group)[0]
        rest = [name for name in scores if name not in masks]
        if rest:  # one threshold over every remaining layer, on every rank
            numel = {n: self.params[n].numel() for n in scores}
            budget = prune_count(sum(numel.values()), sparsity) - sum(prune_count(numel[n], pinned[n]) for n in masks)
            budget = min(max(budget, 0), sum(numel[n] for n in rest) - len(rest))
            selected = select_lowest([scores.pop(n) for n in rest], budget, self.group)
            masks.update({name: ~chosen for name, chosen in zip(rest, selected, strict=True)})
            if self.group is None and any(not bool(masks[n].any()) for n in rest):
                return self._masks_by_allocation(sparsity, final_sparsity, None, step)  # keep one weight per layer
        names = list(masks)
        counts = self._sum_over_ranks([m.numel() - int(m.count_nonzero()) for m in masks.values()])
        self._warn_nearly_empty({n: c / self.params[n].numel() for n, c in zip(names, counts, strict=True)}, step)
        return masks

    def set_masks(
        self,
        masks: Mapping[str, Tensor],
        *,
        reset: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> dict[str, Tensor]:
        """Make ``masks`` the same on every rank, store them, zero the pruned weights and the optimizer state of
        newly pruned entries (and of ``reset``, e.g. regrown ones). Returns the newly pruned entries."""
        agreed = dict(masks) if self.group is not None else broadcast_masks(dict(masks))  # shards are per rank
        newly_pruned = self.store.set_masks(agreed)
        self.store.apply()
        changed = dict(newly_pruned)
        for name, entries in (reset or {}).items():
            changed[name] = changed[name] | entries if name in changed else entries
        self.last_changed = changed
        self.reset_optimizer_state(optimizers)
        return newly_pruned

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the pruned parameters' current values (this rank's rows when sharded), for :meth:`rewind`."""
        return {name: local(p).detach().clone() for name, p in self.params.items()}

    def rewind(self, snapshot: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Lottery-ticket rewinding (Frankle & Carbin 2019): surviving weights back to their ``snapshot`` values,
        pruned ones kept at zero, and the optimizer state of every masked parameter zeroed.

        Example:
            >>> from torch import nn
            >>> layer = nn.Linear(4, 4)
            >>> pruner = Pruner(layer)
            >>> start = pruner.snapshot()
            >>> _ = pruner.prune_to(0.5)
            >>> _ = layer.weight.data.add_(1.0)
            >>> pruner.rewind(start)
            >>> bool(((layer.weight == start["weight"]) | (layer.weight == 0)).all())
            True
        """
        with torch.no_grad():
            for name, param in self.params.items():
                local(param).copy_(snapshot[name])
        self.apply()
        self.reset_optimizer_state(optimizers, {name: torch.ones_like(mask) for name, mask in self.masks.items()})

    def clear(self) -> None:
        """Lift every mask: all parameters train densely again (pruned weights restart from zero)."""
        self.target_sparsity = 0.0
        self.last_changed = {}
        self.store.clear()

    # -------------------------------------------------------------- enforcement
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (call before ``optimizer.step()``)."""
        self.store.mask_grads()

    def apply(self) -> None:
        """Zero the pruned weights in place."""
        self.store.apply()

    def reset_optimizer_state(
        self, optimizers: Iterable[torch.optim.Optimizer], entries: Mapping[str, Tensor] | None = None
    ) -> int:
        """Zero the optimizer state of ``entries`` (default: those pruned or regrown at the last update)."""
        optimizers = list(optimizers)
        if not optimizers:
            return 0
        return self.store.reset_optimizer_state(optimizers, self.last_changed if entries is None else entries)

    def to_devices(self) -> None:
        """Move masks and criterion history to their parameters' devices (after the model moved)."""
        self.store.sync_devices()
        self.criterion_state = {
            name: {key: value.to(local(self.params[name]).device) for key, value in values.items()}
            for name, values in self.criterion_state.items()
        }

    def reset_history(self) -> None:
        """Forget the criterion's history (after an update, for criteria averaged since the last one)."""
        for values in self.criterion_state.values():
            self.criterion.reset(values)

    # ----------------------------------------------------------------- reading
    def sparsity(self) -> float:
        """Fraction of pruned entries over all pruned parameters, from the masks."""
        return self.store.sparsity()

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per parameter, from the masks."""
        return self.store.layer_sparsity()

    def zeros_over(self, tensors: Mapping[str, Tensor], layer_sparsity: Mapping[str, float] | None = None) -> float:
        """Fraction of exact zeros over ``tensors`` (e.g. every weight matrix of the model, embeddings included):
        pruned parameters counted from their masks (``layer_sparsity`` if already known; the weights match them
        exactly), the others on their values, over every rank when sharded.

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
            >>> pruner = Pruner(model)
            >>> _ = pruner.prune_to(0.5)
            >>> pruner.zeros_over({"0.weight": model[0].weight, "1.weight": model[1].weight})  # 8 of 56
            0.14285714285714285
        """
        layers = layer_sparsity if layer_sparsity is not None else self.layer_sparsity()
        total = sum(t.numel() for t in tensors.values())
        counted = [round(layers[n] * t.numel()) for n, t in tensors.items() if n in self.params]
        measured = [
            local(t).numel() - int(local(t).detach().count_nonzero())
            for n, t in tensors.items()
            if n not in self.params
        ]
        zeros = sum(counted) + (sum(self._sum_over_ranks(measured)) if measured else 0)
        return zeros / total if total else 0.0

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Masks, criterion history and state, target and sensitivities (plain tensors and numbers)."""
        state: dict[str, Any] = {
            "target_sparsity": self.target_sparsity,
            "criterion_state": {
                name: {key: self._full(name, value) for key, value in values.items()}
                for name, values in self.criterion_state.items()
            },
            "criterion": self.criterion.state_dict(),
            **self.store.state_dict(),
        }
        if self.sensitivities is not None:
            state["sensitivities"] = dict(self.sensitivities)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.store.load_state_dict(state)
        self.criterion_state = {
            name: {key: self._local_part(name, value) for key, value in values.items()}
            for name, values in state.get("criterion_state", {}).items()
        }
        self.criterion.load_state_dict(state.get("criterion", {}))
        sensitivities = state.get("sensitivities")
        self.sensitivities = None if sensitivities is None else {k: float(v) for k, v in sensitivities.items()}
        self.target_sparsity = float(state.get("target_sparsity", self.store.sparsity()))

    # ---------------------------------------------------------------- internals
    def _full(self, name: str, value: Tensor) -> Tensor:
        """A per-entry history tensor of a sharded parameter, gathered whole for the checkpoint."""
        if self.group is None or value.dim() == 0:
            return value
        return gather_full(value, self.params[name])

    def _local_part(self, name: str, value: Tensor) -> Tensor:
        if self.group is None or value.dim() == 0 or name not in self.params:
            return value
        return local_rows(value, self.params[name])

    def _select(self, model_or_params: nn.Module | Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        opts = self.options
        if isinstance(model_or_params, nn.Module):
            params = select_parameters(
                model_or_params, include=opts.include, exclude=opts.exclude, allow_vectors=opts.allow_vectors
            )
        elif isinstance(model_or_params, Mapping):
            params = dict(model_or_params)
        else:
            raise ValueError(
                f"Expected a module or a mapping of name -> parameter to prune, but got {type(model_or_params)}"
            )
        names = list(params)
        dense = ({names[0]} if opts.keep_first and names else set()) | (
            {names[-1]} if opts.keep_last and names else set()
        )
        params = {name: p for name, p in params.items() if name not in dense}
        if not params:
            raise ValueError(f"keep_first/keep_last leave no parameter to prune (targets were {names})")
        for pattern in opts.layer_sparsity or {}:
            if not any(fnmatchcase(name, pattern) for name in params):
                raise ValueError(
                    f"`layer_sparsity` pattern {pattern!r} matches no pruned parameter; pruned: {sorted(params)}"
                )
        return params

    def _all_finite(self, tensors: Mapping[str, Tensor | None], step: int | None) -> bool:
        names = sorted(tensors)
        flags = [int(tensors[n] is not None and not all_finite(tensors[n])) for n in names]
        bad = [n for n, flag in zip(names, self._sum_over_ranks(flags), strict=True) if flag]  # ranks agree
        if not bad:
            return True
        self._warn_non_finite(bad, step)
        return False

    def _warn_non_finite(self, bad: list[str], step: int | None) -> None:
        """Warn that an update is skipped for NaN/Inf scores, and restart the criterion's history."""
        where = f" at step {step}" if step is not None else ""
        warnings.warn(
            f"{type(self).__name__}: NaN or Inf in the scores of {bad}{where}; the mask update is skipped (masks "
            "unchanged; the callbacks retry at every following step, at the end of training at the latest)",
            UserWarning,
            stacklevel=3,
        )
        for values in self.criterion_state.values():
            values.clear()


class _NeedsExactSelection(Exception):
    """A streamed update cannot decide; the update falls back to exact selection on whole score tensors."""


class _NonFinite(Exception):
    """NaN/Inf scores (already warned about): the update is skipped."""


def _refuse_uninitialized(model_or_params: nn.Module | Mapping[str, nn.Parameter]) -> None:
    """Lazy modules (``nn.LazyLinear``, ...) have no shape until their first forward pass: nothing to mask yet."""
    if isinstance(model_or_params, nn.Module):
        named = model_or_params.named_parameters()
    elif isinstance(model_or_params, Mapping):
        named = model_or_params.items()
    else:
        return
    lazy = [name for name, p in named if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"{lazy} are uninitialised (a lazy module such as nn.LazyLinear) and have no shape to prune yet: run a "
            "forward pass or build the model before fit, or use configure_model"
        )


def _several_processes() -> bool:
    """Whether torch.distributed runs with more than one process (DDP without a shard group)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _all_ranks_agree(flag: bool) -> bool:
    """Under torch.distributed (DDP), whether ``flag`` holds on every rank; ``flag`` itself in one process."""
    if not _several_processes():
        return flag
    value = torch.tensor([int(flag)])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def broadcast_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Under torch.distributed, make every rank hold rank 0's masks (ranks may score differently).

    Example:
        >>> import torch
        >>> broadcast_masks({"w": torch.tensor([True, False])})  # one process: unchanged
        {'w': tensor([ True, False])}
    """
    if not _several_processes():
        return masks
    synced = {}
    for name, mask in masks.items():
        as_bytes = mask.to(torch.uint8)
        torch.distributed.broadcast(as_bytes, src=0)
        synced[name] = as_bytes.bool()
    return synced


def _local_or_none(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else local(tensor)
