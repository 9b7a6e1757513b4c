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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import Unpack, override

from pat_callbacks.callbacks._batches import module_loss_or_cross_entropy, probe_batches
from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback, resolve_target
from pat_callbacks.core._validation import check_fraction, check_int, renamed
from pat_callbacks.core.criteria import Criterion, get_criterion
from pat_callbacks.core.options import ACCUMULATE_WINDOW
from pat_callbacks.core.pruner import Pruner, PruningOptions
from pat_callbacks.core.schedules import Schedule
from pat_callbacks.core.windows import WindowArguments

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
            ``"odd_even"``, a :class:`~pat_callbacks.core.schedules.Schedule` (which then carries its own steps
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
        drop_fraction: pruning reversal. At each update, after masking to the target, this fraction of the
            active weights with the lowest magnitude is swapped for as many pruned weights with the largest
            dense-gradient magnitude (as in RigL), which re-enter at zero with zeroed optimizer state; the
            target sparsity still holds per layer. ``0`` (default): a pruned weight never returns. The same word as
            :class:`~pat_callbacks.DynamicSparseTraining`'s ``drop_fraction`` and :meth:`Pruner.regrow`'s.
        regrow_fraction: the former name of ``drop_fraction`` (a DeprecationWarning; giving both is an error).
        criterion: ``"taylor"`` (default: ``|w * g|`` averaged over the ``accumulate_window`` steps before each update,
            no extra pass; it needs automatic optimization), ``"magnitude"``, ``"movement"``, ``"fisher"``,
            ``"random"`` or a :class:`~pat_callbacks.core.criteria.Criterion`. Left unset on a module with manual
            optimization (e.g. a GAN), the default becomes ``"magnitude"`` (one info line), since no hook sees every
            gradient there; ``criterion="taylor"`` given explicitly is refused there instead, with the reason.
        allocation: ``"global"`` (the default, except with an N:M pattern, which fixes every layer's sparsity:
            ``"uniform"``): one threshold over all layers on mean-normalised scores, so layers that matter less
            are pruned more; ``"uniform"`` (every layer at the target), ``"global_raw"``,
            ``"erk"``, ``"er"`` or ``"sensitivity"``. The defaults are the best configuration measured by
            ``bench/accuracy.py`` that needs nothing from the model (``sensitivity`` needs probe batches and a loss,
            and is refused under sharding); ``criterion="magnitude", allocation="uniform"`` is Zhu & Gupta's
            original recipe.
        include, exclude, keep_first, keep_last, layer_sparsity, min_sparsity, max_sparsity, allow_vectors: see
            :class:`~pat_callbacks.core.pruner.PruningOptions`.
        accumulate_window: the steps before each mask update (the update step included) over which ``taylor`` /
            ``fisher`` average ``|w * g|`` (default 40, measured by ``bench/accuracy.py`` to lose nothing at 0.9 and
            0.95); the other steps cost the criterion nothing. ``None``: every step since the last update (the
            former behaviour).
        history_dtype: ``"bfloat16"`` (default: half the bytes of float32, 99.9% of the same mask entries,
            ``bench/history_precision.py``) or ``"float32"`` (the former behaviour): the dtype of that history.
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
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` for the sensitivity probe; default: the module's own
            ``loss(batch)`` if it defines one (e.g. ``LanguageModel``), else cross-entropy of ``pl_module(x)``
            against ``y`` for ``(x, y)`` batches.
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
        drop_fraction: float = 0.0,
        regrow_fraction: float | None = None,
        pattern: str = "unstructured",
        criterion: str | Criterion | None = None,
        allocation: str | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        layer_sparsity: Mapping[str, float] | None = None,
        min_sparsity: float = 0.0,
        max_sparsity: float = 1.0,
        allow_vectors: bool = False,
        accumulate_window: int | None = ACCUMULATE_WINDOW,
        history_dtype: str = "bfloat16",
        rewind_step: int | None = None,
        probe_sparsity: float = 0.9,
        sensitivity_batches: int = 4,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
        **window: Unpack[WindowArguments],
    ) -> None:
        if allocation is None:
            allocation = "uniform" if PruningOptions(pattern=pattern).pattern.fixed_sparsity is not None else "global"  # type: ignore[union-attr]
        self._criterion_given = criterion is not None
        options = PruningOptions(
            criterion="taylor" if criterion is None else criterion,
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
            accumulate_window=accumulate_window,
            history_dtype=history_dtype,
        )
        drop_fraction, drop_key = renamed("regrow_fraction", regrow_fraction, "drop_fraction", drop_fraction, 0.0)
        self.drop_fraction = check_fraction(drop_key, drop_fraction, allow_one=True)
        fixed = options.pattern.fixed_sparsity  # type: ignore[union-attr]
        if self.drop_fraction > 0 and not options.pattern.allows_regrowth:  # type: ignore[union-attr]
            raise ValueError(f"{drop_key}={self.drop_fraction} would break the {pattern!r} pattern; use 0")
        target, key = resolve_target(sparsity, final_sparsity, warn=False)  # ScheduledPruningCallback warns
        if fixed is not None:
            if target is None and isinstance(schedule, str):
                target = fixed
            if target is not None and abs(target - fixed) > 1e-9:
                raise ValueError(f"pattern={pattern!r} reaches sparsity {fixed:g}, but got {key}={target!r}")
        super().__init__(
            target if key == "sparsity" else None,
            schedule,
            final_sparsity=target if key == "final_sparsity" else None,
            remask_weights=remask_weights,
            log_per_layer=log_per_layer,
            prog_bar=prog_bar,
            verbose=verbose,
            **window,
        )
        self.options = options
        self.rewind_step = None if rewind_step is None else check_int("rewind_step", rewind_step, minimum=0)
        self.rewinding = _Rewinding(self.rewind_step) if self.rewind_step is not None else None
        self.probe_sparsity = check_fraction("probe_sparsity", probe_sparsity)
        self.sensitivity_batches = check_int("sensitivity_batches", sensitivity_batches, minimum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Expected `loss_fn` to be callable, but got {loss_fn!r}")
        self.loss_fn = loss_fn or module_loss_or_cross_entropy

    @property
    def regrow_fraction(self) -> float:
        """The former name of :attr:`drop_fraction`."""
        return self.drop_fraction

    @property
    def criterion(self) -> Criterion:
        """The importance criterion (see :mod:`pat_callbacks.core.criteria`)."""
        return self.options.criterion  # type: ignore[return-value]

    @property
    def allocation(self) -> str:
        """The layer-wise allocation (see :mod:`pat_callbacks.core.allocation`)."""
        return self.options.allocation

    @property
    def method_name(self) -> str:
        """``schedule/criterion/allocation``, e.g. ``cubic/taylor/sensitivity`` (for reports and metrics.json)."""
        return f"{self.schedule_name}/{self.criterion.name or type(self.criterion).__name__}/{self.allocation}"

    @override
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        if not pl_module.automatic_optimization and not self._criterion_given and self.criterion.needs_grad:
            self.options.criterion = get_criterion("magnitude")
            rank_zero_info(
                f"{type(self).__name__}: manual optimization: the default criterion 'taylor' needs every step's "
                "gradients, so criterion='magnitude' is used (pass `criterion` to choose)"
            )
        pruner = Pruner(pl_module, self.options)
        if self.rewind_step is not None and pruner.group is not None:
            raise ValueError(f"rewind_step={self.rewind_step} is not supported with sharded (FSDP2) parameters yet")
        if not math.isnan(self.final_sparsity):  # a plain callable's target is checked once resolved
            pruner.check_reachable(self.final_sparsity, key=self._target_key)
        return pruner

    @override
    def _follows_unfrozen(self) -> bool:  # default targets; not with a rewind snapshot or measured sensitivities
        return not self.options.include and self.rewind_step is None and self.allocation != "sensitivity"

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
        super().on_train_start(trainer, pl_module)  # window resolved, masks applied
        if self.rewinding is not None:  # rewind_step=0: the snapshot of the weights training starts from
            self.rewinding.maybe_snapshot(trainer.global_step, self._require_pruner())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # re-mask, averages, logging
        if self.rewinding is not None:  # after the optimizer step: rewind if the last update asked, then snapshot
            self.rewinding.after_step(trainer.global_step, self._require_pruner(), trainer.optimizers)

    @property
    def rewound_at_step(self) -> int | None:
        """The step after which surviving weights were rewound (``None`` before, or without ``rewind_step``)."""
        return self.rewinding.rewound_at_step if self.rewinding is not None else None

    @property
    def _rewind_to(self) -> dict[str, Tensor] | None:
        return self.rewinding.snapshot if self.rewinding is not None else None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return state if self.rewinding is None else {**state, **self.rewinding.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.rewinding is not None:
            self.rewinding.load_state_dict(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in _Rewinding.KEYS})

    @override
    def _update_masks_at_end(self, trainer: pl.Trainer, target: float) -> bool:
        if super()._update_masks_at_end(trainer, target):
            return True
        # No finite gradient-based score is left: the weights' magnitudes decide (they are finite or nothing is).
        pruner = self._require_pruner()
        scores = {name: p.detach().abs().float() for name, p in pruner.params.items()}
        return pruner.prune_to(target, final_target=self.final_sparsity, scores=scores, optimizers=trainer.optimizers)

    @override
    def _update_masks(self, trainer: pl.Trainer, target: float) -> bool:
        pruner = self._require_pruner()
        if target > 0 and self.allocation == "sensitivity" and pruner.sensitivities is None:
            sensitivities = pruner.measure_sensitivity(
                probe_batches(trainer, self.sensitivity_batches), self.loss_fn, self.probe_sparsity
            )
            self._extra_metrics.update({f"pruning/sensitivity/{n}": v for n, v in sensitivities.items()})
        optimizers = trainer.optimizers
        step = trainer.global_step
        if not pruner.prune_to(target, final_target=self.final_sparsity, optimizers=optimizers, step=step):
            return False
        if self.drop_fraction > 0 and target > 0:
            metrics = pruner.regrow(self.drop_fraction, "rigl", optimizers=optimizers, step=step)
            self._extra_metrics = metrics or {}
        if self.rewinding is not None and step >= self._require_schedule().end_step:
            self.rewinding.request()  # after this step's optimizer step, in on_train_batch_end
        return True


class _Rewinding:
    """Lottery-ticket rewinding: a snapshot at ``rewind_step``, restored once after the last update. When to
    snapshot and when to rewind (the weights' side is :meth:`Pruner.snapshot` / :meth:`Pruner.rewind`).

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(4, 4)
        >>> pruner, rewinding = Pruner(layer), _Rewinding(0)
        >>> rewinding.maybe_snapshot(0, pruner)
        >>> _ = pruner.prune_to(0.5); rewinding.request(); rewinding.after_step(10, pruner, [])
        >>> rewinding.rewound_at_step
        10
    """

    KEYS: ClassVar[tuple[str, ...]] = ("rewind_to", "rewind_pending", "rewound_at_step")

    def __init__(self, step: int) -> None:
        self.step = step
        self.snapshot: dict[str, Tensor] | None = None  # taken at `step`, freed once used
        self.pending = False  # the last update was made: rewind after this optimizer step
        self.rewound_at_step: int | None = None

    def maybe_snapshot(self, global_step: int, pruner: Pruner) -> None:
        if self.snapshot is None and self.rewound_at_step is None and global_step == self.step:
            self.snapshot = pruner.snapshot()

    def request(self) -> None:
        if self.rewound_at_step is None:
            self.pending = True

    def after_step(self, global_step: int, pruner: Pruner, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Rewind if requested (surviving weights to the snapshot, optimizer state zeroed), then maybe snapshot."""
        if self.pending:
            self.pending = False
            if self.snapshot is None:
                rank_zero_warn(f"GradualPruning: no snapshot at rewind_step={self.step} (resumed past it?)")
            else:
                pruner.rewind(self.snapshot, optimizers)
                self.rewound_at_step = global_step
                self.snapshot = None
        self.maybe_snapshot(global_step, pruner)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rewind_pending": self.pending, "rewound_at_step": self.rewound_at_step}
        if self.snapshot is not None:
            state["rewind_to"] = {name: value.cpu() for name, value in self.snapshot.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        snapshot = state.get("rewind_to")
        self.snapshot = None if snapshot is None else {name: value.clone() for name, value in snapshot.items()}
        self.pending = bool(state.get("rewind_pending", False))
        self.rewound_at_step = state.get("rewound_at_step")
