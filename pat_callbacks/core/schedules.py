"""Sparsity schedules: pure functions from an optimizer step to a target sparsity.

A schedule never sees weights and keeps no counter: ``schedule(step)`` is the target sparsity at
``step`` and ``schedule.is_update_step(step)`` says whether masks are recomputed there. A target of
``0.0`` means "no mask" (dense), which is how the recover phases of :class:`OddEvenSchedule` lift
their masks.

All steps are optimizer steps (Lightning's ``trainer.global_step``). Before ``start_step`` every
schedule is dense; after ``end_step`` it holds its final sparsity.

Example:
    >>> s = CubicSchedule(final_sparsity=0.9, start_step=0, end_step=1000, update_every=100)
    >>> [round(s(t), 4) for t in (0, 500, 1000, 5000)]
    [0.0, 0.7875, 0.9, 0.9]
    >>> s.is_update_step(200), s.is_update_step(250)
    (True, False)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pat_callbacks.core._validation import check_fraction, check_int, check_positive
from pat_callbacks.core.registry import Registry

__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CubicSchedule",
    "ExponentialSchedule",
    "FunctionSchedule",
    "LinearSchedule",
    "OddEvenSchedule",
    "OneShotSchedule",
    "PolynomialSchedule",
    "Schedule",
    "as_schedule",
    "make_schedule",
    "next_update_step",
    "register_schedule",
]


@dataclass(frozen=True)
class Schedule(ABC):
    """Base class: a target sparsity for every optimizer step, recomputed every ``update_every`` steps.

    Subclasses implement :meth:`__call__`. Masks are updated at ``start_step``, then every
    ``update_every`` steps, and always at ``end_step`` so the final target is reached exactly.

    Class attributes declare what a schedule takes, so windows and callbacks never switch on names:
    ``single_bound`` (the window may be one step; ``end`` optional), ``takes_update_every``,
    ``phased`` (prune / recover phases of ``phase_steps``), and ``extra_args`` (arguments beyond
    ``final_sparsity``, ``start_step``, ``end_step``), and ``default_window`` (start and end as fractions of
    the run when a callback is given no window; ``None`` for no end). A new schedule is one class registered with
    ``@SCHEDULES.register`` (see ``docs/extending.md``).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Half(Schedule):
        ...     def __call__(self, step):
        ...         return self.final_sparsity / 2 if step >= self.start_step else 0.0
        >>> Half(final_sparsity=0.8, start_step=0, end_step=10)(5)
        0.4
    """

    final_sparsity: float
    start_step: int = 0
    end_step: int = 0
    update_every: int = 100

    name: ClassVar[str] = ""
    single_bound: ClassVar[bool] = False
    takes_update_every: ClassVar[bool] = True
    phased: ClassVar[bool] = False
    extra_args: ClassVar[tuple[str, ...]] = ("update_every",)
    default_window: ClassVar[tuple[float, float | None]] = (0.1, 0.7)

    def __post_init__(self) -> None:
        object.__setattr__(self, "final_sparsity", check_fraction("final_sparsity", self.final_sparsity))
        object.__setattr__(self, "start_step", check_int("start_step", self.start_step, minimum=0))
        object.__setattr__(self, "end_step", check_int("end_step", self.end_step, minimum=0))
        object.__setattr__(self, "update_every", check_int("update_every", self.update_every, minimum=1))
        if self.end_step < self.start_step:
            raise ValueError(
                f"Expected `end_step` >= `start_step`, but got end_step={self.end_step} < start_step={self.start_step}"
            )

    @abstractmethod
    def __call__(self, step: int) -> float:
        """Target sparsity at optimizer step ``step``."""

    def is_update_step(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``: ``start_step + k * update_every`` and ``end_step``."""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.update_every == 0 or step == self.end_step

    def update_steps(self) -> list[int]:
        """All update steps, in order (for plots and tests).

        Example:
            >>> LinearSchedule(final_sparsity=0.5, start_step=10, end_step=35, update_every=10).update_steps()
            [10, 20, 30, 35]
        """
        steps = list(range(self.start_step, self.end_step + 1, self.update_every))
        if steps[-1] != self.end_step:
            steps.append(self.end_step)
        return steps

    def progress(self, step: int) -> float:
        """Fraction of the pruning window elapsed at ``step``, clamped to ``[0, 1]``."""
        if step <= self.start_step:
            return 0.0
        if step >= self.end_step:
            return 1.0
        return (step - self.start_step) / (self.end_step - self.start_step)


