"""GradualPruning: schedule-driven pruning with step-level mask updates.

Example:
    >>> pruning = GradualPruning(final_sparsity=0.9, schedule="cubic", start_step=100, end_step=2000,
    ...                          update_every=100)
    >>> pruning.schedule(1050) > 0.7, pruning.schedule.is_update_step(1100)
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pat_callbacks._validation import check_fraction, check_int, check_number, check_positive
from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.criteria import Criterion
from pat_callbacks.patterns import block_mask, nm_mask, parse_block, parse_nm
from pat_callbacks.schedules import SCHEDULES, Schedule, make_schedule

__all__ = ["GradualPruning"]

_DEFAULT_START_FRACTION = 0.1
_DEFAULT_END_FRACTION = 0.7
_DEFAULT_UPDATE_EVERY = 100
_SINGLE_BOUND = ("constant", "one_shot")  # schedules whose window may be a single step


class GradualPruning(PruningCallback):
    """Prune weights during training, following a sparsity schedule.

    At every update step of the schedule, weights are scored by ``criterion`` (using this step's dense
    gradients where needed), the target is split over layers by ``allocation``, and the lowest-scoring weights
    are masked: set to exactly zero, their optimizer state reset, their gradients zeroed at every later step.

    Bounds of the pruning window can be given in optimizer steps, in epochs (converted once the trainer knows the
    epoch length) or as fractions of the whole run (``trainer.estimated_stepping_batches``); each bound in one
    unit. With none given the window is 10% to 70% of training.

    Args:
        final_sparsity: sparsity reached at the end of the window, in [0, 1).
        schedule: ``"cubic"``, ``"polynomial"``, ``"linear"``, ``"exponential"``, ``"constant"``, ``"one_shot"``,
            ``"odd_even"``, or a :class:`~pat_callbacks.schedules.Schedule` (which then carries its own steps
            and sparsity: the window arguments must be left unset).
        initial_sparsity: sparsity at the start of the window (ramp schedules only).
        start_step, start_epoch, start_fraction: where pruning starts (one of them).
        end_step, end_epoch, end_fraction: where the final sparsity is reached (one of them).
        update_every: optimizer steps between mask updates (default 100; not for ``odd_even``/``one_shot``).
        phase_steps, phase_epochs: length of each prune / recover phase for ``odd_even``.
        power: exponent of the ``polynomial`` schedule.
        pattern: ``"unstructured"`` (default), ``"block:RxC"`` (prune whole R x C blocks of rows x inputs, by
            their summed scores) or ``"N:M"``: keep N of every M consecutive weights of each output
            row (NVIDIA's convention: ``"2:4"`` keeps 2 of 4, 50% sparsity). With N:M, ``final_sparsity`` defaults
            to ``1 - N/M`` (any other value is refused), the schedule's intermediate targets round down to whole
            weights per group, and allocation is per layer (``"uniform"``).
        regrow_fraction: pruning reversal. At each update, after masking to the target, this fraction of the
            active weights with the lowest magnitude is swapped for as many pruned weights with the largest
            dense-gradient magnitude (as in RigL), which re-enter at zero with zeroed optimizer state; the
            target sparsity still holds per layer. ``0`` (default): a pruned weight never returns.
        criterion, allocation, include, exclude, keep_first, keep_last, layer_sparsity, min_sparsity,
            max_sparsity, probe_sparsity, sensitivity_batches, loss_fn, remask_weights, log_per_layer, prog_bar:
            see :class:`~pat_callbacks.callbacks.base.PruningCallback`.

    Example:
        >>> GradualPruning(final_sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: Expected `final_sparsity` to be a float in [0, 1), but got 1.5
    """

    def __init__(
        self,
        final_sparsity: float | None = None,
        schedule: str | Schedule = "cubic",
        *,
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
        super().__init__(
            criterion=criterion,
            allocation=allocation,
            include=include,
            exclude=exclude,
            keep_first=keep_first,
            keep_last=keep_last,
            layer_sparsity=layer_sparsity,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            probe_sparsity=probe_sparsity,
            sensitivity_batches=sensitivity_batches,
            loss_fn=loss_fn,
            remask_weights=remask_weights,
            log_per_layer=log_per_layer,
            prog_bar=prog_bar,
        )
        window = {
            "initial_sparsity": initial_sparsity,
            "start_step": start_step,
            "end_step": end_step,
            "start_epoch": start_epoch,
            "end_epoch": end_epoch,
            "start_fraction": start_fraction,
            "end_fraction": end_fraction,
            "update_every": update_every,
            "phase_steps": phase_steps,
            "phase_epochs": phase_epochs,
            "power": power,
        }
        self.regrow_fraction = check_fraction("regrow_fraction", regrow_fraction, allow_one=True)
        self.nm: tuple[int, int] | None = None
        self.block: tuple[int, int] | None = None
        if isinstance(pattern, str) and pattern.startswith("block:"):
            self.block = parse_block(pattern)
        elif pattern != "unstructured":
            self.nm = parse_nm(pattern)
            n, m = self.nm
            if self.allocation != "uniform":
                raise ValueError(
                    f"pattern={pattern!r} fixes the sparsity of every layer: use allocation='uniform', "
                    f"not {self.allocation!r}"
                )
            if self.regrow_fraction > 0:
                raise ValueError(f"regrow_fraction={self.regrow_fraction} would break the {pattern!r} pattern; use 0")
            if final_sparsity is None and not isinstance(schedule, Schedule):
                final_sparsity = 1 - n / m
            if final_sparsity is not None and abs(final_sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"pattern={pattern!r} reaches sparsity {1 - n / m:g}, but got final_sparsity={final_sparsity!r}"
                )
        self._window = {key: value for key, value in window.items() if value is not None}
        if isinstance(schedule, Schedule):
            if self._window or final_sparsity is not None:
                given = sorted(self._window) + (["final_sparsity"] if final_sparsity is not None else [])
                raise ValueError(
                    f"A Schedule object carries its own sparsity and steps; do not also pass {', '.join(given)}"
                )
            self.schedule: Schedule | None = schedule
            self._fixed_schedule = True
            self.schedule_name = schedule.name or type(schedule).__name__
            self.final_sparsity = schedule.final_sparsity
            return
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            allowed = ", ".join(repr(name) for name in sorted(SCHEDULES))
            raise ValueError(f"Unknown `schedule` {schedule!r}; expected one of: {allowed}, or a Schedule object")
        if final_sparsity is None:
            raise ValueError("`final_sparsity` is required with a named schedule, e.g. final_sparsity=0.9")
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.schedule_name = schedule
        self._validate_window()
        # A window given fully in steps is built now; epochs and fractions wait for the trainer.
        self._fixed_schedule = self._steps_only()
        self.schedule = self._build_schedule(steps_per_epoch=0, total_steps=0) if self._fixed_schedule else None

    @property
    def method_name(self) -> str:
        """``schedule/criterion/allocation``, e.g. ``cubic/taylor/sensitivity`` (for reports and metrics.json)."""
        return f"{self.schedule_name}/{self.criterion.name or type(self.criterion).__name__}/{self.allocation}"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(final_sparsity=self.final_sparsity, schedule=self.schedule_name)

    # ------------------------------------------------------------- schedule
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.store is None:
            return
        if self.block is not None:
            r, c = self.block
            for name, param in self.store.params.items():
                if param.shape[0] % r or (param.numel() // param.shape[0]) % c:
                    raise ValueError(
                        f"pattern 'block:{r}x{c}' needs rows x inputs divisible into blocks, but {name!r} has shape "
                        f"{tuple(param.shape)}; exclude it (exclude=[{name!r}])"
                    )
        if self.nm is None:
            return
        m = self.nm[1]
        for name, param in self.store.params.items():
            if (param.numel() // param.shape[0]) % m:
                raise ValueError(
                    f"pattern '{self.nm[0]}:{m}' needs rows whose size is a multiple of {m}, but {name!r} has shape "
                    f"{tuple(param.shape)}; exclude it (exclude=[{name!r}])"
                )

    @override
    def _make_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        if self.block is not None:
            return block_mask(scores, sparsity, self.block)
        if self.nm is None:
            return super()._make_mask(scores, sparsity)
        n, m = self.nm
        return nm_mask(scores, n, m, pruned_per_group=min(m - n, int(sparsity * m + 1e-9)))

    @override
    def _accumulating(self, step: int) -> bool:
        schedule = self._require_schedule()
        return schedule.start_step - schedule.update_every <= step <= schedule.end_step

    @override
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        schedule = self._require_schedule()
        if not schedule.is_update_step(step):
            return False
        target = schedule(step)
        if not self._prune_to(trainer, target):
            return False
        if self.regrow_fraction > 0 and target > 0:
            self._extra_metrics = self._drop_and_regrow(trainer, self.regrow_fraction, "rigl")
        return True

    @override
    def _resolve(self, trainer: pl.Trainer) -> None:
        if not self._fixed_schedule:
            self.schedule = self._build_schedule(
                steps_per_epoch=_optimizer_steps_per_epoch(trainer),
                total_steps=trainer.estimated_stepping_batches,
            )
        self._warn_if_unreached(trainer, self._require_schedule().end_step)

    def _require_schedule(self) -> Schedule:
        if self.schedule is None:
            raise RuntimeError("GradualPruning's schedule is resolved at on_train_start; call it from a Trainer")
        return self.schedule

    def _steps_only(self) -> bool:
        """Whether the window is given entirely in optimizer steps (then it is built at construction)."""
        w = self._window
        if any(key in w for key in ("start_epoch", "end_epoch", "start_fraction", "end_fraction", "phase_epochs")):
            return False
        return "start_step" in w and ("end_step" in w or self.schedule_name in _SINGLE_BOUND)

    def _validate_window(self) -> None:
        w = self._window
        for bound in ("start", "end"):
            given = [f"{bound}_{unit}" for unit in ("step", "epoch", "fraction") if f"{bound}_{unit}" in w]
            if len(given) > 1:
                raise ValueError(f"Give the {bound} of the pruning window once, but got {', '.join(given)}")
        for key in ("start_step", "end_step"):
            if key in w:
                check_int(key, w[key], minimum=0)
        for key in ("start_epoch", "end_epoch"):
            if key in w:
                check_number(key, w[key], minimum=0)
        if "phase_epochs" in w:
            check_positive("phase_epochs", w["phase_epochs"])
        for key in ("start_fraction", "end_fraction"):
            if key in w:
                check_fraction(key, w[key], allow_one=True)
        for unit in ("step", "epoch", "fraction"):
            start, end = w.get(f"start_{unit}"), w.get(f"end_{unit}")
            if start is not None and end is not None and end <= start and self.schedule_name not in _SINGLE_BOUND:
                raise ValueError(
                    f"Expected `end_{unit}` > `start_{unit}`, but got start_{unit}={start}, end_{unit}={end}"
                )
        if "phase_steps" in w and "phase_epochs" in w:
            raise ValueError("Give the odd/even phase length once, but got phase_steps and phase_epochs")
        if self.schedule_name == "odd_even" and "phase_steps" not in w and "phase_epochs" not in w:
            raise ValueError("schedule='odd_even' needs `phase_steps` or `phase_epochs` (the length of each phase)")
        if "phase_epochs" in w and self.schedule_name != "odd_even":
            raise ValueError(f"`phase_epochs` does not apply to schedule {self.schedule_name!r}; only to 'odd_even'")
        # The per-schedule checks (update_every, power, initial_sparsity, ...) run in make_schedule, now.
        make_schedule(
            self.schedule_name,
            final_sparsity=self.final_sparsity,
            start_step=0,
            end_step=1_000_000,
            **self._schedule_extras(steps_per_epoch=1),
        )

    def _schedule_extras(self, steps_per_epoch: int) -> dict[str, Any]:
        w = self._window
        extras = {key: w[key] for key in ("initial_sparsity", "update_every", "power", "phase_steps") if key in w}
        if "phase_epochs" in w:
            extras["phase_steps"] = max(1, round(w["phase_epochs"] * steps_per_epoch))
        if self.schedule_name not in ("odd_even", "one_shot") and "update_every" not in extras:
            extras["update_every"] = _DEFAULT_UPDATE_EVERY
        return extras

    def _build_schedule(self, steps_per_epoch: int, total_steps: float) -> Schedule:
        bounds = {bound: self._bound_to_step(bound, steps_per_epoch, total_steps) for bound in ("start", "end")}
        start, end = bounds["start"], bounds["end"]
        if end is not None and end <= start and self.schedule_name not in _SINGLE_BOUND:
            raise ValueError(
                f"The pruning window resolved to start_step={start}, end_step={end} for schedule "
                f"{self.schedule_name!r} ({steps_per_epoch} optimizer steps per epoch, {total_steps} in all): "
                "the run is too short for it"
            )
        return make_schedule(
            self.schedule_name,
            final_sparsity=self.final_sparsity,
            start_step=start,
            end_step=end,
            **self._schedule_extras(steps_per_epoch),
        )

    def _bound_to_step(self, bound: str, steps_per_epoch: int, total_steps: float) -> int | None:
        w = self._window
        if f"{bound}_step" in w:
            return w[f"{bound}_step"]
        if f"{bound}_epoch" in w:
            if steps_per_epoch == 0:
                raise ValueError(f"`{bound}_epoch` needs a sized train dataloader; give {bound}_step instead")
            return round(w[f"{bound}_epoch"] * steps_per_epoch)
        default = _DEFAULT_START_FRACTION if bound == "start" else _DEFAULT_END_FRACTION
        if bound == "end" and self.schedule_name in _SINGLE_BOUND:
            default = None
        fraction = w.get(f"{bound}_fraction", default)
        if fraction is None:
            return None
        if total_steps == float("inf"):
            raise ValueError(
                f"`{bound}_fraction` needs a finite training length (set max_steps or max_epochs); "
                f"give {bound}_step instead"
            )
        return math.floor(fraction * max(0, int(total_steps) - 1))


def _optimizer_steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one epoch: ceil(batches / accumulate_grad_batches), as Lightning steps at epoch end."""
    batches = trainer.num_training_batches
    if batches == float("inf"):
        return 0
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
