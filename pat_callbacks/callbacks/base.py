"""Lightning wiring shared by the pruning callbacks: hooks -> :class:`~pat_callbacks.core.pruner.Pruner` calls.

A subclass builds the pruner (:meth:`PruningCallback._build_pruner`) and says when masks change
(:meth:`PruningCallback._on_step`); this class owns the hooks, and each hook below lists everything a pruning
callback does there, in order (the checks about the rest of the run are the functions of
:mod:`pat_callbacks.callbacks._guards`):

- ``on_fit_start``: refuse strategies that hide parameters; keep the pruner of a previous fit of the same model,
  else build one over the parameters the strategy trains (after ``configure_model`` and, under FSDP2, after
  sharding; a bad pattern or a model with nothing to prune fails here, before the first step); refuse two pruning
  callbacks on the same parameters; name frozen weights; restore checkpointed state;
- ``on_train_start``: resolve step arguments that need the run's length; masks follow the model's device;
- ``on_train_batch_start`` / ``on_train_epoch_start`` / ``on_train_epoch_end``: mask the copies of Lightning's
  weight averaging (SWA, EMA);
- ``on_before_optimizer_step``: once per step, re-bind replaced targets (and adopt unfrozen ones), feed criteria
  with history (Taylor / Fisher only over the ``accumulate_window`` steps before each update: elsewhere nothing),
  let the subclass update masks with the *dense* gradients of this step; then zero the gradients of pruned weights;
- ``on_train_batch_end``: re-mask weights if the optimizer is not known to keep zeros at zero, mask the averaged
  copies, and log overall / per-layer sparsity (progress bar too) after a mask change;
- ``on_validation_epoch_start`` / ``_end``, ``on_train_end``, ``on_fit_end``: mask the model (or, once swapped in,
  the average) and the averaged copies, so the averaged model training ends with has the masks' sparsity;
- ``on_load_checkpoint`` / ``state_dict`` / ``load_state_dict``: masks and position, so a resumed run continues
  exactly, also under changed arguments.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

import pat_callbacks.callbacks._guards as guards
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.protocol import MaskingPruner
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.core.targets import describe_targets, target_roles, weight_matrices

__all__ = ["ZERO_PRESERVING_OPTIMIZERS", "PruningCallback", "keeps_zeros", "saved_state_key"]

# Optimizers for which "masked gradients + zeroed state for newly pruned entries" keeps pruned weights exactly
# zero, so weights need masking only at mask updates (checked for each in tests/callbacks/test_gradual.py).
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def keeps_zeros(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the one a ``LightningOptimizer`` wraps) is one of :data:`ZERO_PRESERVING_OPTIMIZERS`.

    Example:
        >>> keeps_zeros(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
        True
    """
    return type(getattr(optimizer, "_optimizer", optimizer)) in ZERO_PRESERVING_OPTIMIZERS


def saved_state_key(callback: Any, callbacks: Sequence[Any], states: dict[str, Any]) -> str | None:
    """The key of ``callback``'s state in a checkpoint's ``states``: its own ``state_key`` if present, else the
    state saved by the same class at the same position among the instances whose keys are not found.

    Example:
        >>> class C:
        ...     def __init__(self, key): self.state_key = key
        >>> new = C("C{'sparsity': 0.9}")
        >>> saved_state_key(new, [new], {"C{'sparsity': 0.8}": {}})
        "C{'sparsity': 0.8}"
    """
    if callback.state_key in states:
        return callback.state_key
    prefix = f"{type(callback).__qualname__}{{"
    claimed = {cb.state_key for cb in callbacks if cb is not callback}
    candidates = [key for key in states if isinstance(key, str) and key.startswith(prefix) and key not in claimed]
    unmatched = [cb for cb in callbacks if type(cb) is type(callback) and cb.state_key not in states]
    position = next(i for i, cb in enumerate(unmatched) if cb is callback)
    return candidates[position] if position < len(candidates) else None


def _teachers(trainer: pl.Trainer) -> list[set[int]]:
    """The parameter ids of each distillation teacher among ``trainer``'s callbacks (given or copied)."""
    from pat_callbacks.callbacks.distillation import Distillation  # it imports this module

    teachers = [cb.teacher for cb in trainer.callbacks if isinstance(cb, Distillation)]
    return [{id(p) for p in teacher.parameters()} for teacher in teachers if teacher is not None]