def next_update_step(schedule: Schedule, step: int) -> int | None:
    """The first update step of ``schedule`` at or after ``step``: ``start_step + k * update_every`` or the final
    update at ``end_step``; ``None`` past ``end_step`` (no update ahead). A phased schedule updates at each phase
    boundary (its ``update_every`` is ``phase_steps``); a window given in epochs or fractions is resolved to steps
    first (:meth:`~pat_callbacks.core.windows.ScheduleSpec.resolve`), so this sees steps only.

    Example:
        >>> schedule = CubicSchedule(final_sparsity=0.9, start_step=10, end_step=35, update_every=10)
        >>> [next_update_step(schedule, step) for step in (0, 10, 11, 30, 31, 35, 36)]
        [10, 10, 20, 30, 35, 35, None]
        >>> phases = OddEvenSchedule(final_sparsity=0.9, start_step=100, end_step=450, phase_steps=100)
        >>> [next_update_step(phases, step) for step in (150, 201, 420)]
        [200, 300, 450]
    """
    start, every, end = schedule.start_step, schedule.update_every, schedule.end_step
    if step > end:
        return None
    if step <= start:
        return start
    return min(start + -(-(step - start) // every) * every, end)


@dataclass(frozen=True)
class _RampSchedule(Schedule):
    """A schedule that moves from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``."""

    initial_sparsity: float = 0.0
    extra_args: ClassVar[tuple[str, ...]] = ("update_every", "initial_sparsity")

    def __post_init__(self) -> None:
        super().__post_init__()
        initial = check_fraction("initial_sparsity", self.initial_sparsity)
        object.__setattr__(self, "initial_sparsity", initial)
        if initial > self.final_sparsity:
            raise ValueError(
                f"Expected `initial_sparsity` <= `final_sparsity`, but got initial_sparsity={initial} "
                f"> final_sparsity={self.final_sparsity}"
            )
        if self.end_step <= self.start_step:
            raise ValueError(
                f"Expected `end_step` > `start_step` for schedule {self.name!r}, but got "
                f"start_step={self.start_step}, end_step={self.end_step}"
            )

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        return self._ramp(self.progress(step))

    @abstractmethod
    def _ramp(self, progress: float) -> float:
        """Sparsity at a fraction ``progress`` in [0, 1] of the window."""


@dataclass(frozen=True)
class PolynomialSchedule(_RampSchedule):
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power``.

    Prunes fast early, while the network is most redundant, and slowly near the end.

    Example:
        >>> s = PolynomialSchedule(final_sparsity=0.8, start_step=0, end_step=100, update_every=10, power=2)
        >>> round(s(50), 6)
        0.6
    """

    power: float = 3.0
    name: ClassVar[str] = "polynomial"
    extra_args: ClassVar[tuple[str, ...]] = ("update_every", "initial_sparsity", "power")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "power", check_positive("power", self.power))

    def _ramp(self, progress: float) -> float:
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power


@dataclass(frozen=True)
class CubicSchedule(PolynomialSchedule):
    """The polynomial schedule with ``power=3``, as in Zhu & Gupta (2017).

    Example:
        >>> CubicSchedule(final_sparsity=0.9, initial_sparsity=0.1, start_step=100, end_step=300)(200)
        0.8
    """

    name: ClassVar[str] = "cubic"
    extra_args: ClassVar[tuple[str, ...]] = ("update_every", "initial_sparsity")

    def __post_init__(self) -> None:
        if self.power != 3.0:
            raise ValueError(f"CubicSchedule has power 3; use PolynomialSchedule for power={self.power!r}")
        super().__post_init__()


@dataclass(frozen=True)
class LinearSchedule(_RampSchedule):
    """Sparsity grows linearly from ``initial_sparsity`` to ``final_sparsity``.

    Example:
        >>> LinearSchedule(final_sparsity=0.8, start_step=0, end_step=100)(25)
        0.2
    """

    name: ClassVar[str] = "linear"

    def _ramp(self, progress: float) -> float:
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * progress


@dataclass(frozen=True)
class ExponentialSchedule(_RampSchedule):
    """Density (1 - sparsity) decays geometrically: each equal slice of the window removes the same *fraction*
    of the remaining weights, as in iterative pruning (Han et al. 2015).

    Example:
        >>> s = ExponentialSchedule(final_sparsity=0.99, start_step=0, end_step=100)
        >>> round(s(50), 4)  # density sqrt(0.01) = 0.1 halfway
        0.9
    """

    name: ClassVar[str] = "exponential"

    def _ramp(self, progress: float) -> float:
        initial_density = 1.0 - self.initial_sparsity
        final_density = 1.0 - self.final_sparsity
        return 1.0 - initial_density * (final_density / initial_density) ** progress


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``final_sparsity`` from ``start_step`` on; masks are recomputed every ``update_every`` steps until
    ``end_step`` (defaults to ``start_step``: one update).

    Example:
        >>> s = ConstantSchedule(final_sparsity=0.5, start_step=10, end_step=30, update_every=10)
        >>> s(9), s(10), s(1000), s.update_steps()
        (0.0, 0.5, 0.5, [10, 20, 30])
    """

    name: ClassVar[str] = "constant"
    single_bound: ClassVar[bool] = True
    default_window: ClassVar[tuple[float, float | None]] = (0.1, None)

    def __call__(self, step: int) -> float:
        return self.final_sparsity if step >= self.start_step else 0.0


@dataclass(frozen=True)
class OneShotSchedule(ConstantSchedule):
    """Prune once, at ``start_step``, to ``final_sparsity``; the mask is then fixed.

    Example:
        >>> s = OneShotSchedule(final_sparsity=0.7, start_step=50)
        >>> s(49), s(50), s.update_steps()
        (0.0, 0.7, [50])
    """

    name: ClassVar[str] = "one_shot"
    takes_update_every: ClassVar[bool] = False
    extra_args: ClassVar[tuple[str, ...]] = ()
    default_window: ClassVar[tuple[float, float | None]] = (0.5, None)  # then fine-tune for the second half

    def __post_init__(self) -> None:
        object.__setattr__(self, "end_step", self.start_step)
        super().__post_init__()


@dataclass(frozen=True)
class OddEvenSchedule(Schedule):
    """Alternating prune and recover phases (AC/DC, Peste et al. 2021).

    From ``start_step`` the window is cut into phases of ``phase_steps``: even phases prune (masks recomputed
    at ``final_sparsity``, weights held at zero), odd phases recover (target 0: masks lifted, all weights
    train densely). From ``end_step`` on the schedule is always in a prune phase, so training ends sparse.
    Masks change only at phase boundaries, hence ``update_every == phase_steps``.

    Example:
        >>> s = OddEvenSchedule(final_sparsity=0.9, start_step=100, end_step=500, phase_steps=100)
        >>> [s(t) for t in (0, 100, 199, 200, 300, 400, 500, 900)]
        [0.0, 0.9, 0.9, 0.0, 0.9, 0.0, 0.9, 0.9]
        >>> s.update_steps()
        [100, 200, 300, 400, 500]
    """

    phase_steps: int = 100
    update_every: int = field(default=0, repr=False)
    name: ClassVar[str] = "odd_even"
    takes_update_every: ClassVar[bool] = False
    phased: ClassVar[bool] = True
    extra_args: ClassVar[tuple[str, ...]] = ("phase_steps",)
    default_window: ClassVar[tuple[float, float | None]] = (0.1, 0.8)

    def __post_init__(self) -> None:
        phase = check_int("phase_steps", self.phase_steps, minimum=1)
        object.__setattr__(self, "phase_steps", phase)
        object.__setattr__(self, "update_every", phase)
        super().__post_init__()
        if self.end_step <= self.start_step:
            raise ValueError(
                f"Expected `end_step` > `start_step` for schedule 'odd_even', but got "
                f"start_step={self.start_step}, end_step={self.end_step}"
            )

    def is_recovering(self, step: int) -> bool:
        """Whether ``step`` lies in a recover (dense) phase."""
        if step < self.start_step or step >= self.end_step:
            return False
        return ((step - self.start_step) // self.phase_steps) % 2 == 1

    def __call__(self, step: int) -> float:
        if step < self.start_step or self.is_recovering(step):
            return 0.0
        return self.final_sparsity


@dataclass(frozen=True)
class FunctionSchedule(Schedule):
    """A plain callable ``step -> sparsity`` as a schedule (as Lightning's ``ModelPruning`` takes a callable
    amount): masks are recomputed every ``update_every`` steps from ``start_step`` to ``end_step`` at
    ``fn(step)``; ``final_sparsity`` is ``fn(end_step)``. Every value is checked to lie in [0, 1).

    Example:
        >>> s = FunctionSchedule(fn=lambda step: min(step / 1000, 0.8), start_step=0, end_step=800, update_every=200)
        >>> s.final_sparsity, s(400), s.update_steps()
        (0.8, 0.4, [0, 200, 400, 600, 800])
        >>> FunctionSchedule(fn=lambda step: step / 5, end_step=10)
        Traceback (most recent call last):
        ...
        ValueError: Expected `schedule(10)` to be a float in [0, 1), but got 2.0
    """

    fn: Callable[[int], float] | None = field(default=None, compare=False)
    final_sparsity: float = field(default=-1.0)
    name: ClassVar[str] = "function"
    default_window: ClassVar[tuple[float, float | None]] = (0.0, 1.0)  # a callable decides its own shape

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"Expected `schedule` to be a callable step -> sparsity, but got {self.fn!r}")
        end = check_int("end_step", self.end_step, minimum=0)
        object.__setattr__(self, "final_sparsity", self(end, check_window=False))
        super().__post_init__()

    def __call__(self, step: int, check_window: bool = True) -> float:
        if check_window and step < self.start_step:
            return 0.0
        return check_fraction(f"schedule({step})", self.fn(min(step, self.end_step)))  # type: ignore[misc]


SCHEDULES: Registry[type[Schedule]] = Registry("schedule", base=Schedule)
"""The schedules by name; a new one is a :class:`Schedule` subclass with a ``name`` and ``@SCHEDULES.register``."""


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    """Register a schedule class under its ``name`` (usable as ``schedule="NAME"`` in callbacks and configs): the
    same as ``SCHEDULES.register(cls)``.

    Example:
        >>> @register_schedule
        ... @dataclass(frozen=True)
        ... class Step(Schedule):
        ...     name: ClassVar[str] = "step_half"
        ...     def __call__(self, step):
        ...         return self.final_sparsity if step >= self.end_step else self.final_sparsity / 2 * (
        ...             step >= self.start_step)
        >>> make_schedule("step_half", final_sparsity=0.8, start_step=0, end_step=10, update_every=5)(5)
        0.4
        >>> del SCHEDULES["step_half"]
    """
    return SCHEDULES.register(cls)


for _cls in (
    ConstantSchedule,
    OneShotSchedule,
    LinearSchedule,
    PolynomialSchedule,
    CubicSchedule,
    ExponentialSchedule,
    OddEvenSchedule,
):
    SCHEDULES.register(_cls)


def make_schedule(
    name: str, *, final_sparsity: float, start_step: int, end_step: int | None = None, **kwargs: Any
) -> Schedule:
    """Build a schedule by its registered name; arguments that do not apply to it are refused by name.

    Example:
        >>> make_schedule("cubic", final_sparsity=0.5, start_step=0, end_step=10, update_every=2)
        CubicSchedule(final_sparsity=0.5, start_step=0, end_step=10, update_every=2, initial_sparsity=0.0, power=3.0)
        >>> make_schedule("cubical", final_sparsity=0.5, start_step=0)
        Traceback (most recent call last):
        ...
        ValueError: Unknown `schedule` 'cubical'; expected one of: 'constant', 'cubic', 'exponential', 'linear', \
'odd_even', 'one_shot', 'polynomial'
    """
    cls = SCHEDULES[SCHEDULES.check(name)]
    given = {key: value for key, value in kwargs.items() if value is not None}
    for key in given:
        if key not in cls.extra_args:
            raise ValueError(
                f"`{key}` does not apply to schedule {name!r}; it takes: final_sparsity, start, end"
                + "".join(f", {a}" for a in cls.extra_args)
            )
    if end_step is None:
        if not cls.single_bound:
            raise ValueError(f"Schedule {name!r} needs an end (end_step, end_epoch or end_fraction), but got None")
        end_step = start_step
    return cls(final_sparsity=final_sparsity, start_step=start_step, end_step=end_step, **given)


def as_schedule(schedule: str | Schedule | Callable[[int], float]) -> str | Schedule | Callable[[int], float]:
    """Check that ``schedule`` is a registered name, a :class:`Schedule` or a plain callable; return it.

    Example:
        >>> as_schedule("cubic")
        'cubic'
        >>> as_schedule(3)
        Traceback (most recent call last):
        ...
        ValueError: Expected `schedule` to be a schedule name, a Schedule or a callable step -> sparsity, but got 3
    """
    if isinstance(schedule, str):
        SCHEDULES.check(schedule)
        return schedule
    if isinstance(schedule, Schedule) or callable(schedule):
        return schedule
    raise ValueError(
        f"Expected `schedule` to be a schedule name, a Schedule or a callable step -> sparsity, but got {schedule!r}"
    )
