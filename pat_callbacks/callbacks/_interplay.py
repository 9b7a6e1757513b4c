"""The part of :class:`~pat_callbacks.callbacks.base.PruningCallback` that deals with the rest of a run: Lightning's
weight-averaging callbacks, targets replaced mid-run, other pruning callbacks, checkpoints of another pruning class
(the checks themselves are the small functions of :mod:`pat_callbacks.callbacks._guards`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

import pat_callbacks.callbacks._guards as _guards
from pat_callbacks.core.targets import target_roles, weight_matrices

__all__ = ["RunInterplay", "keeps_zeros"]

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


class RunInterplay(Callback):
    """Hooks and checks shared by every pruning callback (the pruner itself lives in the subclass: ``self.pruner``).

    The copy of the weights
    kept by Lightning's weight averaging (``StochasticWeightAveraging``, ``WeightAveraging``,
    ``EMAWeightAveraging``) respects the masks, in any callback order; a second ``fit`` of the same model continues
    from the masks reached (pruned weights stay pruned); a target replaced mid-run by a tensor of the same shape is
    re-bound with a warning naming it, a removed one is an error; an optimizer replaced mid-run by one not in
    :data:`ZERO_PRESERVING_OPTIMIZERS` turns ``remask_weights="auto"`` to re-masking; two pruning callbacks on the
    same parameters are refused at fit start (on disjoint ones they coexist); weights frozen at fit start, which stay
    dense, are named in a warning; a checkpoint saved by another pruning callback class is warned about.

    Weight averaging keeps its own copy of the weights, swaps it in for validation and copies it over the model at
    the end of training: its pruned entries are zeroed at every hook around those moments (train batch and epoch
    start and end, validation start and end, train end), whatever the order of the callbacks, and at ``on_fit_end``
    (after every ``on_train_end``) the model is masked once more. So the averaged model that training ends with
    has the masks' sparsity; averages of kept weights are untouched.

    Example:
        >>> from pat_callbacks import GradualPruning
        >>> isinstance(GradualPruning(sparsity=0.5, start_step=0, end_step=10), RunInterplay)
        True
    """

    pruner: Any
    _matrices: dict[str, Any]

    def _refresh_sparsity(self) -> None:
        """Recount sparsity after masks changed (the pruning callback's own)."""

    def _mask_averages(self, trainer: pl.Trainer) -> None:
        if self.pruner is not None and self.pruner.group is None:
            _guards.mask_averaged_copies(self.pruner.masks, _guards.averaged_copies(trainer.callbacks))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._mask_averages(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mask_averages(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mask_averages(trainer)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:
            self._mask_averages(trainer)
            self.pruner.apply()  # the model or, once swapped in, the average

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is not None:
            self.pruner.apply()
            self._mask_averages(trainer)

    def _warn_frozen(self, pl_module: pl.LightningModule) -> None:
        """Name the weights left dense because they are frozen when fitting starts (and follow them, if this
        callback can: see :meth:`_follows_unfrozen`)."""
        frozen = _guards.frozen_targets(target_roles(pl_module), pl_module, self.pruner.params)
        self._frozen_at_start = {name: pl_module.get_parameter(name) for name in frozen}
        if frozen:
            later = (
                "they become targets at the first step they train (requires_grad=True, e.g. unfrozen by "
                "BackboneFinetuning)"
                if self._follows_unfrozen()
                else "they are not pruned, even if unfrozen later (e.g. by BackboneFinetuning); name them in "
                "`include` (with criterion='magnitude') to prune them"
            )
            rank_zero_warn(
                f"{type(self).__name__}: {frozen[:5]}{f' and {len(frozen) - 5} more' if len(frozen) > 5 else ''} "
                f"are frozen (requires_grad=False) when fitting starts, so they are left dense for now; {later}"
            )

    def _follows_unfrozen(self) -> bool:
        """Whether weights frozen at fit start join the targets once they train (the pruner is rebuilt over the
        model's targets then, keeping the masks and history of the others)."""
        return False

    def _adopt_unfrozen(self, pl_module: pl.LightningModule, step: int) -> None:
        frozen = getattr(self, "_frozen_at_start", {})
        unfrozen = [name for name, param in frozen.items() if param.requires_grad]
        if not unfrozen or not self._follows_unfrozen():
            return
        old = self.pruner
        pruner = self._build_pruner(pl_module.trainer, pl_module)  # type: ignore[attr-defined]
        if not set(old.params) <= set(pruner.params):
            return  # targets changed in another way: keep the pruner as it is
        pruner.load_state_dict(old.state_dict())
        self.pruner = pruner
        for name in unfrozen:
            del frozen[name]
        rank_zero_info(f"{type(self).__name__}: {unfrozen} train from step {step} on and are pruned from now on")
        self._refresh_sparsity()

    def _continues(self, pl_module: pl.LightningModule) -> bool:
        """Whether this fit continues a previous one of the same model (same parameters): masks are kept."""
        if getattr(self, "_pending_state", None) is not None or self.pruner is None:
            return False
        replaced, gone = _guards.stale(self.pruner.params, pl_module)
        if replaced or gone:
            return False
        rank_zero_info(
            f"{type(self).__name__}: a new fit of the same model continues with the masks reached so far "
            f"(sparsity {self.pruner.sparsity():.4f}); pruned weights stay pruned"
        )
        self._continue_fit()
        return True

    def _continue_fit(self) -> None:
        """A new fit of the same model keeps the pruner and its masks (subclasses keep what they must)."""

    def _check_targets(self, pl_module: pl.LightningModule, step: int) -> None:
        """Re-bind targets replaced by a tensor of the same shape (their masks apply to it), refuse removed ones."""
        pruner = self.pruner
        replaced, gone = _guards.stale(pruner.params, pl_module)
        if gone:
            raise RuntimeError(
                f"{type(self).__name__}: {gone} is no longer a parameter of the model (or has another shape) at step "
                f"{step}: masks are bound to the parameters of fit start; replace a pruned layer by one of the same "
                "shape, or start a new fit with a new callback"
            )
        if replaced:
            rank_zero_warn(
                f"{type(self).__name__}: {sorted(replaced)[0]!r} was replaced by a new tensor at step {step} "
                f"({sorted(replaced)}); its mask now applies to the new tensor (an optimizer created before the "
                "replacement does not train it)"
            )
            pruner.params.update(replaced)
            pruner.apply()
            self._matrices = weight_matrices(pl_module)
            self._refresh_sparsity()
        self._adopt_unfrozen(pl_module, step)

    def _check_other_pruners(self, trainer: pl.Trainer) -> None:
        pruner = self.pruner
        for other in trainer.callbacks:
            if other is self or not isinstance(other, RunInterplay) or other.pruner is None:
                continue
            shared = _guards.shared_targets(pruner.params, other.pruner.params)
            if shared:
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} both prune {shared[:5]}: two pruning callbacks "
                    "would overwrite each other's masks; use one, or give them disjoint `include` / `exclude`"
                )

    def _warn_foreign_states(self, trainer: pl.Trainer, states: dict[str, Any]) -> None:
        claimed = [cb.state_key for cb in trainer.callbacks if isinstance(cb, Callback)]
        for key in _guards.foreign_states(type(self), _guards.all_subclasses(RunInterplay), states, claimed):
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds the pruning state of {key.split('{', 1)[0]} ({key}), "
                f"which {type(self).__name__} does not read: its masks are not restored and pruning starts afresh "
                f"(the weights keep their zeros until masks are made); resume with {key.split('{', 1)[0]} to continue, "
                "or fine-tune with KeepSparsity to hold its zeros"
            )
