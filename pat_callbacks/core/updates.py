"""The one selection path: an :class:`~pat_callbacks.core.planning.UpdatePlan` -> the weights to prune.

:meth:`Selection.update` runs one update and returns an :class:`UpdateResult` saying what happened: the entries to
prune now (streamed) or whole new masks (exact), whether the update was skipped and why (NaN/Inf scores, warned),
and why a streamed update took the exact path. Two strategies execute the same plan, in one process or over the
ranks of a sharded model:

- **streamed** (:meth:`Selection.streamed`): for updates that only shrink unstructured or N:M masks. Each layer is
  scored a chunk at a time (:func:`~pat_callbacks.core.selection.select_lowest_streamed`) and the entries to prune
  now are marked among the kept ones; masks are then pruned in place. Transient memory is a fraction of the weights.
- **exact** (:meth:`Selection.exact`): whole score tensors, for everything else (block patterns, caps, sensitivity,
  a target that goes down) and where a streamed pass cannot decide (a layer's target below what it already
  prunes, a layer left empty, exact zeros beyond a shared budget, DDP ranks that disagree). Unstructured layers use
  the exact radix selection (:func:`~pat_callbacks.core.selection.select_lowest`, ties in index order, over
  ranks when sharded); patterns (N:M, blocks) their own ``mask``.

In both, entries pruned before stay pruned while the target does not go down (they score lowest), every layer keeps
at least one weight, and a layer pruned past 0.99 is warned about once.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pat_callbacks.core.pruner import Pruner
    >>> layer = nn.Linear(8, 8)
    >>> pruner = Pruner(layer)
    >>> plan = pruner.planner.plan(0.5)
    >>> result = pruner.selection.update(plan, 0.5, stream=True, keep_pruned=False)
    >>> int(result.entries["weight"].sum()), result.exact, result.skipped
    (32, False, None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

import pat_callbacks.core.selection as _selection
from pat_callbacks.core.allocation import SHAPE_ALLOCATIONS, mean_scale
from pat_callbacks.core.distributed import all_ranks_agree
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.patterns import NMPattern, Pattern, UnstructuredPattern, prune_count
from pat_callbacks.core.planning import Planner, UpdatePlan
from pat_callbacks.core.scoring import Scorer
from pat_callbacks.core.selection import (
    NonFiniteScores,
    ScoredLayer,
    all_finite,
    layer_total,
    select_lowest,
    select_lowest_streamed,
)
from pat_callbacks.core.sharding import local

__all__ = ["Selection", "UpdateResult"]

NON_FINITE = "NaN or Inf in the scores"
BELOW_PRUNED = "a layer's target is below what it already prunes"
ZEROS_OVER_BUDGET = "exact zeros outnumber the shared budget"
LAYER_EMPTIED = "a layer would lose every weight"
RANKS_DISAGREE = "the DDP ranks' streamed selections differ"


@dataclass(frozen=True)
class UpdateResult:
    """What one update selected (at most one of ``entries`` and ``masks``; neither when skipped).

    Attributes:
        entries: streamed: the entries to prune now, per parameter (bool, its local shape, among the kept ones).
        masks: exact: whole new keep-masks, per parameter.
        skipped: why the update changed nothing (``NON_FINITE``: NaN/Inf scores, already warned), else ``None``.
        fallback: why a streamed update gave way to the exact path (e.g. ``BELOW_PRUNED``), else ``None``.

    Example:
        >>> UpdateResult(skipped=NON_FINITE).exact, UpdateResult(masks={}).exact
        (False, True)
    """

    entries: dict[str, Tensor] | None = None
    masks: dict[str, Tensor] | None = None
    skipped: str | None = None
    fallback: str | None = None

    @property
    def exact(self) -> bool:
        """Whether the exact path made whole new masks."""
        return self.masks is not None


class Selection:
    """Executes update plans over a pruner's parameters.

    Args:
        masked: the parameters and their current masks.
        scorer: the criterion bound to them.
        planner: the per-layer split (also warns about nearly empty layers).
        pattern: the mask shape.
        transposed: names of matrices stored in x out (HF ``Conv1D``): patterns run along their inputs.

    Example:
        >>> from torch import nn
        >>> from pat_callbacks.core.pruner import Pruner
        >>> pruner = Pruner(nn.Linear(4, 4), pattern="block:2x2")
        >>> plan = pruner.planner.plan(0.5)
        >>> pruner.selection.can_stream(0.5, 0.0), int((~pruner.selection.exact(plan, 0.5, None, None, None,
        ...     keep_pruned=False)["weight"]).sum())
        (False, 8)
    """

    def __init__(
        self, masked: MaskStore, scorer: Scorer, planner: Planner, pattern: Pattern, transposed: set[str]
    ) -> None:
        self.masked, self.scorer, self.planner = masked, scorer, planner
        self.pattern, self.transposed = pattern, transposed

    def can_stream(self, sparsity: float, target_sparsity: float) -> bool:
        """Updates that only shrink unstructured or N:M masks with a plan known from shapes."""
        allocation = self.planner.options.allocation
        return (
            (isinstance(self.pattern, UnstructuredPattern) and allocation in SHAPE_ALLOCATIONS)
            or self.planner.one_threshold
            or (isinstance(self.pattern, NMPattern) and allocation == "uniform")
        ) and not (self.masked.masks and sparsity < target_sparsity)

    # ------------------------------------------------------------------------------------------------- update
    def update(
        self,
        plan: UpdatePlan | None,
        sparsity: float,
        *,
        stream: bool,
        keep_pruned: bool,
        scores: Mapping[str, Tensor] | None = None,
        step: int | None = None,
        final_target: float | None = None,
        sensitivities: Mapping[str, float] | None = None,
    ) -> UpdateResult:
        """One update: streamed where ``stream`` (see :meth:`can_stream`) and it can decide, else exact
        (:meth:`exact`, which also takes ``final_target`` and ``sensitivities``).

        Under DDP (no process group of shards) every rank takes the exact path when any rank could not stream, so
        their masks agree (the exact path's are broadcast from rank 0). ``keep_pruned``: entries pruned now stay
        pruned on the exact path.
        """
        fallback = None
        if plan is not None and stream:
            result = self.streamed(plan, scores, step)
            if result.skipped is not None:
                return result
            decided = bool(result.entries)
            if self.masked.group is None and not all_ranks_agree(decided):
                fallback = result.fallback or RANKS_DISAGREE
            elif decided:
                return result
            else:
                fallback = result.fallback
        masks = self.exact(
            plan, sparsity, final_target, scores, step, keep_pruned=keep_pruned, sensitivities=sensitivities
        )
        if masks is None:
            return UpdateResult(skipped=NON_FINITE)
        return UpdateResult(masks=masks, fallback=fallback)

    # ----------------------------------------------------------------------------------------------- streamed
    def streamed(self, plan: UpdatePlan, scores: Mapping[str, Tensor] | None, step: int | None) -> UpdateResult:
        """The entries to prune now, per parameter (bool, among the kept ones), as ``entries``; or ``skipped``
        (warned) on NaN/Inf scores; or ``fallback`` (the reason) where a streamed pass cannot decide: a layer's
        target below what it already prunes, a layer left empty, exact zeros beyond the shared budget."""
        numel = self.planner.numel
        params = self.masked.params
        kept = {name: mask.reshape(-1) for name, mask in self.masked.masks.items()}
        already = self._pruned_now(kept)
        chosen: dict[str, Tensor] = {}
        for name, sparsity in plan.per_layer.items():
            if isinstance(self.pattern, NMPattern):
                selected = self._nm_streamed(name, sparsity, kept.get(name), scores, step)
            else:
                needed = prune_count(numel[name], sparsity) - already[name]
                selected = self._select_streamed([name], needed, kept, scores, step, scaled=False)
            if isinstance(selected, UpdateResult):
                return selected
            chosen.update(selected)
        if plan.shared:
            shared = list(plan.shared)
            count = plan.shared_budget - sum(already[n] for n in shared)
            if self._zeros_over_budget(shared, count):
                return UpdateResult(fallback=ZEROS_OVER_BUDGET)  # the exact path masks every exact zero
            selected = self._select_streamed(shared, count, kept, scores, step, scaled=plan.scaled)
            if isinstance(selected, UpdateResult):
                return selected
            counts = self.masked.sum_over_ranks([int(selected[n].count_nonzero()) for n in shared])
            if any(already[n] + c >= numel[n] for n, c in zip(shared, counts, strict=True)):
                return UpdateResult(fallback=LAYER_EMPTIED)  # the allocation keeps one weight per layer
            chosen.update(selected)
        names = list(params)
        counts = self.masked.sum_over_ranks([int(chosen[n].count_nonzero()) for n in names])
        self.planner.warn_nearly_empty(
            {n: (already[n] + c) / numel[n] for n, c in zip(names, counts, strict=True)}, step
        )
        return UpdateResult(entries={name: chosen[name].view(local(params[name]).shape) for name in params})

    def _zeros_over_budget(self, names: list[str], budget: int) -> dict[str, Tensor]:
        """The exact zeros that no mask explains in the layers sharing one threshold, when they outnumber what is
        left of its ``budget`` once the entries pruned now are counted (else ``{}``).

        Such zeros are pruned in fact. Were they fewer than the budget, the criterion would decide among them like
        any other entry (magnitude criteria pick them first). When they outnumber it, selecting part of the tied
        zeros (in index order) would leave the others unmasked: the masks would count less than the weights show,
        and those zeros would train away. So every such zero is masked instead (a layer whose kept entries are all
        zero keeps one of them, as every layer keeps a weight), the other layers are left as they are, and the
        sparsity exceeds the target: the model was already sparser. Entries zero because a mask prunes them are not
        counted (a falling target still lifts masks). In one process only (sharded ranks: ``{}``).
        """
        if self.masked.group is not None:
            return {}
        params, masks = self.masked.params, self.masked.masks
        zeros: dict[str, Tensor] = {}
        for name in names:
            zero = local(params[name]).detach() == 0
            mask = masks.get(name)
            if mask is not None:
                zero &= mask
            if int(zero.count_nonzero()) == (zero.numel() if mask is None else int(mask.count_nonzero())):
                keep = int(mask.reshape(-1).nonzero()[0]) if mask is not None and bool(mask.any()) else 0
                zero.view(-1)[keep] = False  # every kept entry is zero: one stays kept
            zeros[name] = zero
        if sum(int(z.count_nonzero()) for z in zeros.values()) <= budget:
            return {}
        return zeros

    def _pruned_now(self, kept: Mapping[str, Tensor]) -> dict[str, int]:
        """Entries pruned now per parameter, from its (flat) mask, over every rank."""
        names = list(self.masked.params)
        local_counts = [kept[n].numel() - int(kept[n].count_nonzero()) if n in kept else 0 for n in names]
        return dict(zip(names, self.masked.sum_over_ranks(local_counts), strict=True))

    def _skipped_unless_finite(self, name: str, finite: bool, step: int | None) -> UpdateResult | None:
        """A skip (warned) on every rank if a rank saw NaN/Inf in ``name``'s scores, else ``None``."""
        if self.masked.sum_over_ranks([int(not finite)])[0]:
            self.masked.warn_non_finite([name], step)
            return UpdateResult(skipped=NON_FINITE)
        return None

    def _nm_streamed(
        self, name: str, sparsity: float, kept: Tensor | None, scores: Mapping[str, Tensor] | None, step: int | None
    ) -> dict[str, Tensor] | UpdateResult:
        """An N:M layer's entries to prune now (flat bool, among the kept ones), a block of whole rows at a time:
        each group lies in one row, so rows are masked independently. Matrices stored in x out take the whole
        layer at once (their groups run down the columns). A skip on NaN/Inf scores."""
        layer = self.scorer.scored_layer(name, kept, scores)
        shape = local(self.masked.params[name]).shape
        if name in self.transposed:
            whole = layer.chunk(0, layer.numel).view(shape)
            skipped = self._skipped_unless_finite(name, all_finite(whole), step)
            if skipped is not None:
                return skipped
            new = self.layer_mask(name, whole, sparsity, None if kept is None else ~kept.view(shape)).reshape(-1)
            return {name: ~new if kept is None else kept & ~new}
        width = max(1, layer.numel // max(shape[0], 1))  # a shard may hold no rows
        rows = max(1, _selection.CHUNK_SIZE // width)
        chosen = torch.zeros(layer.numel, dtype=torch.bool, device=local(self.masked.params[name]).device)
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
            torch.logical_not(self.pattern.mask(block, sparsity), out=part)
            if kept is not None:
                part.logical_and_(kept[a:b].view(-1, width))
        return self._skipped_unless_finite(name, finite, step) or {name: chosen}

    def _select_streamed(
        self,
        names: list[str],
        count: int,
        kept: Mapping[str, Tensor],
        scores: Mapping[str, Tensor] | None,
        step: int | None,
        *,
        scaled: bool,
    ) -> dict[str, Tensor] | UpdateResult:
        """The ``count`` lowest-scoring kept entries over ``names`` (divided by each layer's mean score when
        ``scaled``, the global allocation's normalisation); a skip on NaN/Inf scores, a fallback on a negative
        ``count`` (masks would grow back)."""
        if count < 0:
            return UpdateResult(fallback=BELOW_PRUNED)
        layers = [self.scorer.scored_layer(name, kept.get(name), scores) for name in names]
        if scaled:
            totals = self.masked.sum_over_ranks([layer_total(layer) for layer in layers], torch.float64)
            if not all(math.isfinite(t) for t in totals):
                bad = [n for n, t in zip(names, totals, strict=True) if not math.isfinite(t)]
                self.masked.warn_non_finite(bad, step)
                return UpdateResult(skipped=NON_FINITE)
            layers = [
                replace(layer, scale=mean_scale(total, self.planner.numel[name]))
                for layer, name, total in zip(layers, names, totals, strict=True)
            ]
        try:
            selected = select_lowest_streamed(layers, count, group=self.masked.group)
        except NonFiniteScores as error:
            self.masked.warn_non_finite([names[i] for i in error.layers], step)
            return UpdateResult(skipped=NON_FINITE)
        return dict(zip(names, selected, strict=True))

    # -------------------------------------------------------------------------------------------------- exact
    def exact(
        self,
        plan: UpdatePlan | None,
        sparsity: float,
        final_target: float | None,
        scores: Mapping[str, Tensor] | None,
        step: int | None,
        *,
        keep_pruned: bool,
        sensitivities: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor] | None:
        """Whole new masks for ``plan`` (``None``, warned, on NaN/Inf scores). Layers planned alone are scored and
        masked one at a time; the layers sharing a threshold are selected together; without a plan (the split
        depends on scores) it is made from every layer's scores. ``keep_pruned``: entries pruned now stay pruned."""
        pruned = {name: ~mask for name, mask in self.masked.masks.items()} if keep_pruned else {}
        if plan is None:
            return self._from_scores(sparsity, final_target, scores, step, pruned, sensitivities)
        masks: dict[str, Tensor] = {}
        for name, layer_sparsity in plan.per_layer.items():
            layer = scores[name] if scores is not None else self.scorer.score(name)
            if not self.masked.all_finite({name: layer}, step):
                return None
            masks[name] = self.layer_mask(name, layer, layer_sparsity, pruned.get(name))
            del layer
        if plan.shared:
            budget = plan.shared_budget
            zeros = self._zeros_over_budget(
                list(plan.shared), budget - sum(int(pruned[n].count_nonzero()) for n in plan.shared if n in pruned)
            )
            if zeros:  # exact zeros count as pruned: the mask covers them all, the other layers keep their weights
                pruned = {**pruned, **{n: zeros[n] | pruned[n] if n in pruned else zeros[n] for n in zeros}}
                budget = sum(int(pruned[n].count_nonzero()) for n in plan.shared)
            shared = {n: scores[n] if scores is not None else self.scorer.score(n) for n in plan.shared}
            if not self.masked.all_finite(shared, step):
                return None
            if plan.scaled:  # mean-normalised, the mean taken over every rank's entries
                totals = [layer_total(ScoredLayer.of(shared[n])) for n in plan.shared]
                totals = self.masked.sum_over_ranks(totals, torch.float64)
                for name, total in zip(plan.shared, totals, strict=True):
                    shared[name] = shared[name].float() / mean_scale(total, self.planner.numel[name])
            for name in plan.shared:
                if name in pruned:  # entries pruned before stay pruned
                    shared[name] = shared[name].float().masked_fill(pruned[name], float("-inf"))
            selected = select_lowest([shared.pop(n) for n in plan.shared], budget, self.masked.group)
            masks.update({name: ~chosen for name, chosen in zip(plan.shared, selected, strict=True)})
            if self.masked.group is None and any(not bool(masks[n].any()) for n in plan.shared):
                return self._from_scores(sparsity, final_target, scores, step, pruned, sensitivities)  # keep one
        names = list(masks)
        counts = self.masked.sum_over_ranks([m.numel() - int(m.count_nonzero()) for m in masks.values()])
        self.planner.warn_nearly_empty({n: c / self.planner.numel[n] for n, c in zip(names, counts, strict=True)}, step)
        return masks

    def _from_scores(
        self,
        sparsity: float,
        final_target: float | None,
        scores: Mapping[str, Tensor] | None,
        step: int | None,
        pruned: Mapping[str, Tensor],
        sensitivities: Mapping[str, float] | None,
    ) -> dict[str, Tensor] | None:
        """Every layer scored, the split made from the scores (caps, floors, sensitivity), each layer masked."""
        scores = dict(scores) if scores is not None else self.scorer.scores()
        if not self.masked.all_finite(scores, step):
            return None
        plan = self.planner.plan_from_scores(
            scores, sparsity, final_target, sensitivities=sensitivities, pruned=pruned or None
        )
        self.planner.warn_nearly_empty(plan.per_layer, step)
        return {name: self.layer_mask(name, scores[name], plan.per_layer[name], pruned.get(name)) for name in scores}

    def layer_mask(self, name: str, scores: Tensor, sparsity: float, pruned: Tensor | None = None) -> Tensor:
        """One layer's keep-mask at ``sparsity`` (``pruned``: entries that score lowest, so they stay pruned):
        unstructured by exact selection (ties in index order, over ranks when sharded), else by the pattern."""
        if pruned is not None:
            scores = scores.float().masked_fill(pruned.to(scores.device), float("-inf"))
        if isinstance(self.pattern, UnstructuredPattern):
            return ~select_lowest([scores], prune_count(self.planner.numel[name], sparsity), self.masked.group)[0]
        if name in self.transposed and scores.dim() == 2:
            return self.pattern.mask(scores.t(), sparsity).t()
        return self.pattern.mask(scores, sparsity)
