"""Lightning wiring shared by the pruning callbacks.

A subclass decides *when* and *how much* (:meth:`PruningCallback._plan`); this class owns the hooks:

- ``setup("fit")``: resolve the pruned parameters and build the :class:`~pat_callbacks.masks.MaskStore`
  (a bad pattern or a model with nothing to prune fails here, before the first step);
- ``on_before_optimizer_step``: at update steps, score the weights with the *dense* gradients of this step,
  allocate, build masks, zero the newly pruned weights and their optimizer state; then, every step,
  zero the gradients of pruned weights;
- ``on_train_batch_end``: re-mask weights if the optimizer is not known to keep zeros at zero, and log
  overall / per-layer sparsity (progress bar too);
- ``state_dict`` / ``load_state_dict``: masks and position, so a resumed run continues exactly.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pat_callbacks._validation import check_choice, check_fraction, check_int
from pat_callbacks.allocation import ALLOCATIONS, allocate, measure_sensitivity
from pat_callbacks.criteria import Criterion, get_criterion
from pat_callbacks.masks import MaskStore
from pat_callbacks.patterns import prune_count, unstructured_mask
from pat_callbacks.regrowth import drop_and_grow
from pat_callbacks.targets import normalize_patterns, select_parameters

__all__ = ["ZERO_PRESERVING_OPTIMIZERS", "PruningCallback"]

# Optimizers for which "masked gradients + zeroed state for newly pruned entries" keeps pruned weights exactly
# zero, so weights need masking only at mask updates (checked for each in tests/callbacks/test_gradual.py).
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


class PruningCallback(Callback):
    """Base class: masks, their enforcement, logging and checkpoint state.

    Subclasses say when masks change (:meth:`_on_step`); see :class:`~pat_callbacks.GradualPruning` and
    :class:`~pat_callbacks.DynamicSparseTraining`.

    Example:
        >>> from pat_callbacks import GradualPruning
        >>> isinstance(GradualPruning(final_sparsity=0.5, start_step=0, end_step=10), PruningCallback)
        True

    Args:
        criterion: importance score: ``"magnitude"``, ``"taylor"``, ``"movement"``, ``"fisher"``, ``"random"``
            or a :class:`~pat_callbacks.criteria.Criterion`.
        allocation: how a global target is split over layers: ``"uniform"``, ``"global"`` (mean-normalised
            scores), ``"global_raw"``, ``"erk"``, ``"er"``, ``"sensitivity"`` (see :mod:`pat_callbacks.allocation`).
        include: glob patterns of parameter names to prune (default: weights of Linear/Conv layers).
        exclude: glob patterns of parameter names to keep dense.
        keep_first, keep_last: keep the first / last pruned parameter (in model order) dense, as many papers do.
        layer_sparsity: ``{glob pattern: final sparsity}`` for layers you want at a given sparsity; they follow
            the schedule proportionally, and the other layers share what is left of the budget.
        min_sparsity, max_sparsity: per-layer caps for ``global``, ``global_raw`` and ``sensitivity``.
        probe_sparsity: the sparsity each layer is pruned to, alone, to measure its sensitivity.
        sensitivity_batches: batches (validation batches if the run has any, else training batches) the
            sensitivity probe evaluates; measured once, at the first mask update.
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` for the sensitivity probe; default: cross-entropy of
            ``pl_module(x)`` against ``y`` for ``(x, y)`` batches.
        remask_weights: re-zero pruned weights after every optimizer step. ``"auto"`` does it only when an
            optimizer is not one of :data:`ZERO_PRESERVING_OPTIMIZERS` (or under manual optimization).
        log_per_layer: log ``pruning/sparsity/<parameter>`` for each pruned parameter.
        prog_bar: show the overall sparsity in the progress bar.
    """

    def __init__(
        self,
        *,
        criterion: str | Criterion = "magnitude",
        allocation: str = "uniform",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        layer_sparsity: Mapping[str, float] | None = None,
        min_sparsity: float = 0.0,
        max_sparsity: float = 1.0,
        probe_sparsity: float = 0.9,
        sensitivity_batches: int = 4,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        self.criterion = get_criterion(criterion)
        self.allocation = check_choice("allocation", allocation, ALLOCATIONS)
        self.include = normalize_patterns("include", include)
        self.exclude = normalize_patterns("exclude", exclude)
        self.keep_first = bool(keep_first)
        self.keep_last = bool(keep_last)
        if layer_sparsity is not None and not isinstance(layer_sparsity, Mapping):
            raise ValueError(
                f"Expected `layer_sparsity` to be a mapping of pattern -> sparsity, got {layer_sparsity!r}"
            )
        self.layer_sparsity = {
            str(pattern): check_fraction(f"layer_sparsity[{pattern!r}]", value)
            for pattern, value in (layer_sparsity or {}).items()
        }
        self.min_sparsity = check_fraction("min_sparsity", min_sparsity, allow_one=True)
        self.max_sparsity = check_fraction("max_sparsity", max_sparsity, allow_one=True)
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(
                f"Expected `min_sparsity` <= `max_sparsity`, but got {self.min_sparsity} > {self.max_sparsity}"
            )
        self.probe_sparsity = check_fraction("probe_sparsity", probe_sparsity)
        self.sensitivity_batches = check_int("sensitivity_batches", sensitivity_batches, minimum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Expected `loss_fn` to be callable, but got {loss_fn!r}")
        self.loss_fn = loss_fn or _cross_entropy
        if remask_weights not in (True, False, "auto"):
            raise ValueError(f"Expected `remask_weights` to be True, False or 'auto', but got {remask_weights!r}")
        self.remask_weights = remask_weights
        self.log_per_layer = bool(log_per_layer)
        self.prog_bar = bool(prog_bar)

        self.store: MaskStore | None = None
        self.target_sparsity = 0.0
        self.last_update_step = -1
        self._last_seen_step = -1
        self._pending_state: dict[str, Any] | None = None
        self._remask_after_step = True
        self._stepped = False
        self._layer_sparsity: dict[str, float] = {}
        self._sparsity = 0.0
        self._log_pending = True
        self._extra_metrics: dict[str, float] = {}
        self.criterion_state: dict[str, dict[str, Tensor]] = {}
        self.sensitivities: dict[str, float] | None = None

    # ------------------------------------------------------------- subclass API
    @abstractmethod
    def _resolve(self, trainer: pl.Trainer) -> None:
        """Turn epoch/fraction arguments into steps once the trainer knows the epoch length."""

    def _select_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The parameters the mask store owns (default: :func:`~pat_callbacks.targets.select_parameters`)."""
        return select_parameters(pl_module, include=self.include, exclude=self.exclude)

    def _accumulating(self, step: int) -> bool:
        """Whether criteria with history accumulate at ``step`` (only while pruning is under way)."""
        return False

    @abstractmethod
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        """Update masks before optimizer step ``step`` if the method says so; return whether it did.

        Runs once per step, after backward (``p.grad`` holds this step's *dense* gradients) and before gradient
        masking, so criteria and regrowth can read gradients of pruned weights too.
        """

    # -------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        params = self._select_params(trainer, pl_module)
        names = list(params)
        dense = ({names[0]} if self.keep_first else set()) | ({names[-1]} if self.keep_last else set())
        params = {name: p for name, p in params.items() if name not in dense}
        if not params:
            raise ValueError(f"keep_first/keep_last leave no parameter to prune (targets were {names})")
        for pattern in self.layer_sparsity:
            if not any(fnmatchcase(name, pattern) for name in params):
                raise ValueError(
                    f"`layer_sparsity` pattern {pattern!r} matches no pruned parameter; pruned: {sorted(params)}"
                )
        self.store = MaskStore(params)
        if self.criterion.needs_grad and not pl_module.automatic_optimization:
            raise ValueError(
                f"criterion={self.criterion.name!r} reads gradients in on_before_optimizer_step, which manual "
                "optimization must reach through `self.optimizers().step()`; use automatic optimization"
            )
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(trainer)
        auto_ok = pl_module.automatic_optimization and all(
            type(opt) in ZERO_PRESERVING_OPTIMIZERS for opt in trainer.optimizers
        )
        self._remask_after_step = self.remask_weights is True or (self.remask_weights == "auto" and not auto_ok)
        store = self._require_store()
        # setup() (and a checkpoint restore) ran before the strategy moved the model to its device.
        store.sync_devices()
        self.criterion_state = {
            name: {key: value.to(store.params[name].device) for key, value in values.items()}
            for name, values in self.criterion_state.items()
        }
        store.apply()
        self._refresh_sparsity()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        store = self._require_store()
        step = trainer.global_step
        if step != self._last_seen_step:  # once per step, also with several optimizers
            self._last_seen_step = step
            if self.criterion.needs_history and self._accumulating(step):
                self._accumulate()
            if self._on_step(trainer, step):
                self.last_update_step = step
                if self.criterion.resets_after_update:  # history is "since the last update"
                    for values in self.criterion_state.values():
                        self.criterion.reset(values)
        store.mask_grads()
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        store = self._require_store()
        if self._remask_after_step and (self._stepped or not pl_module.automatic_optimization):
            store.apply()
        self._stepped = False
        if self._log_pending:
            self._log_sparsity(trainer, pl_module)
            self._log_pending = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_store().apply()

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "last_update_step": self.last_update_step,
            "target_sparsity": self.target_sparsity,
            "criterion_state": {name: dict(values) for name, values in self.criterion_state.items()},
            "criterion": self.criterion.state_dict(),
        }
        if self.sensitivities is not None:
            state["sensitivities"] = dict(self.sensitivities)
        if self.store is not None:
            state.update(self.store.state_dict())
        elif self._pending_state is not None:
            state.update(self._pending_state)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.store is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    # ---------------------------------------------------------------- internals
    def _restore(self, state: dict[str, Any]) -> None:
        store = self._require_store()
        store.load_state_dict(state)
        self.last_update_step = int(state.get("last_update_step", -1))
        self.criterion_state = {name: dict(values) for name, values in state.get("criterion_state", {}).items()}
        self.criterion.load_state_dict(state.get("criterion", {}))
        sensitivities = state.get("sensitivities")
        self.sensitivities = None if sensitivities is None else {k: float(v) for k, v in sensitivities.items()}
        self.target_sparsity = float(state.get("target_sparsity", store.sparsity()))
        self._refresh_sparsity()

    def _prune_to(self, trainer: pl.Trainer, target: float) -> bool:
        """Score, allocate and mask to ``target`` overall sparsity (``0.0`` lifts every mask).

        Returns ``False`` (masks untouched) when a score is NaN or infinite: the update is skipped with a warning
        and the criterion's history restarts, so the next update step tries again on clean numbers.
        """
        if target == 0.0:
            return self._lift_masks()
        scores = self._scores()
        if not self._all_finite(trainer, scores):
            return False
        self.target_sparsity = target
        sparsities = self._allocate(trainer, scores, target)
        self._commit_masks(trainer, {name: self._make_mask(scores[name], sparsities[name]) for name in scores})
        return True

    def _make_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        """Keep-mask for one layer at ``sparsity`` (unstructured; subclasses may impose a pattern)."""
        return unstructured_mask(scores, sparsity)

    def _lift_masks(self) -> bool:
        """Target 0: every parameter trains densely again (pruned weights restart from zero)."""
        self.target_sparsity = 0.0
        self._require_store().clear()
        self._refresh_sparsity()
        return True

    def _all_finite(self, trainer: pl.Trainer, tensors: Mapping[str, Tensor | None]) -> bool:
        bad = sorted(name for name, t in tensors.items() if t is not None and not bool(torch.isfinite(t).all()))
        if not bad:
            return True
        rank_zero_warn(
            f"{type(self).__name__}: NaN or Inf in the scores of {bad} at step {trainer.global_step}; the mask "
            "update is skipped (masks unchanged) and retried at the next update step"
        )
        for values in self.criterion_state.values():
            values.clear()
        return False

    def _drop_and_regrow(
        self, trainer: pl.Trainer, fraction: float, method: str, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """Swap ``fraction`` of each masked layer's active weights (see :func:`~pat_callbacks.regrowth.drop_and_grow`);
        regrown entries restart at zero with zeroed optimizer state. Returns metrics for the loggers."""
        store = self._require_store()
        new_masks, regrown = {}, {}
        for name, old in store.masks.items():
            param = store.params[name]
            if method == "rigl" and param.grad is None:
                continue  # a layer without a gradient this step keeps its mask
            new_masks[name] = drop_and_grow(old, param, param.grad, fraction, method, generator)
            regrown[name] = new_masks[name] & ~old
        n_active = sum(int(store.masks[name].sum()) for name in new_masks)
        if new_masks:
            self._commit_masks(trainer, new_masks, reset=regrown)
        n_regrown = sum(int(r.sum()) for r in regrown.values())
        return {
            "pruning/drop_fraction": fraction,
            "pruning/regrown": float(n_regrown),
            "pruning/dropped": float(n_regrown),
            "pruning/mask_change_rate": n_regrown / max(n_active, 1),
        }

    def _allocate(self, trainer: pl.Trainer, scores: dict[str, Tensor], target: float) -> dict[str, float]:
        """Per-layer sparsities: ``layer_sparsity`` overrides first, the allocation method for the rest."""
        final = float(getattr(self, "final_sparsity", target)) or target
        fixed = {}
        for name in scores:
            for pattern, value in self.layer_sparsity.items():
                if fnmatchcase(name, pattern):
                    fixed[name] = min(value * target / final, value) if final > 0 else value
                    break
        rest = {name: s for name, s in scores.items() if name not in fixed}
        if not rest:
            return fixed
        rest_target = target
        if fixed:
            numel = {name: s.numel() for name, s in scores.items()}
            pruned_fixed = sum(prune_count(numel[n], s) for n, s in fixed.items())
            rest_total = sum(numel[n] for n in rest)
            rest_target = (prune_count(sum(numel.values()), target) - pruned_fixed) / rest_total
            rest_target = min(max(rest_target, 0.0), 1.0 - 1.0 / rest_total)
        if self.allocation == "sensitivity" and self.sensitivities is None:
            self.sensitivities = self._measure_sensitivity(trainer, scores)
            self._extra_metrics.update({f"pruning/sensitivity/{n}": v for n, v in self.sensitivities.items()})
        return {
            **fixed,
            **allocate(
                self.allocation,
                rest,
                rest_target,
                min_sparsity=self.min_sparsity,
                max_sparsity=self.max_sparsity,
                sensitivities=self.sensitivities,
            ),
        }

    def _measure_sensitivity(self, trainer: pl.Trainer, scores: dict[str, Tensor]) -> dict[str, float]:
        store = self._require_store()
        loader = _first_nonempty(trainer.val_dataloaders, trainer.train_dataloader)
        if loader is None:
            raise RuntimeError("allocation='sensitivity' needs a validation or training dataloader to probe")
        pl_module = trainer.lightning_module
        batches = []
        for batch in loader:
            batches.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
            if len(batches) == self.sensitivity_batches:
                break
        return measure_sensitivity(pl_module, store.params, scores, self.probe_sparsity, batches, self.loss_fn)

    def _accumulate(self) -> None:
        store = self._require_store()
        for name, param in store.params.items():
            if param.grad is not None:
                self.criterion.accumulate(param, param.grad, self.criterion_state.setdefault(name, {}))

    def _commit_masks(
        self, trainer: pl.Trainer, masks: dict[str, Tensor], reset: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Make ``masks`` the same on every rank, store them, zero the pruned weights, and reset the optimizer
        state of newly pruned entries (and of ``reset``, e.g. regrown ones). Returns the newly pruned entries."""
        store = self._require_store()
        newly_pruned = store.set_masks(_broadcast_masks(masks))
        store.apply()
        to_reset = dict(newly_pruned)
        for name, entries in (reset or {}).items():
            to_reset[name] = to_reset[name] | entries if name in to_reset else entries
        store.reset_optimizer_state(trainer.optimizers, to_reset)
        self._refresh_sparsity()
        return newly_pruned

    def _scores(self) -> dict[str, Tensor]:
        store = self._require_store()
        scores = {}
        for name, param in store.params.items():
            if self.criterion.needs_grad and param.grad is None:
                raise RuntimeError(f"criterion={self.criterion.name!r} needs a gradient, but {name!r} has none")
            scores[name] = self.criterion.score(param, param.grad, self.criterion_state.get(name, {}))
        return scores

    def _refresh_sparsity(self) -> None:
        store = self._require_store()
        self._layer_sparsity = store.layer_sparsity()
        numel = {name: p.numel() for name, p in store.params.items()}
        pruned = sum(round(self._layer_sparsity[name] * n) for name, n in numel.items())
        self._sparsity = pruned / sum(numel.values())  # from the per-layer counts: no second pass over masks
        self._log_pending = True

    def _log_sparsity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log after each mask change only: sparsity is constant in between, and a ``self.log`` call costs
        ~0.1 ms, which per layer and per step would cost more than the masking itself.

        The overall sparsity goes through ``pl_module.log`` (progress bar, which keeps the last value); the full
        set (overall, target, per layer) goes to every attached logger at this exact step.
        """
        pl_module.log("pruning/sparsity", self._sparsity, prog_bar=self.prog_bar, on_step=True, on_epoch=False)
        metrics = {"pruning/sparsity": self._sparsity, "pruning/target": self.target_sparsity, **self._extra_metrics}
        if self.log_per_layer:
            metrics.update({f"pruning/sparsity/{name}": value for name, value in self._layer_sparsity.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(self.last_update_step, 0))

    def _require_store(self) -> MaskStore:
        if self.store is None:
            raise RuntimeError(
                f"{type(self).__name__} is used before `setup('fit')`: pass it to Trainer(callbacks=...)"
            )
        return self.store

    def _warn_if_unreached(self, trainer: pl.Trainer, end_step: int) -> None:
        total = trainer.estimated_stepping_batches
        if isinstance(total, (int, float)) and total != float("inf") and end_step >= total:
            rank_zero_warn(
                f"{type(self).__name__}: the schedule ends at step {end_step} but training has {int(total)} "
                "optimizer steps; the final sparsity will not be reached"
            )


def _broadcast_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Under torch.distributed, make every rank hold rank 0's masks (ranks may score differently)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return masks
    if torch.distributed.get_world_size() == 1:
        return masks
    synced = {}
    for name, mask in masks.items():
        as_bytes = mask.to(torch.uint8)
        torch.distributed.broadcast(as_bytes, src=0)
        synced[name] = as_bytes.bool()
    return synced


def _cross_entropy(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    inputs, targets = batch[0], batch[1]
    return torch.nn.functional.cross_entropy(pl_module(inputs), targets)


def _first_nonempty(*loaders: Any) -> Any:
    for loader in loaders:
        if isinstance(loader, (list, tuple)):
            loader = next((item for item in loader if item is not None), None)
        if loader is not None:
            try:
                if len(loader) == 0:
                    continue
            except TypeError:
                pass
            return loader
    return None
