"""The schedule-driven base of GradualPruning and StructuredPruning: a schedule and its window, resolved once the
trainer knows the run's length, masks updated at the schedule's update steps.

Example:
    >>> from pat_callbacks import GradualPruning
    >>> pruning = GradualPruning(sparsity=0.9, start_step=100, end_step=2000, update_every=100)
    >>> isinstance(pruning, ScheduledPruningCallback), pruning.schedule(2000)
    (True, 0.9)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import Unpack, override

from pat_callbacks.callbacks._guards import warn_if_unreached
from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core._validation import renamed
from pat_callbacks.core.schedules import OneShotSchedule, Schedule, next_update_step
from pat_callbacks.core.windows import ScheduleSpec, WindowArguments, check_window_arguments

__all__ = ["ScheduledPruningCallback", "default_update_every", "few_updates_message", "resolve_target"]


class ScheduledPruningCallback(PruningCallback):
    """Masks follow a sparsity schedule: at each of its update steps, :meth:`_update_masks` to ``schedule(step)``.

    Args:
        sparsity: sparsity reached at the end of the window, in [0, 1).
        schedule: a registered name, a :class:`~pat_callbacks.core.schedules.Schedule` (which carries its own steps and
            sparsity) or a plain callable ``step -> sparsity`` (see :class:`~pat_callbacks.core.windows.ScheduleSpec`).
        **window: the window and the schedule's own arguments (:class:`~pat_callbacks.core.windows.WindowArguments`:
            ``initial_sparsity``, ``start_step`` / ``start_epoch`` / ``start_fraction``, ``end_step`` / ``end_epoch``
            / ``end_fraction``, ``update_every``, ``phase_steps``, ``phase_epochs``, ``power``).
        final_sparsity: the former name of ``sparsity``, still accepted (giving both is an error).
        remask_weights, log_per_layer, prog_bar, verbose: see :class:`~pat_callbacks.callbacks.base.PruningCallback`.

    Under ``Trainer(fast_dev_run=...)`` the window is not used: masks are made once, at step 0, at the final sparsity
    (a warning says so), so the smoke test runs the pruning path. A window that starts at or after the run's last
    optimizer step is refused when the trainer knows the run's length. A second ``fit`` of the same model with the
    same callback keeps the masks reached so far: the schedule's targets below that sparsity are raised to it.
    When ``update_every`` is not given and the window is resolved from the run's length (fractions or epochs; the
    default 10% to 70%), a window that the default of 100 steps would cover in fewer than :data:`MIN_UPDATES` mask
    updates gets about 10 instead (:func:`default_update_every`, one info line); an explicit ``update_every``, or a
    window given in steps, is kept and warned about.

    Example:
        >>> from pat_callbacks.core.pruner import Pruner
        >>> class MagnitudeOnly(ScheduledPruningCallback):  # a complete schedule-driven callback
        ...     def _build_pruner(self, trainer, pl_module):
        ...         return Pruner(pl_module)
        ...     def _update_masks(self, trainer, target):
        ...         return self.pruner.prune_to(target, optimizers=trainer.optimizers, step=trainer.global_step)
        >>> MagnitudeOnly(sparsity=0.5, start_step=0, end_step=150).schedule.update_steps()
        [0, 100, 150]
    """

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: str | Schedule | Callable[[int], float] = "cubic",
        *,
        final_sparsity: float | None = None,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
        **window: Unpack[WindowArguments],
    ) -> None:
        super().__init__(remask_weights=remask_weights, log_per_layer=log_per_layer, prog_bar=prog_bar, verbose=verbose)
        target, self._target_key = resolve_target(sparsity, final_sparsity)
        check_window_arguments(type(self).__name__, window)
        self.spec = ScheduleSpec(schedule, target, target_key=self._target_key, **window)
        self.schedule: Schedule | None = self.spec.fixed
        self.schedule_name = self.spec.name
        # Part of the checkpoint key: known at construction (a callable's target is only known once resolved).
        self._key_sparsity = None if math.isnan(self.spec.final_sparsity) else self.spec.final_sparsity
        self._retry = False  # an update was skipped (NaN/Inf scores): retried at every following step
        self._floor = 0.0  # a new fit of the same model never lifts the masks reached by the previous one

    @property
    def sparsity(self) -> float:
        """The sparsity at the end of the window (a callable schedule's is known once the window is resolved)."""
        return self.spec.final_sparsity

    @property
    def final_sparsity(self) -> float:
        """The former name of :attr:`sparsity`."""
        return self.spec.final_sparsity

    @property
    def state_key(self) -> str:
        # Keyed `final_sparsity` as before the argument was renamed, so checkpoints of earlier runs still resume.
        return self._generate_state_key(final_sparsity=self._key_sparsity, schedule=self.schedule_name)

    @abstractmethod
    def _update_masks(self, trainer: pl.Trainer, target: float) -> bool:
        """Bring the masks to ``target`` overall sparsity; return ``False`` if the update was skipped."""

    def _update_masks_at_end(self, trainer: pl.Trainer, target: float) -> bool:
        """The last retry of a skipped update, at the end of training; by default a normal update."""
        try:
            return self._update_masks(trainer, target)
        except (RuntimeError, ValueError):  # e.g. a gradient criterion with no gradient left
            return False

    @override
    def _accumulating(self, step: int) -> bool:
        schedule = self._require_schedule()
        if self._retry:  # a skipped update is retried at every step: its history takes every step, as before
            return True
        if not schedule.start_step - schedule.update_every <= step <= schedule.end_step:
            return False
        return self._require_pruner().accumulates_at(step, self._next_update(step))

    @override
    def _next_update(self, step: int) -> int | None:
        return None if self._retry else next_update_step(self._require_schedule(), step)

    @override
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        schedule = self._require_schedule()
        if not (schedule.is_update_step(step) or self._retry):
            return False
        updated = self._update_masks(trainer, max(schedule(step), self._floor))
        self._retry = not updated
        return updated

    @override
    def _continue_fit(self) -> None:
        self._floor = self._require_pruner().target_sparsity

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._retry:  # the last update was skipped and no later step could redo it
            target = self._require_schedule()(trainer.global_step)
            if self._update_masks_at_end(trainer, target):
                self._retry = False
                self.last_update_step = trainer.global_step
                self._refresh_sparsity()
                rank_zero_warn(
                    f"{type(self).__name__}: the mask update skipped for NaN/Inf scores was made at the end of "
                    f"training (step {trainer.global_step}), to the target {target:g}"
                )
            else:
                rank_zero_warn(
                    f"{type(self).__name__}: every mask update since the last one was skipped for NaN/Inf scores; "
                    f"training ends at sparsity {self._require_pruner().sparsity():.4f}, not {target:g}"
                )
        super().on_train_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "retry_update": self._retry} if self._retry else state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._retry = bool(state_dict.get("retry_update", False))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "retry_update"})

    @override
    def _resolve(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run and not math.isnan(self.spec.final_sparsity):
            # Lightning's smoke test runs a few batches: the window would not fit, so prune once, at the first step.
            self.schedule = OneShotSchedule(final_sparsity=self.spec.final_sparsity, start_step=0)
            rank_zero_warn(
                f"{type(self).__name__}: fast_dev_run: the pruning window is not used; masks are made once, at step "
                f"0, at the final sparsity {self.spec.final_sparsity:g}"
            )
            return
        self.schedule = self.spec.resolve(_optimizer_steps_per_epoch(trainer), trainer.estimated_stepping_batches)
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.schedule.start_step >= total and self.schedule(self.schedule.end_step) > 0:
            raise ValueError(
                f"{type(self).__name__}: the pruning window starts at step {self.schedule.start_step}, but training "
                f"has {int(total)} optimizer steps: it would train dense; start the window before step {int(total)} "
                "(e.g. start_fraction / end_fraction) or train longer"
            )
        warn_if_unreached(type(self).__name__, trainer, self.schedule.end_step)
        if self.spec.fixed is None and "update_every" not in self.spec.schedule_args:
            # Derived from the window alone, so a resumed run resolves the same value.
            resolved = default_update_every(self.schedule)
            if resolved.update_every != self.schedule.update_every:
                rank_zero_info(
                    f"{type(self).__name__}: update_every={resolved.update_every} (not the default "
                    f"{self.schedule.update_every}): about 10 mask updates over the pruning window (steps "
                    f"{resolved.start_step} to {resolved.end_step}); give update_every to choose"
                )
                self.schedule = resolved
        message = few_updates_message(self.schedule)
        if message:
            rank_zero_warn(f"{type(self).__name__}: {message}")

    def _require_schedule(self) -> Schedule:
        if self.schedule is None:
            raise RuntimeError(f"{type(self).__name__}'s schedule is resolved at on_train_start; use a Trainer")
        return self.schedule


MIN_UPDATES = 3  # fewer mask updates than this in a ramp's window make it (nearly) one jump


def resolve_target(
    sparsity: float | None, final_sparsity: float | None, *, warn: bool = True
) -> tuple[float | None, str]:
    """The target and the name it was given under: ``sparsity``, or its former name ``final_sparsity`` (a
    :class:`DeprecationWarning`, through the one renaming helper :func:`~pat_callbacks.core._validation.renamed`).
    ``warn=False`` only resolves (a subclass that passes the value on to ``ScheduledPruningCallback``, which warns).

    Example:
        >>> resolve_target(0.8, None)
        (0.8, 'sparsity')
        >>> resolve_target(0.9, 0.8)
        Traceback (most recent call last):
        ...
        ValueError: Give `sparsity` (the new name of `final_sparsity`), not both: got 0.9 and 0.8
    """
    # stacklevel 5: renamed <- resolve_target <- ScheduledPruningCallback.__init__ <- the subclass's __init__ <- user
    return renamed("final_sparsity", final_sparsity, "sparsity", sparsity, None, warn=warn, stacklevel=5)


def few_updates_message(schedule: Schedule) -> str | None:
    """A warning if a ramp schedule's window raises the target in fewer than :data:`MIN_UPDATES` mask updates
    (else ``None``), with an ``update_every`` that would give about 10.

    Example:
        >>> from pat_callbacks.core.schedules import CubicSchedule
        >>> print(few_updates_message(CubicSchedule(final_sparsity=0.9, start_step=3, end_step=27, update_every=100)))
        the pruning window (steps 3 to 27) raises the target in 1 mask update with update_every=100 (updates at \
steps 3, 27), so the schedule is a single jump to 0.9; use update_every=2 or less (about 10 updates over the window)
        >>> few_updates_message(CubicSchedule(final_sparsity=0.9, start_step=0, end_step=300, update_every=100)) is None
        True
        >>> few_updates_message(CubicSchedule(final_sparsity=0.5, start_step=0, end_step=1, update_every=1))[-44:]
        'a window of at least 3 steps gives 3 updates'
    """
    if not schedule.takes_update_every or schedule.single_bound or schedule.end_step <= schedule.start_step:
        return None
    steps = schedule.update_steps()
    targets = [0.0] + [schedule(step) for step in steps]
    raises = sum(1 for before, after in itertools.pairwise(targets) if after > before)
    if raises >= MIN_UPDATES:
        return None
    window = schedule.end_step - schedule.start_step
    suggested = max(1, window // 10)
    shape = "a single jump" if raises <= 1 else f"{raises} jumps"
    at = ", ".join(str(step) for step in steps[:6]) + (", ..." if len(steps) > 6 else "")
    if suggested < schedule.update_every:
        advice = f"use update_every={suggested} or less (about 10 updates over the window)"
    else:  # updates already as frequent as the window allows: only a longer window gives more
        advice = f"a window of at least {MIN_UPDATES * schedule.update_every} steps gives {MIN_UPDATES} updates"
    return (
        f"the pruning window (steps {schedule.start_step} to {schedule.end_step}) raises the target in {raises} "
        f"mask update{'s' if raises != 1 else ''} with update_every={schedule.update_every} (updates at steps {at}), "
        f"so the schedule is {shape} to {schedule.final_sparsity:g}; {advice}"
    )


def default_update_every(schedule: Schedule) -> Schedule:
    """``schedule`` with about 10 mask updates over its window (``update_every = max(1, window // 10)``) if it
    raises the target in fewer than :data:`MIN_UPDATES` (see :func:`few_updates_message`); else ``schedule`` itself.
    What a callback does with its default ``update_every`` on a short run.

    Example:
        >>> from pat_callbacks.core.schedules import CubicSchedule
        >>> default_update_every(CubicSchedule(final_sparsity=0.9, start_step=3, end_step=27)).update_every
        2
        >>> default_update_every(CubicSchedule(final_sparsity=0.9, start_step=600, end_step=4200)).update_every
        100
    """
    if few_updates_message(schedule) is None:
        return schedule
    return dataclasses.replace(schedule, update_every=max(1, (schedule.end_step - schedule.start_step) // 10))


def _optimizer_steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one epoch: ceil(batches / accumulate_grad_batches), as Lightning steps at epoch end."""
    batches = trainer.num_training_batches
    if batches == float("inf"):
        return 0
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
