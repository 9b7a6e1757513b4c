import math
import pickle

import pytest

from pat_callbacks.callbacks.scheduled import default_update_every
from pat_callbacks.core.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CubicSchedule,
    ExponentialSchedule,
    LinearSchedule,
    OddEvenSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    Schedule,
    make_schedule,
    next_update_step,
)
from pat_callbacks.core.windows import ScheduleSpec

EXAMPLES: dict[str, Schedule] = {
    "constant": ConstantSchedule(final_sparsity=0.6, start_step=10, end_step=90, update_every=20),
    "one_shot": OneShotSchedule(final_sparsity=0.6, start_step=40),
    "linear": LinearSchedule(final_sparsity=0.6, start_step=10, end_step=90, update_every=20),
    "polynomial": PolynomialSchedule(final_sparsity=0.6, start_step=10, end_step=90, update_every=20, power=2),
    "cubic": CubicSchedule(final_sparsity=0.6, start_step=10, end_step=90, update_every=20),
    "exponential": ExponentialSchedule(final_sparsity=0.6, start_step=10, end_step=90, update_every=20),
    "odd_even": OddEvenSchedule(final_sparsity=0.6, start_step=10, end_step=90, phase_steps=20),
}


def test_every_registered_schedule_has_an_example():
    assert set(EXAMPLES) == set(SCHEDULES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_schedule_contract(name):
    """Dense before start, final sparsity from end on, values in [0, 1), pure and picklable."""
    schedule = EXAMPLES[name]
    assert schedule(0) == 0.0
    assert schedule(schedule.start_step - 1) == 0.0
    assert schedule(schedule.end_step) == pytest.approx(0.6)
    assert schedule(10_000) == pytest.approx(0.6)
    values = [schedule(t) for t in range(0, 200)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [schedule(t) for t in range(0, 200)]  # no hidden state
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    updates = schedule.update_steps()
    assert updates[0] == schedule.start_step and updates[-1] == schedule.end_step
    assert [t for t in range(0, 200) if schedule.is_update_step(t)] == updates


def test_cubic_matches_zhu_gupta_formula():
    s = CubicSchedule(final_sparsity=0.9, initial_sparsity=0.1, start_step=100, end_step=500, update_every=50)
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3
    assert s(100) == pytest.approx(0.1)
    assert s(300) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)  # 0.8
    assert s(200) == pytest.approx(0.9 + (0.1 - 0.9) * 0.75**3)
    assert s(500) == pytest.approx(0.9)
    assert s(99) == 0.0  # dense before the window
    assert s(501) == pytest.approx(0.9)  # clamped after


def test_ramps_by_hand():
    assert LinearSchedule(final_sparsity=0.8, start_step=0, end_step=100)(75) == pytest.approx(0.6)
    poly = PolynomialSchedule(final_sparsity=0.8, start_step=0, end_step=100, power=2)
    assert poly(50) == pytest.approx(0.8 - 0.8 * 0.25)
    exp = ExponentialSchedule(final_sparsity=0.9, initial_sparsity=0.5, start_step=0, end_step=100)
    # density 0.5 -> 0.1 geometrically: at 50% of the window density is 0.5 * sqrt(0.2)
    assert exp(50) == pytest.approx(1 - 0.5 * math.sqrt(0.2))
    assert exp(0) == pytest.approx(0.5)


def test_update_steps_include_end_even_off_grid():
    s = CubicSchedule(final_sparsity=0.5, start_step=0, end_step=250, update_every=100)
    assert s.update_steps() == [0, 100, 200, 250]


def test_odd_even_phase_boundaries():
    s = OddEvenSchedule(final_sparsity=0.8, start_step=100, end_step=450, phase_steps=100)
    expected = {
        99: 0.0,  # dense warm-up
        100: 0.8,
        199: 0.8,  # prune phase 0
        200: 0.0,
        299: 0.0,  # recover phase 1
        300: 0.8,
        399: 0.8,  # prune phase 2
        400: 0.0,
        449: 0.0,  # recover phase 3 (cut short by end_step)
        450: 0.8,
        10_000: 0.8,  # always ends in a prune phase
    }
    assert {t: s(t) for t in expected} == expected
    assert s.is_recovering(250) and not s.is_recovering(450)
    assert s.update_steps() == [100, 200, 300, 400, 450]


def test_one_shot_prunes_once():
    s = OneShotSchedule(final_sparsity=0.7, start_step=30)
    assert [t for t in range(100) if s.is_update_step(t)] == [30]
    assert (s(29), s(30), s(99)) == (0.0, 0.7, 0.7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, "`final_sparsity` to be a float in [0, 1), but got 1.0"),
        ({"final_sparsity": -0.1}, "`final_sparsity` to be a float in [0, 1), but got -0.1"),
        ({"final_sparsity": "abc"}, "but got 'abc'"),
        ({"end_step": 10}, "`end_step` > `start_step`"),
        ({"end_step": 5}, "`end_step` >= `start_step`"),
        ({"update_every": 0}, "`update_every` to be an integer >= 1, but got 0"),
        ({"initial_sparsity": 0.95}, "`initial_sparsity` <= `final_sparsity`"),
    ],
)
def test_bad_values_raise_naming_the_value(kwargs, message):
    args = {"final_sparsity": 0.9, "start_step": 10, "end_step": 100, "update_every": 10} | kwargs
    with pytest.raises(ValueError) as excinfo:
        CubicSchedule(**args)
    assert message in str(excinfo.value)


