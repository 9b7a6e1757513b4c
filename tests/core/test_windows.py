"""Schedule windows resolve to steps without a Trainer; schedule properties come from the classes, not names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from pat_callbacks.core.schedules import SCHEDULES, FunctionSchedule, Schedule, register_schedule
from pat_callbacks.core.windows import DEFAULT_UPDATE_EVERY, ScheduleSpec


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({"start_step": 5, "end_step": 50}, (5, 50)),
        ({"start_epoch": 1, "end_epoch": 3}, (20, 60)),
        ({"start_fraction": 0.5, "end_fraction": 1.0}, (99, 199)),
        ({"start_step": 3, "end_fraction": 0.5}, (3, 99)),
        ({}, (19, 139)),  # the default window: 10% to 70% of the run
    ],
)
def test_window_units_resolve_to_optimizer_steps(window, expected):
    schedule = ScheduleSpec("linear", final_sparsity=0.5, **window).resolve(steps_per_epoch=20, total_steps=200)
    assert (schedule.start_step, schedule.end_step) == expected
    assert schedule.update_every == DEFAULT_UPDATE_EVERY


def test_single_bound_and_phased_schedules_are_declared_on_their_classes():
    assert {name for name, cls in SCHEDULES.items() if cls.single_bound} == {"constant", "one_shot"}
    assert {name for name, cls in SCHEDULES.items() if cls.phased} == {"odd_even"}
    assert ScheduleSpec("constant", final_sparsity=0.5, start_step=7).fixed.update_steps() == [7]
    phased = ScheduleSpec("odd_even", final_sparsity=0.5, start_epoch=0, end_epoch=4, phase_epochs=1)
    assert phased.resolve(steps_per_epoch=10, total_steps=100).phase_steps == 10
    with pytest.raises(ValueError, match=r"`phase_epochs` does not apply to schedule 'cubic'; only to 'odd_even'"):
        ScheduleSpec("cubic", final_sparsity=0.5, phase_epochs=1)
    with pytest.raises(ValueError, match="`update_every` does not apply to schedule 'one_shot'"):
        ScheduleSpec("one_shot", final_sparsity=0.5, start_step=3, update_every=5)


def test_a_registered_schedule_gets_windows_by_its_declared_properties():
    @dataclass(frozen=True)
    class Staircase(Schedule):
        name: ClassVar[str] = "staircase_test"
        single_bound: ClassVar[bool] = True

        def __call__(self, step: int) -> float:
            return self.final_sparsity if step >= self.start_step else 0.0

    register_schedule(Staircase)
    try:
        spec = ScheduleSpec("staircase_test", final_sparsity=0.6, start_fraction=0.5)
        schedule = spec.resolve(steps_per_epoch=10, total_steps=101)
        assert isinstance(schedule, Staircase) and (schedule.start_step, schedule.end_step) == (50, 50)
    finally:
        del SCHEDULES["staircase_test"]


def test_a_plain_callable_is_a_schedule_over_the_whole_run_by_default():
    spec = ScheduleSpec(lambda step: min(step / 100, 0.9), update_every=25)
    schedule = spec.resolve(steps_per_epoch=10, total_steps=81)
    assert isinstance(schedule, FunctionSchedule)
    assert (schedule.start_step, schedule.end_step) == (0, 80) and spec.final_sparsity == 0.8
    assert schedule.update_steps() == [0, 25, 50, 75, 80] and schedule(40) == 0.4 and schedule(500) == 0.8
    with pytest.raises(ValueError, match="decides its own sparsity"):
        ScheduleSpec(lambda step: 0.5, final_sparsity=0.5)
    with pytest.raises(ValueError, match="`power` does not apply to a callable schedule"):
        ScheduleSpec(lambda step: 0.5, power=2)
    with pytest.raises(ValueError, match=r"Expected `schedule\(10\)` to be a float in \[0, 1\), but got 1.5"):
        ScheduleSpec(lambda step: 1.5, start_step=0, end_step=10)


def test_window_errors_that_need_the_run_length_come_at_resolve():
    spec = ScheduleSpec("cubic", final_sparsity=0.5, start_epoch=0.001, end_epoch=0.002)
    with pytest.raises(ValueError, match="resolved to start_step=0, end_step=0"):
        spec.resolve(steps_per_epoch=10, total_steps=100)
    with pytest.raises(ValueError, match="`end_fraction` needs a finite training length"):
        ScheduleSpec("cubic", final_sparsity=0.5, start_step=0).resolve(10, float("inf"))
    with pytest.raises(ValueError, match="`start_epoch` needs a sized train dataloader"):
        ScheduleSpec("cubic", final_sparsity=0.5, start_epoch=1, end_step=50).resolve(0, 100)