class PruningCallback(Callback):
    """Base class: a :class:`~pat_callbacks.core.pruner.Pruner` driven by Lightning's hooks, with logging and
    checkpoint state.

    Subclasses build the pruner and say when masks change; see :class:`~pat_callbacks.GradualPruning`,
    :class:`~pat_callbacks.DynamicSparseTraining` and :class:`~pat_callbacks.StructuredPruning`.

    Example:
        >>> from pat_callbacks import GradualPruning
        >>> isinstance(GradualPruning(sparsity=0.5, start_step=0, end_step=10), PruningCallback)
        True

    Args:
        remask_weights: re-zero pruned weights after every optimizer step. ``"auto"`` does it only when an
            optimizer is not one of :data:`ZERO_PRESERVING_OPTIMIZERS` (or under manual optimization).
        log_per_layer: log ``pruning/sparsity/<parameter>`` for each pruned parameter.
        prog_bar: show the overall sparsity in the progress bar.
        verbose: print, when fitting starts (rank 0), a table of the model's weight matrices, pruned or left dense.

    Logged at every mask change: ``pruning/sparsity`` (over the targets), ``pruning/sparsity_all`` (exact zeros
    over every weight matrix of the model, embeddings included), ``pruning/target`` and per-layer values.

    With the rest of a run: the copy of the weights kept by Lightning's weight averaging
    (``StochasticWeightAveraging``, ``WeightAveraging``, ``EMAWeightAveraging``) respects the masks, in any callback
    order; a second ``fit`` of the same model continues from the masks reached (pruned weights stay pruned); a target
    replaced mid-run by a tensor of the same shape is re-bound with a warning naming it, a removed one is an error;
    an optimizer replaced mid-run by one not in :data:`ZERO_PRESERVING_OPTIMIZERS` turns ``remask_weights="auto"``
    to re-masking; two pruning callbacks on the same parameters are refused at fit start (on disjoint ones they
    coexist); weights frozen at fit start, which stay dense, are named in a warning; a checkpoint saved by another
    pruning callback class is warned about. Each hook below shows where.
    """

    def __init__(
        self,
        *,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if remask_weights not in (True, False, "auto"):
            raise ValueError(f"Expected `remask_weights` to be True, False or 'auto', but got {remask_weights!r}")
        self.remask_weights = remask_weights
        self.log_per_layer = bool(log_per_layer)
        self.prog_bar = bool(prog_bar)
        self.verbose = bool(verbose)

        self.pruner: MaskingPruner | None = None  # a Pruner, or a StructuredPruner
        self.last_update_step = -1
        self._last_seen_step = -1
        self._pending_state: dict[str, Any] | None = None
        self._remask_after_step = True
        self._stepped = False
        self._layer_sparsity: dict[str, float] = {}
        self._sparsity = 0.0
        self._sparsity_all = 0.0
        self._matrices: dict[str, torch.nn.Parameter] = {}
        self._log_pending = True
        self._extra_metrics: dict[str, float] = {}
        self._frozen_at_start: dict[str, torch.nn.Parameter] = {}  # left dense at fit start: adopted if unfrozen

    # ------------------------------------------------------------- subclass API
    @abstractmethod
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        """The pruner over ``pl_module``'s parameters (called in ``on_fit_start``, once the strategy set them up)."""

    @abstractmethod
    def _resolve(self, trainer: pl.Trainer) -> None:
        """Turn epoch/fraction arguments into steps once the trainer knows the epoch length."""

    def _follows_unfrozen(self) -> bool:
        """Whether weights frozen at fit start join the targets once they train (the pruner is rebuilt over the
        model's targets then, keeping the masks and history of the others)."""
        return False

    def _continue_fit(self) -> None:
        """A new fit of the same model keeps the pruner and its masks (subclasses keep what they must)."""

    def _accumulating(self, step: int) -> bool:
        """Whether criteria with history accumulate at ``step`` (only while pruning is under way, and for criteria
        averaged since the last update only over the pruner's ``accumulate_window`` steps before the next one)."""
        return False

    def _next_update(self, step: int) -> int | None:
        """The step of the next mask update at or after ``step``, passed to ``pruner.accumulate`` (``None``: not
        known, every step accumulates)."""
        return None

    @abstractmethod
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        """Update masks before optimizer step ``step`` if the method says so; return whether it did.

        Runs once per step, after backward (``p.grad`` holds this step's *dense* gradients) and before gradient
        masking, so criteria and regrowth can read gradients of pruned weights too.
        """

    # ------------------------------------------------------------- public state
    @property
    def store(self) -> MaskStore | None:
        """The pruner's mask store: the pruner itself (``None`` before ``on_fit_start``)."""
        return self.pruner if isinstance(self.pruner, MaskStore) else None

    @property
    def target_sparsity(self) -> float:
        """The overall target of the last mask update."""
        return self.pruner.target_sparsity if self.pruner is not None else 0.0

    @property
    def criterion_state(self) -> dict[str, dict[str, Tensor]]:
        """The criterion's per-parameter history (empty before ``setup`` and for criteria without history)."""
        return self.pruner.criterion_state if self.pruner is not None else {}

    @property
    def sensitivities(self) -> dict[str, float] | None:
        """Measured per-layer sensitivities (``allocation="sensitivity"``), once measured."""
        return self.pruner.sensitivities if self.pruner is not None else None

    # -------------------------------------------------------------- Lightning hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind to the parameters the strategy trains: after ``configure_model`` (models built there) and the
        strategy's setup (FSDP2's ``fully_shard`` replaces parameters by sharded DTensors), before the first step."""
        strategy = type(trainer.strategy).__name__
        if strategy.startswith(("DeepSpeed", "FSDPStrategy")):
            raise ValueError(
                f"{type(self).__name__} does not support {strategy} (it hides or flattens the parameters it trains); "
                "use ModelParallelStrategy (FSDP2, fully_shard in configure_model) or DDP"
            )
        self._last_seen_step = -1
        name = type(self).__name__
        if self._pending_state is None and guards.continues_fit(name, self.pruner, pl_module):
            self._continue_fit()  # a second fit of the same model: keep the pruner and its masks
        else:
            if self.pruner is not None and self._pending_state is None:  # reused on another model: start again
                rank_zero_info(f"{name}: a new model (not the one of the previous fit): pruning starts again")
                self.last_update_step = -1
            self.pruner = self._build_pruner(trainer, pl_module)
        self._matrices = weight_matrices(pl_module)
        others = [(type(cb).__name__, cb.pruner.params) for cb in self._other_pruning_callbacks(trainer)]
        guards.refuse_shared_targets(name, self.pruner.params, others)
        roles = target_roles(pl_module)
        for teacher in _teachers(trainer):  # a distillation teacher held by the module: frozen, never a target
            roles = {n: r for n, r in roles.items() if id(pl_module.get_parameter(n)) not in teacher}
        self._frozen_at_start = guards.warn_frozen(name, pl_module, roles, self.pruner.params, self._follows_unfrozen())
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: what is pruned\n{describe_targets(pl_module, self.pruner.params)}")
        if self.pruner.needs_grad and not pl_module.automatic_optimization:
            raise ValueError(
                f"criterion={self.pruner.scorer_name!r} reads gradients, which is not supported under manual "
                "optimization (automatic_optimization=False); use automatic optimization or criterion='magnitude'"
            )
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(trainer)
        auto_ok = pl_module.automatic_optimization and all(keeps_zeros(opt) for opt in trainer.optimizers)
        self._remask_after_step = self.remask_weights is True or (self.remask_weights == "auto" and not auto_ok)
        pruner = self._require_pruner()
        pruner.to_devices()  # a checkpoint restore may have run before the strategy moved the model
        pruner.apply()
        self._refresh_sparsity()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guards.mask_averages(self.pruner, trainer.callbacks)  # SWA / EMA copies within the masks, in any order

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        guards.mask_averages(self.pruner, trainer.callbacks)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self._remask_after_step and self.remask_weights == "auto" and not keeps_zeros(optimizer):
            self._remask_after_step = True  # an optimizer replaced mid-run by one not known to keep zeros at zero
            rank_zero_info(f"{type(self).__name__}: {type(optimizer).__name__} steps now: weights are re-masked")
        if step != self._last_seen_step:  # once per step, also with several optimizers
            self._last_seen_step = step
            self._check_targets(pl_module, step)  # may rebind the pruner (targets replaced or unfrozen)
            pruner = self._require_pruner()
            if self._accumulating(step):  # else no per-step work for the criterion at all
                pruner.accumulate(step, self._next_update(step))
            if self._on_step(trainer, step):
                self.last_update_step = step
                self._refresh_sparsity()
                pruner.after_update()
        self._require_pruner().mask_grads()
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pruner = self._require_pruner()
        if self._remask_after_step and (self._stepped or not pl_module.automatic_optimization):
            pruner.apply()
        self._stepped = False
        guards.mask_averages(pruner, trainer.callbacks)
        if self._log_pending:
            self._log_sparsity(trainer, pl_module)
            self._log_pending = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guards.mask_averages(self.pruner, trainer.callbacks)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:
            guards.mask_averages(self.pruner, trainer.callbacks)
            self.pruner.apply()  # the model or, once swapped in, the average

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:
            guards.mask_averages(self.pruner, trainer.callbacks)
            self.pruner.apply()  # the model or, while swapped in, the average

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_targets(pl_module, trainer.global_step)
        self._require_pruner().apply()
        guards.mask_averages(self.pruner, trainer.callbacks)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After every callback's ``on_train_end`` (weight averaging copies its average over the model there)."""
        if self.pruner is not None:
            self.pruner.apply()
            guards.mask_averages(self.pruner, trainer.callbacks)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this callback's saved state even when the arguments (hence ``state_key``) changed.

        Lightning looks the state up by ``state_key`` only, which holds the arguments (``final_sparsity``, ...): a
        changed config would silently restart pruning from scratch. Here the state saved by the same class at the
        same position among its instances is taken instead; :meth:`_check_resumable` may refuse it.
        """
        states = checkpoint.get("callbacks") or {}
        key = saved_state_key(self, trainer.callbacks, states)
        if key is None:
            claimed = [cb.state_key for cb in trainer.callbacks if isinstance(cb, Callback)]
            guards.warn_foreign_states(type(self), guards.all_subclasses(PruningCallback), states, claimed)
        if key is None or key == self.state_key:
            return  # nothing saved, or Lightning restores it
        self._check_resumable(key, states[key])
        rank_zero_warn(
            f"{type(self).__name__}: the checkpoint's pruning state was saved under {key} and this run continues "
            f"with {self.state_key}: masks and progress are restored, and the new arguments apply from here"
        )
        self.load_state_dict(copy.deepcopy(states[key]))

    def _check_resumable(self, saved_key: str, state: dict[str, Any]) -> None:
        """Raise if the state saved under ``saved_key`` cannot continue under this callback's arguments."""

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.pruner is not None:
            return {"last_update_step": self.last_update_step, **self.pruner.state_dict()}
        if self._pending_state is not None:
            return dict(self._pending_state)
        return {"last_update_step": self.last_update_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.pruner is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    # ---------------------------------------------------------------- internals
    def _other_pruning_callbacks(self, trainer: pl.Trainer) -> list[PruningCallback]:
        others = [cb for cb in trainer.callbacks if cb is not self and isinstance(cb, PruningCallback)]
        return [cb for cb in others if cb.pruner is not None]

    def _check_targets(self, pl_module: pl.LightningModule, step: int) -> None:
        """Re-bind targets replaced by a tensor of the same shape (refusing removed ones), then adopt weights
        frozen at fit start that train now, if this callback follows them."""
        if guards.rebind_replaced(type(self).__name__, self._require_pruner(), pl_module, step):
            self._matrices = weight_matrices(pl_module)
            self._refresh_sparsity()
        unfrozen = [name for name, param in self._frozen_at_start.items() if param.requires_grad]
        if unfrozen and self._follows_unfrozen():
            self._adopt(unfrozen, pl_module, step)

    def _adopt(self, unfrozen: list[str], pl_module: pl.LightningModule, step: int) -> None:
        """Rebuild the pruner over the model's targets, now with ``unfrozen``, keeping the others' masks and history."""
        old = self._require_pruner()
        pruner = self._build_pruner(pl_module.trainer, pl_module)
        if not set(old.params) <= set(pruner.params):
            return  # targets changed in another way: keep the pruner as it is
        pruner.load_state_dict(old.state_dict())
        self.pruner = pruner
        for name in unfrozen:
            del self._frozen_at_start[name]
        rank_zero_info(f"{type(self).__name__}: {unfrozen} train from step {step} on and are pruned from now on")
        self._refresh_sparsity()

    def _restore(self, state: dict[str, Any]) -> None:
        self._require_pruner().load_state_dict(state)
        self.last_update_step = int(state.get("last_update_step", -1))
        self._refresh_sparsity()

    def _refresh_sparsity(self) -> None:
        pruner = self._require_pruner()
        self._layer_sparsity = pruner.layer_sparsity()
        numel = {name: p.numel() for name, p in pruner.params.items()}
        pruned = sum(round(self._layer_sparsity[name] * n) for name, n in numel.items())
        self._sparsity = pruned / sum(numel.values())  # from the per-layer counts: no second pass over masks
        self._sparsity_all = pruner.zeros_over(self._matrices, self._layer_sparsity)
        self._log_pending = True

    @property
    def sparsity_all(self) -> float:
        """Exact zeros over every weight matrix of the model (embeddings included), as of the last mask change."""
        return self._sparsity_all

    def _log_sparsity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log after each mask change only: sparsity is constant in between, and a ``self.log`` call costs
        ~0.1 ms, which per layer and per step would cost more than the masking itself.

        The overall sparsity goes through ``pl_module.log`` (progress bar, which keeps the last value); the full
        set (overall, target, per layer) goes to every attached logger at this exact step.
        """
        pl_module.log("pruning/sparsity", self._sparsity, prog_bar=self.prog_bar, on_step=True, on_epoch=False)
        metrics = {
            "pruning/sparsity": self._sparsity,
            "pruning/sparsity_all": self._sparsity_all,
            "pruning/target": self.target_sparsity,
            **self._extra_metrics,
        }
        if self.log_per_layer:
            metrics.update({f"pruning/sparsity/{name}": value for name, value in self._layer_sparsity.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(self.last_update_step, 0))

    def _require_pruner(self) -> Pruner:
        if self.pruner is None:
            raise RuntimeError(
                f"{type(self).__name__} is used before `on_fit_start`: pass it to Trainer(callbacks=...)"
            )
        return self.pruner