def test_make_schedule_refuses_unknown_names_and_foreign_arguments():
    with pytest.raises(ValueError, match="Unknown `schedule` 'cubicc'; expected one of: 'constant'"):
        make_schedule("cubicc", final_sparsity=0.5, start_step=0, end_step=10)
    with pytest.raises(ValueError, match="`power` does not apply to schedule 'cubic'"):
        make_schedule("cubic", final_sparsity=0.5, start_step=0, end_step=10, power=2)
    with pytest.raises(ValueError, match="needs an end"):
        make_schedule("linear", final_sparsity=0.5, start_step=0)
    with pytest.raises(ValueError, match="`phase_steps` to be an integer >= 1, but got 0"):
        make_schedule("odd_even", final_sparsity=0.5, start_step=0, end_step=10, phase_steps=0)


@pytest.mark.parametrize(
    "schedule",
    [
        CubicSchedule(final_sparsity=0.9, start_step=10, end_step=35, update_every=10),  # final update off the grid
        CubicSchedule(final_sparsity=0.9, start_step=0, end_step=40, update_every=10),
        OddEvenSchedule(final_sparsity=0.9, start_step=5, end_step=47, phase_steps=7),  # prune and recover phases
        OneShotSchedule(final_sparsity=0.5, start_step=12),
        ScheduleSpec("cubic", final_sparsity=0.8, start_epoch=1, end_epoch=4, update_every=6).resolve(9, 50),
        default_update_every(CubicSchedule(final_sparsity=0.9, start_step=3, end_step=27)),  # update_every auto: 2
    ],
    ids=["off_grid_end", "on_grid", "odd_even", "one_shot", "epochs", "auto_update_every"],
)
def test_next_update_step_is_the_first_update_step_at_or_after_the_step(schedule):
    updates = schedule.update_steps()
    assert all(schedule.is_update_step(step) for step in updates)
    for step in range(schedule.end_step + 20):
        expected = next((update for update in updates if update >= step), None)
        assert next_update_step(schedule, step) == expected, step


def test_next_update_step_of_windows_resolved_from_epochs_and_auto_update_every():
    resolved = ScheduleSpec("cubic", final_sparsity=0.8, start_epoch=1, end_epoch=4, update_every=6).resolve(9, 50)
    assert (resolved.start_step, resolved.end_step) == (9, 36)
    assert [next_update_step(resolved, step) for step in (0, 9, 10, 33, 34, 36, 37)] == [9, 9, 15, 33, 36, 36, None]
    auto = default_update_every(CubicSchedule(final_sparsity=0.9, start_step=3, end_step=27))
    assert auto.update_every == 2 and [next_update_step(auto, step) for step in (4, 26, 27)] == [5, 27, 27]
