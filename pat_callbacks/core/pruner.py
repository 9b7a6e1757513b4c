"""The Trainer-free pruning core: criterion -> allocation -> pattern -> mask store, over a model's parameters.

:class:`Pruner` is what the Lightning callbacks drive, and what a plain PyTorch loop (or another trainer) can
drive directly. It never imports ``lightning`` and keeps no notion of steps: the caller decides *when*
(e.g. with a :mod:`~pat_callbacks.core.schedules` schedule) and the pruner does *which weights*. It is a facade over
small pieces: :class:`~pat_callbacks.core.options.PruningOptions` (what), :class:`~pat_callbacks.core.scoring.Scorer`
(scores and their history), :class:`~pat_callbacks.core.planning.Planner` (how many per layer),
:class:`~pat_callbacks.core.updates.Selection` (which entries: streamed or exact, local or sharded),
:mod:`~pat_callbacks.core.regrowth` (drop and grow) and :class:`~pat_callbacks.core.masks.MaskStore`
(commit and enforce). It implements :class:`~pat_callbacks.core.protocol.MaskingPruner`, as
:class:`~pat_callbacks.structured.pruner.StructuredPruner` does.

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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core._validation import check_choice, check_fraction, renamed
from pat_callbacks.core.allocation import SHAPE_ALLOCATIONS, measure_sensitivity
from pat_callbacks.core.criteria import Criterion
from pat_callbacks.core.distributed import broadcast_masks
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.options import PruningOptions
from pat_callbacks.core.planning import Planner
from pat_callbacks.core.regrowth import GROWTH_METHODS, regrow_in_place
from pat_callbacks.core.scoring import Scorer
from pat_callbacks.core.sharding import local
from pat_callbacks.core.targets import target_roles
from pat_callbacks.core.updates import Selection

__all__ = ["SHAPE_ALLOCATIONS", "Pruner", "PruningOptions", "broadcast_masks"]


class Pruner(MaskStore):
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
        params = self.options.targets(model_or_params)
        roles = target_roles(self.model) if self.model is not None else {}
        # Matrices stored in x out (Hugging Face Conv1D): patterns run along their inputs, i.e. on the transpose.
        self.transposed = {name for name in params if name in roles and roles[name].transposed}
        for name, param in params.items():
            shape = tuple(param.shape)
            self.options.pattern.check(name, shape[::-1] if name in self.transposed else shape)  # type: ignore[union-attr]
        self.criterion: Criterion = self.options.criterion  # type: ignore[assignment]
        frozen = [name for name, param in params.items() if not param.requires_grad]
        super().__init__(params)
        self.scorer = Scorer(
            self.criterion,
            self.params,
            self.group,
            window=self.options.accumulate_window,
            history_dtype=self.options.history_dtype,
        )
        if frozen and self.criterion.needs_grad:
            raise ValueError(
                f"criterion={self.scorer.name!r} reads gradients, but {frozen} are frozen (requires_grad=False) and "
                "get none: exclude them, or use criterion='magnitude'"
            )
        if self.group is not None:
            self.options.check_shardable(sorted(self.transposed))
        self.planner = Planner(self.options, {name: tuple(p.shape) for name, p in self.params.items()})
        self.selection = Selection(self, self.scorer, self.planner, self.options.pattern, self.transposed)  # type: ignore[arg-type]
        self.sensitivities: dict[str, float] | None = None

    @property
    def criterion_state(self) -> dict[str, dict[str, Tensor]]:
        """The criterion's history per parameter (e.g. Taylor's running ``|w * g|``)."""
        return self.scorer.state

    @property
    def needs_grad(self) -> bool:
        """Whether scoring reads gradients (then ``prune_to`` must run between ``backward`` and the step)."""
        return self.criterion.needs_grad

    @property
    def scorer_name(self) -> str:
        """The criterion's name, for messages and reports."""
        return self.scorer.name

    # ------------------------------------------------------------------ scoring
    def accumulate(self, step: int | None = None, next_update: int | None = None) -> None:
        """Add this step's weights and dense gradients to the criterion's history (no-op without history).

        Call after ``backward`` and before :meth:`mask_grads`, while pruning is under way. Given the ``step`` and
        the ``next_update`` step, criteria averaged since the last update accumulate only over the
        ``accumulate_window`` steps up to ``next_update`` (see :meth:`accumulates_at`); without them, every call.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(4, 2)
            >>> pruner = Pruner(layer, criterion="taylor", accumulate_window=2)
            >>> layer.weight.grad = torch.ones(2, 4)
            >>> for step in (7, 8, 9, 10):
            ...     pruner.accumulate(step, next_update=10)  # steps 9 and 10 only
            >>> int(pruner.criterion_state["weight"]["count"])
            2
            >>> pruner.accumulate()  # no step given: every call
            >>> int(pruner.criterion_state["weight"]["count"])
            3
        """
        self.scorer.accumulate(step, next_update)

    def accumulates_at(self, step: int, next_update: int | None) -> bool:
        """Whether :meth:`accumulate` at ``step`` adds to the history, the next update being at ``next_update``
        (``None``: unknown, every step): a pure check, for a caller that skips the call altogether."""
        return self.scorer.accumulates_at(step, next_update)

    def scores(self) -> dict[str, Tensor]:
        """Importance of every entry of every pruned parameter (higher = keep); this rank's rows when sharded."""
        return self.scorer.scores()

    def reset_history(self) -> None:
        """Forget the criterion's history (after an update, for criteria averaged since the last one)."""
        self.scorer.reset_history()

    def after_update(self) -> None:
        """Restart the criterion's history if it is averaged since the last update (the callbacks call this)."""
        if self.criterion.resets_after_update:
            self.reset_history()

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
        final_target: float | None = None,
        scores: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        step: int | None = None,
        final_sparsity: float | None = None,
    ) -> bool:
        """Mask to ``sparsity`` overall (``0.0`` lifts every mask): score, allocate, shape, commit.

        Args:
            sparsity: the overall target now.
            final_target: the target at the end of the schedule (``layer_sparsity`` layers follow it
                proportionally); default ``sparsity``. ``final_sparsity``: its former name (deprecated).
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
        final_target, _ = renamed("final_sparsity", final_sparsity, "final_target", final_target, None)
        if sparsity == 0.0:
            self.clear()
            return True
        if self.options.allocation == "sensitivity" and self.sensitivities is None:
            raise RuntimeError("allocation='sensitivity' needs measure_sensitivity(...) before the first prune_to")
        plan = self.planner.plan(sparsity, final_target)  # once per update; None: the split needs the scores
        stream = plan is not None and self._streamable(sparsity)
        keep_pruned = bool(self.masks) and sparsity >= self.target_sparsity
        result = self.selection.update(
            plan,
            sparsity,
            stream=stream,
            keep_pruned=keep_pruned,
            scores=scores,
            step=step,
            final_target=final_target,
            sensitivities=self.sensitivities,
        )
        if result.skipped is not None:
            return False
        self.target_sparsity = sparsity
        if result.masks is not None:
            self.set_masks(result.masks, optimizers=optimizers)
        else:
            self.prune(result.entries, optimizers=optimizers)
        return True

    def _streamable(self, sparsity: float) -> bool:
        """Whether this update can take the streamed strategy (see :meth:`Selection.can_stream`)."""
        return self.selection.can_stream(sparsity, self.target_sparsity)

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
        self.planner.check_reachable(final_sparsity, key)

    def regrow(
        self,
        drop_fraction: float,
        regrowth: str = "rigl",
        *,
        generator: torch.Generator | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        step: int | None = None,
        method: str | None = None,
    ) -> dict[str, float] | None:
        """Swap ``drop_fraction`` of each masked layer's active weights for inactive ones (see
        :func:`~pat_callbacks.core.regrowth.swapped_entries`): drop the lowest |w|, regrow by dense-gradient
        magnitude (``regrowth="rigl"``) or at random (``"set"``). Regrown entries restart at zero with zeroed
        optimizer state; each layer's count is unchanged. Returns metrics, or ``None`` (with a warning) if weights or
        gradients are not finite. ``method``: the former name of ``regrowth`` (deprecated).

        Example:
            >>> from torch import nn
            >>> model = nn.Linear(8, 8)
            >>> pruner = Pruner(model)
            >>> _ = pruner.prune_to(0.5)
            >>> metrics = pruner.regrow(0.25, "set", generator=torch.Generator().manual_seed(0))
            >>> metrics["pruning/regrown"], metrics["pruning/dropped"], pruner.sparsity()
            (8.0, 8.0, 0.5)
        """
        regrowth, key = renamed("method", method, "regrowth", regrowth, "rigl")
        check_choice(key, regrowth, GROWTH_METHODS)
        if not self.options.pattern.allows_regrowth:  # type: ignore[union-attr]
            raise ValueError(f"regrowth would break the {self.options.pattern!r} pattern")
        inputs: dict[str, Tensor | None] = {name: local(p) for name, p in self.params.items()}
        if regrowth == "rigl":
            inputs.update(
                {f"{name} (grad)": None if p.grad is None else local(p.grad) for name, p in self.params.items()}
            )
        if not self.all_finite(inputs, step):
            return None
        return regrow_in_place(self, drop_fraction, regrowth, generator, optimizers)

    def to_devices(self) -> None:
        """Move masks and criterion history to their parameters' devices (after the model moved)."""
        super().to_devices()
        self.scorer.to_devices()

    def warn_non_finite(self, bad: list[str], step: int | None) -> None:
        """Warn that an update is skipped for NaN/Inf scores, and restart the criterion's history."""
        super().warn_non_finite(bad, step)
        self.scorer.forget()

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Masks, criterion history and state, target and sensitivities (plain tensors and numbers)."""
        state: dict[str, Any] = {
            **super().state_dict(),
            "criterion_state": self.scorer.state_dict(),
            "criterion": self.criterion.state_dict(),
        }
        if self.sensitivities is not None:
            state["sensitivities"] = dict(self.sensitivities)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.scorer.load_state_dict(state.get("criterion_state", {}))
        self.criterion.load_state_dict(state.get("criterion", {}))
        sensitivities = state.get("sensitivities")
        self.sensitivities = None if sensitivities is None else {k: float(v) for k, v in sensitivities.items()}
