"""Schedule windows: where a schedule runs, in optimizer steps, epochs or fractions of the run.

A :class:`ScheduleSpec` is what a user asks for (a schedule name, a :class:`~pat_callbacks.core.schedules.Schedule`
or a plain callable, a target and a window); :meth:`ScheduleSpec.resolve` turns it into a concrete
:class:`~pat_callbacks.core.schedules.Schedule` once the run's length is known. A window given entirely in steps
is resolved at construction. Everything that can be checked without the run's length is checked in
``__init__``, so a bad window fails before training starts.

Example:
    >>> spec = ScheduleSpec("cubic", final_sparsity=0.8, start_fraction=0.1, end_epoch=5, update_every=10)
    >>> spec.fixed is None  # epochs and fractions wait for the trainer
    True
    >>> schedule = spec.resolve(steps_per_epoch=20, total_steps=200)
    >>> schedule.start_step, schedule.end_step, schedule.final_sparsity
    (19, 100, 0.8)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from typing_extensions import TypedDict

from pat_callbacks.core._validation import check_fraction, check_int, check_number, check_positive
from pat_callbacks.core.schedules import SCHEDULES, FunctionSchedule, Schedule, as_schedule, make_schedule

__all__ = ["DEFAULT_UPDATE_EVERY", "ScheduleSpec", "WindowArguments", "check_window_arguments"]


class WindowArguments(TypedDict, total=False):
    """The pruning window and the schedule's own keyword arguments, declared once: every schedule-driven callback
    takes them as ``**window`` and hands them to :class:`ScheduleSpec` (each bound in one unit: steps, epochs or
    fractions of the run).

    Example:
        >>> sorted(WindowArguments.__annotations__)[:3]
        ['end_epoch', 'end_fraction', 'end_step']
    """

    initial_sparsity: float | None
    start_step: int | None
    end_step: int | None
    start_epoch: float | None
    end_epoch: float | None
    start_fraction: float | None
    end_fraction: float | None
    update_every: int | None
    phase_steps: int | None
    phase_epochs: float | None
    power: float | None


def check_window_arguments(owner: str, window: dict[str, Any]) -> None:
    """Refuse keyword arguments that are not window arguments, naming them and the allowed ones.

    Example:
        >>> check_window_arguments("GradualPruning", {"start_stp": 10})
        Traceback (most recent call last):
        ...
        TypeError: GradualPruning got unexpected arguments ['start_stp']; window arguments are: end_epoch, \
end_fraction, end_step, initial_sparsity, phase_epochs, phase_steps, power, start_epoch, start_fraction, start_step, \
update_every
    """
    unknown = sorted(set(window) - set(WindowArguments.__annotations__))
    if unknown:
        allowed = ", ".join(sorted(WindowArguments.__annotations__))
        raise TypeError(f"{owner} got unexpected arguments {unknown}; window arguments are: {allowed}")


DEFAULT_UPDATE_EVERY = 100
_UNITS = ("step", "epoch", "fraction")
_SCHEDULE_ARGS = ("initial_sparsity", "update_every", "power", "phase_steps")


class ScheduleSpec:
    """A schedule and its window, resolved to a :class:`~pat_callbacks.core.schedules.Schedule` when the run is known.

    Args:
        schedule: a registered name (see :data:`~pat_callbacks.core.schedules.SCHEDULES`), a ``Schedule`` object
            (which carries its own steps and sparsity: no window argument may be given), or a callable
            ``step -> sparsity`` (see :class:`~pat_callbacks.core.schedules.FunctionSchedule`).
        final_sparsity: the target at the end of the window (required with a name).
        start_step, start_epoch, start_fraction: where the window starts (one of them; by default the
            schedule's ``default_window``: 10% of the run for most, 50% for ``one_shot``, the whole run for a
            callable).
        end_step, end_epoch, end_fraction: where it ends (one of them; by default 70% of the run, 80% for
            ``odd_even``, none for ``constant`` / ``one_shot``).
        phase_epochs: the phase length of a phased schedule in epochs (``phase_steps`` is a schedule argument).
        schedule_args: the schedule's own arguments (``initial_sparsity``, ``update_every``, ``power``,
            ``phase_steps``); an argument the schedule does not take is refused by name.
        target_key: the name of the target in error messages (``"sparsity"`` when a callback was given it so).

    Example:
        >>> ScheduleSpec("linear", final_sparsity=0.5, start_step=0, end_step=100, update_every=50).fixed
        LinearSchedule(final_sparsity=0.5, start_step=0, end_step=100, update_every=50, initial_sparsity=0.0)
        >>> ScheduleSpec("linear", final_sparsity=0.5, start_step=0, end_step=100, start_epoch=1)
        Traceback (most recent call last):
        ...
        ValueError: Give the start of the pruning window once, in one unit, but got start_step=0, start_epoch=1; \
