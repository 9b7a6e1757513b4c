"""GradualPruning: schedule-driven pruning with step-level mask updates.

Example:
    >>> pruning = GradualPruning(sparsity=0.9, schedule="cubic", start_step=100, end_step=2000, update_every=100)
    >>> pruning.schedule(1050) > 0.7, pruning.schedule.is_update_step(1100)
    (True, True)
    >>> GradualPruning(schedule=lambda step: min(step / 1000, 0.8), start_step=0, end_step=800).sparsity
    0.8
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pat_callbacks._validation import check_fraction, check_int
from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback, resolve_target
from pat_callbacks.criteria import Criterion
from pat_callbacks.pruner import Pruner, PruningOptions
from pat_callbacks.schedules import Schedule

__all__ = ["GradualPruning"]


class GradualPruning(ScheduledPruningCallback):
    """Prune weights during training, following a sparsity schedule.

    At every update step of the schedule, weights are scored by ``criterion`` (using this step's dense
    gradients where needed), the target is split over layers by ``allocation``, and the lowest-scoring weights
    are masked: set to exactly zero, their optimizer state reset, their gradients zeroed at every later step.

    Bounds of the pruning window can be given in optimizer steps, in epochs (converted once the trainer knows the
    epoch length) or as fractions of the whole run (``trainer.estimated_stepping_batches``); each bound in one
    unit. With none given the window is 10% to 70% of training.

    Args:
        sparsity: sparsity reached at the end of the window, in [0, 1).
        final_sparsity: the former name of ``sparsity``, still accepted (giving both is an error). The schedule
            classes keep it (``CubicSchedule(final_sparsity=...)``: the value at the end of their ramp), and so
            does the checkpoint key, so checkpoints of earlier runs resume.
        schedule: ``"cubic"``, ``"polynomial"``, ``"linear"``, ``"exponential"``, ``"constant"``, ``"one_shot"``,
            ``"odd_even"``, a :class:`~pat_callbacks.schedules.Schedule` (which then carries its own steps
            and sparsity: the window arguments must be left unset), or a plain callable ``step -> sparsity``
            (updates every ``update_every`` steps over the window, by default the whole run).
        initial_sparsity: sparsity at the start of the window (ramp schedules only).
        start_step, start_epoch, start_fraction: where pruning starts (one of them).
        end_step, end_epoch, end_fraction: where the final sparsity is reached (one of them).
        update_every: optimizer steps between mask updates (default 100; not for ``odd_even``/``one_shot``).
        phase_steps, phase_epochs: length of each prune / recover phase for ``odd_even``.
        power: exponent of the ``polynomial`` schedule.
        pattern: ``"unstructured"`` (default), ``"block:RxC"`` (prune whole R x C blocks of rows x inputs, by
            their summed scores) or ``"N:M"``: keep N of every M consecutive weights of each output
            row (NVIDIA's convention: ``"2:4"`` keeps 2 of 4, 50% sparsity). With N:M, ``sparsity`` defaults
            to ``1 - N/M`` (any other value is refused), the schedule's intermediate targets round down to whole
            weights per group, and allocation is per layer (``"uniform"``).
        regrow_fraction: pruning reversal. At each update, after masking to the target, this fraction of the
            active weights with the lowest magnitude is swapped for as many pruned weights with the largest
            dense-gradient magnitude (as in RigL), which re-enter at zero with zeroed optimizer state; the
            target sparsity still holds per layer. ``0`` (default): a pruned weight never returns.
        criterion: ``"taylor"`` (default: ``|w * g|`` averaged over the training steps since the last update, no
            extra pass; it needs automatic optimization), ``"magnitude"``, ``"movement"``, ``"fisher"``,
            ``"random"`` or a :class:`~pat_callbacks.criteria.Criterion`.
        allocation: ``"global"`` (the default, except with an N:M pattern, which fixes every layer's sparsity:
            ``"uniform"``): one threshold over all layers on mean-normalised scores, so layers that matter less
            are pruned more; ``"uniform"`` (every layer at the target), ``"global_raw"``,
            ``"erk"``, ``"er"`` or ``"sensitivity"``. The defaults are the best configuration measured by
            ``bench/accuracy.py`` that needs nothing from the model (``sensitivity`` needs probe batches and a loss,
            and is refused under sharding); ``criterion="magnitude", allocation="uniform"`` is Zhu & Gupta's
            original recipe.
        include, exclude, keep_first, keep_last, layer_sparsity, min_sparsity, max_sparsity, allow_vectors: see
            :class:`~pat_callbacks.pruner.PruningOptions`.
        rewind_step: lottery-ticket rewinding (Frankle & Carbin 2019; with a late step, Frankle et al. 2020). The
            pruned weights are snapshotted after ``rewind_step`` optimizer steps (``0``: at initialisation); once,
            right after the last mask update of the window (the optimizer step of ``end_step``), every surviving
            weight is reset to its snapshot value and the masked network retrains from there for the rest of the
            run. The optimizer state of the rewound parameters (momentum, Adam's moments) is zeroed, as it
            belongs to the weights left behind; the learning-rate schedule is not rewound. Must be before
            ``end_step``; the snapshot (one copy of the pruned weights) is part of the checkpoint. Not with
            sharded (FSDP2) parameters. ``None`` (default): no rewinding.
        probe_sparsity: the sparsity each layer is pruned to, alone, to measure its sensitivity.
        sensitivity_batches: batches (validation batches if the run has any, else training batches) the
            sensitivity probe evaluates; measured once, at the first mask update.
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` for the sensitivity probe; default: cross-entropy of
            ``pl_module(x)`` against ``y`` for ``(x, y)`` batches.
        remask_weights, log_per_layer, prog_bar, verbose: see :class:`~pat_callbacks.callbacks.base.PruningCallback`.

    Example:
        >>> GradualPruning(sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: Expected `sparsity` to be a float in [0, 1), but got 1.5
    """

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: str | Schedule | Callable[[int], float] = "cubic",
        *,
        final_sparsity: float | None = None,
        initial_sparsity: float | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        start_fraction: float | None = None,
        end_fraction: float | None = None,
        update_every: int | None = None,
        phase_steps: int | None = None,
        phase_epochs: float | None = None,
        power: float | None = None,
        regrow_fraction: float = 0.0,
        pattern: str = "unstructured",
        criterion: str | Criterion = "taylor",
        allocation: str | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        layer_sparsity: Mapping[str, float] | None = None,
        min_sparsity: float = 0.0,
        max_sparsity: float = 1.0,
        allow_vectors: bool = False,
        rewind_step: int | None = None,
        probe_sparsity: float = 0.9,
        sensitivity_batches: int = 4,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
    ) -> None:
        if allocation is None:
            allocation = "uniform" if PruningOptions(pattern=pattern).pattern.fixed_sparsity is not None else "global"  # type: ignore[union-attr]
        options = PruningOptions(
            criterion=criterion,
            allocation=allocation,
            pattern=pattern,
            include=include,
            exclude=exclude,
            keep_first=keep_first,
            keep_last=keep_last,
            layer_sparsity=layer_sparsity,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            allow_vectors=allow_vectors,
        )
        self.regrow_fraction = check_fraction("regrow_fraction", regrow_fraction, allow_one=True)
        fixed = options.pattern.fixed_sparsity  # type: ignore[union-attr]
        if self.regrow_fraction > 0 and not options.pattern.allows_regrowth:  # type: ignore[union-attr]
            raise ValueError(f"regrow_fraction={self.regrow_fraction} would break the {pattern!r} pattern; use 0")
        target, key = resolve_target(sparsity, final_sparsity)
        if fixed is not None:
            if target is None and isinstance(schedule, str):
                target = fixed
            if target is not None and abs(target - fixed) > 1e-9:
                raise ValueError(f"pattern={pattern!r} reaches sparsity {fixed:g}, but got {key}={target!r}")
        super().__init__(
            target if key == "sparsity" else None,
            schedule,
            final_sparsity=target if key == "final_sparsity" else None,
            initial_sparsity=initial_sparsity,
            start_step=start_step,
            end_step=end_step,
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            start_fraction=start_fraction,
            end_fraction=end_fraction,
            update_every=update_every,
            phase_steps=phase_steps,
            phase_epochs=phase_epochs,
            power=power,
            remask_weights=remask_weights,
            log_per_layer=log_per_layer,
            prog_bar=prog_bar,
            verbose=verbose,
        )
        self.options = options
        self.rewind_step = None if rewind_step is None else check_int("rewind_step", rewind_step, minimum=0)
        self._rewind_to: dict[str, Tensor] | None = None  # the snapshot, taken at rewind_step
        self._rewind_pending = False  # the last update was made: rewind after this optimizer step
        self.rewound_at_step: int | None = None
        self.probe_sparsity = check_fraction("probe_sparsity", probe_sparsity)
        self.sensitivity_batches = check_int("sensitivity_batches", sensitivity_batches, minimum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Expected `loss_fn` to be callable, but got {loss_fn!r}")
        self.loss_fn = loss_fn or _cross_entropy

    @property
    def criterion(self) -> Criterion:
        """The importance criterion (see :mod:`pat_callbacks.criteria`)."""
        return self.options.criterion  # type: ignore[return-value]

    @property
    def allocation(self) -> str:
        """The layer-wise allocation (see :mod:`pat_callbacks.allocation`)."""
        return self.options.allocation

    @property
    def method_name(self) -> str:
        """``schedule/criterion/allocation``, e.g. ``cubic/taylor/sensitivity`` (for reports and metrics.json)."""
        return f"{self.schedule_name}/{self.criterion.name or type(self.criterion).__name__}/{self.allocation}"

    @override
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        pruner = Pruner(pl_module, self.options)
        if self.rewind_step is not None and pruner.group is not None:
            raise ValueError(f"rewind_step={self.rewind_step} is not supported with sharded (FSDP2) parameters yet")
        if not math.isnan(self.final_sparsity):  # a plain callable's target is checked once resolved
            pruner.check_reachable(self.final_sparsity, key=self._target_key)
        return pruner

    @override
    def _resolve(self, trainer: pl.Trainer) -> None:
        known = not math.isnan(self.final_sparsity)
        super()._resolve(trainer)
        if not known:
            self._require_pruner().check_reachable(self.final_sparsity, key=self._target_key)
        end = self._require_schedule().end_step
        if self.rewind_step is not None and self.rewind_step >= end:
            raise ValueError(
                f"Expected `rewind_step` before the end of the pruning window (end_step={end}), "
                f"but got rewind_step={self.rewind_step}"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._maybe_snapshot(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.rewind_step is None:
            return
        if self._rewind_pending:
            self._rewind(trainer)
        self._maybe_snapshot(trainer)

    def _maybe_snapshot(self, trainer: pl.Trainer) -> None:
        if self.rewind_step is not None and self._rewind_to is None and trainer.global_step == self.rewind_step:
            self._rewind_to = {name: p.detach().clone() for name, p in self._require_pruner().params.items()}

    def _rewind(self, trainer: pl.Trainer) -> None:
        """Surviving weights back to their snapshot; their optimizer state zeroed (after the last update)."""
        self._rewind_pending = False
        if self._rewind_to is None:
            rank_zero_warn(f"GradualPruning: no snapshot at rewind_step={self.rewind_step} (resumed past it?)")
            return
        pruner = self._require_pruner()
        with torch.no_grad():
            for name, param in pruner.params.items():
                param.copy_(self._rewind_to[name])
        pruner.apply()
        everything = {name: torch.ones_like(mask) for name, mask in pruner.store.masks.items()}
        pruner.reset_optimizer_state(trainer.optimizers, everything)
        self.rewound_at_step = trainer.global_step
        self._rewind_to = None  # used once; frees the copy

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.rewind_step is None:
            return state
        rewind = {"rewind_pending": self._rewind_pending, "rewound_at_step": self.rewound_at_step}
        if self._rewind_to is not None:
            rewind["rewind_to"] = {name: value.cpu() for name, value in self._rewind_to.items()}
        return {**state, **rewind}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        snapshot = state_dict.get("rewind_to")
        self._rewind_to = None if snapshot is None else {name: value.clone() for name, value in snapshot.items()}
        self._rewind_pending = bool(state_dict.get("rewind_pending", False))
        self.rewound_at_step = state_dict.get("rewound_at_step")
        rewind_keys = ("rewind_to", "rewind_pending", "rewound_at_step")
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in rewind_keys})

    @override
    def _update_masks_at_end(self, trainer: pl.Trainer, target: float) -> bool:
        if super()._update_masks_at_end(trainer, target):
            return True
        # No finite gradient-based score is left: the weights' magnitudes decide (they are finite or nothing is).
        pruner = self._require_pruner()
        scores = {name: p.detach().abs().float() for name, p in pruner.params.items()}
        return pruner.prune_to(target, final_sparsity=self.final_sparsity, scores=scores, optimizers=trainer.optimizers)

    @override
    def _update_masks(self, trainer: pl.Trainer, target: float) -> bool:
        pruner = self._require_pruner()
        if target > 0 and self.allocation == "sensitivity" and pruner.sensitivities is None:
            sensitivities = pruner.measure_sensitivity(
                _probe_batches(trainer, self.sensitivity_batches), self.loss_fn, self.probe_sparsity
            )
            self._extra_metrics.update({f"pruning/sensitivity/{n}": v for n, v in sensitivities.items()})
        optimizers = trainer.optimizers
        step = trainer.global_step
        if not pruner.prune_to(target, final_sparsity=self.final_sparsity, optimizers=optimizers, step=step):
            return False
        if self.regrow_fraction > 0 and target > 0:
            metrics = pruner.regrow(self.regrow_fraction, "rigl", optimizers=optimizers, step=step)
            self._extra_metrics = metrics or {}
        if self.rewind_step is not None and self.rewound_at_step is None and step >= self._require_schedule().end_step:
            self._rewind_pending = True  # after this step's optimizer step, in on_train_batch_end
        return True


def _probe_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` validation batches (training batches if the run has none), on the module's device."""
    loader = _first_nonempty(trainer.val_dataloaders, trainer.train_dataloader)
    if loader is None:
        raise RuntimeError("allocation='sensitivity' needs a validation or training dataloader to probe")
    pl_module = trainer.lightning_module
    batches = []
    for batch in loader:
        batches.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
        if len(batches) == count:
            break
    return batches


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