keep one and set the others to None (in Hydra: pruning.start_epoch=null)
    """

    def __init__(
        self,
        schedule: str | Schedule | Callable[[int], float],
        final_sparsity: float | None = None,
        *,
        start_step: int | None = None,
        end_step: int | None = None,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        start_fraction: float | None = None,
        end_fraction: float | None = None,
        phase_epochs: float | None = None,
        target_key: str = "final_sparsity",
        **schedule_args: Any,
    ) -> None:
        unknown = sorted(set(schedule_args) - set(_SCHEDULE_ARGS))
        if unknown:
            raise TypeError(f"ScheduleSpec got unexpected arguments {unknown}; schedule arguments are {_SCHEDULE_ARGS}")
        window = {
            "start_step": start_step,
            "end_step": end_step,
            "start_epoch": start_epoch,
            "end_epoch": end_epoch,
            "start_fraction": start_fraction,
            "end_fraction": end_fraction,
            "phase_epochs": phase_epochs,
        }
        self.window = {key: value for key, value in window.items() if value is not None}
        self.schedule_args = {key: value for key, value in schedule_args.items() if value is not None}
        self.schedule = as_schedule(schedule)
        if isinstance(self.schedule, Schedule):
            given = sorted(self.window) + sorted(self.schedule_args)
            if given or final_sparsity is not None:
                given += [target_key] if final_sparsity is not None else []
                raise ValueError(
                    f"A Schedule object carries its own sparsity and steps; do not also pass {', '.join(given)}"
                )
            self.name = self.schedule.name or type(self.schedule).__name__
            self.final_sparsity = self.schedule.final_sparsity
            self.fixed: Schedule | None = self.schedule
            return
        if isinstance(self.schedule, str):
            self.name = self.schedule
            self.schedule_class: type[Schedule] = SCHEDULES[self.schedule]
            if final_sparsity is None:
                raise ValueError(f"`{target_key}` is required with a named schedule, e.g. {target_key}=0.9")
            self.final_sparsity = check_fraction(target_key, final_sparsity)
        else:
            self.name = getattr(self.schedule, "__name__", type(self.schedule).__name__)
            self.schedule_class = FunctionSchedule
            if final_sparsity is not None:
                raise ValueError(
                    "A callable schedule decides its own sparsity (final_sparsity = schedule(end_step)); "
                    f"do not also pass {target_key}={final_sparsity!r}"
                )
            self.final_sparsity = float("nan")  # known once the window is resolved
        self._validate()
        self.fixed = self._build(steps_per_epoch=0, total_steps=0) if self._steps_only() else None
        if self.fixed is not None:
            self.final_sparsity = self.fixed.final_sparsity

    def resolve(self, steps_per_epoch: int, total_steps: float) -> Schedule:
        """The concrete schedule for a run with ``steps_per_epoch`` optimizer steps per epoch (0 if unsized) and
        ``total_steps`` in all (``inf`` if unbounded).

        Example:
            >>> ScheduleSpec("one_shot", final_sparsity=0.5, start_epoch=2).resolve(10, 100).update_steps()
            [20]
        """
        if self.fixed is not None:
            return self.fixed
        schedule = self._build(steps_per_epoch, total_steps)
        self.final_sparsity = schedule.final_sparsity
        return schedule

    # ---------------------------------------------------------------- internals
    def _steps_only(self) -> bool:
        w = self.window
        if any(key in w for key in ("start_epoch", "end_epoch", "start_fraction", "end_fraction", "phase_epochs")):
            return False
        return "start_step" in w and ("end_step" in w or self.schedule_class.single_bound)

    def _validate(self) -> None:
        w, cls = self.window, self.schedule_class
        for bound in ("start", "end"):
            given = [f"{bound}_{unit}" for unit in _UNITS if f"{bound}_{unit}" in w]
            if len(given) > 1:
                got = ", ".join(f"{key}={w[key]!r}" for key in given)
                raise ValueError(
                    f"Give the {bound} of the pruning window once, in one unit, but got {got}; "
                    f"keep one and set the others to None (in Hydra: pruning.{given[-1]}=null)"
                )
        for key in ("start_step", "end_step"):
            if key in w:
                check_int(key, w[key], minimum=0)
        for key in ("start_epoch", "end_epoch"):
            if key in w:
                check_number(key, w[key], minimum=0)
        for key in ("start_fraction", "end_fraction"):
            if key in w:
                check_fraction(key, w[key], allow_one=True)
        if "phase_epochs" in w:
            check_positive("phase_epochs", w["phase_epochs"])
        for unit in _UNITS:
            start, end = w.get(f"start_{unit}"), w.get(f"end_{unit}")
            if start is not None and end is not None and end <= start and not cls.single_bound:
                raise ValueError(
                    f"Expected `end_{unit}` > `start_{unit}`, but got start_{unit}={start}, end_{unit}={end}"
                )
        if "phase_steps" in self.schedule_args and "phase_epochs" in w:
            raise ValueError("Give the phase length once, but got phase_steps and phase_epochs")
        if cls.phased and "phase_steps" not in self.schedule_args and "phase_epochs" not in w:
            raise ValueError(f"schedule={self.name!r} needs `phase_steps` or `phase_epochs` (the length of each phase)")
        if "phase_epochs" in w and not cls.phased:
            phased = ", ".join(repr(name) for name, c in SCHEDULES.items() if c.phased)
            raise ValueError(f"`phase_epochs` does not apply to schedule {self.name!r}; only to {phased}")
        if isinstance(self.schedule, str):  # the schedule's own checks (update_every, power, ...) run now
            make_schedule(
                self.schedule,
                final_sparsity=self.final_sparsity,
                start_step=0,
                end_step=1_000_000,
                **self._schedule_args(steps_per_epoch=1),
            )
        else:
            for key in self.schedule_args:
                if key != "update_every":
                    raise ValueError(
                        f"`{key}` does not apply to a callable schedule; it takes: start, end, update_every"
                    )

    def _schedule_args(self, steps_per_epoch: int) -> dict[str, Any]:
        args = dict(self.schedule_args)
        if "phase_epochs" in self.window:
            args["phase_steps"] = max(1, round(self.window["phase_epochs"] * steps_per_epoch))
        if self.schedule_class.takes_update_every and "update_every" not in args:
            args["update_every"] = DEFAULT_UPDATE_EVERY
        return args

    def _build(self, steps_per_epoch: int, total_steps: float) -> Schedule:
        start = self._bound_to_step("start", steps_per_epoch, total_steps)
        end = self._bound_to_step("end", steps_per_epoch, total_steps)
        assert start is not None  # a start always has a default
        if end is not None and end <= start and not self.schedule_class.single_bound:
            raise ValueError(
                f"The pruning window resolved to start_step={start}, end_step={end} for schedule "
                f"{self.name!r} ({steps_per_epoch} optimizer steps per epoch, {total_steps} in all): "
                "the run is too short for it"
            )
        if not isinstance(self.schedule, str):
            return FunctionSchedule(fn=self.schedule, start_step=start, end_step=end, **self._schedule_args(0))
        return make_schedule(
            self.schedule,
            final_sparsity=self.final_sparsity,
            start_step=start,
            end_step=end,
            **self._schedule_args(steps_per_epoch),
        )

    def _bound_to_step(self, bound: str, steps_per_epoch: int, total_steps: float) -> int | None:
        w = self.window
        if f"{bound}_step" in w:
            return w[f"{bound}_step"]
        if f"{bound}_epoch" in w:
            if steps_per_epoch == 0:
                raise ValueError(f"`{bound}_epoch` needs a sized train dataloader; give {bound}_step instead")
            return round(w[f"{bound}_epoch"] * steps_per_epoch)
        default = self.schedule_class.default_window[0 if bound == "start" else 1]
        if bound == "end" and self.schedule_class.single_bound:
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
