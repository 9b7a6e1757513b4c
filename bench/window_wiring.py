"""The callback wiring of the accumulation window, for the benchmarks until the callbacks make the call themselves.

The Trainer-free core accumulates Taylor / Fisher history only over ``accumulate_window`` steps before each update
when the caller passes the step and the next update step (:meth:`~pat_callbacks.core.pruner.Pruner.accumulate`).
The scheduled callbacks know both; :func:`install` makes them skip the other steps, as the wired callback will:
``pruner.accumulate(step, next_update=next_update_step(schedule, step))``.
"""

from __future__ import annotations

from typing import Any

import torch


def next_update_step(schedule: Any, step: int) -> int:
    """The first update step of ``schedule`` at or after ``step`` (``start_step + k * update_every``, or
    ``end_step``); ``end_step`` once past it.

    Example:
        >>> from pat_callbacks.core.schedules import CubicSchedule
        >>> schedule = CubicSchedule(final_sparsity=0.9, start_step=10, end_step=35, update_every=10)
        >>> [next_update_step(schedule, step) for step in (0, 10, 11, 30, 31, 40)]
        [10, 10, 20, 30, 35, 35]
    """
    start, every, end = schedule.start_step, schedule.update_every, schedule.end_step
    if step <= start:
        return start
    return min(start + -(-(step - start) // every) * every, end)


def install(window: int | None = None, every_step_float32: bool = False) -> None:
    """Make every scheduled pruning callback accumulate only where ``Pruner.accumulates_at`` says (idempotent);
    ``window``: a window other than the pruner's ``accumulate_window`` (a benchmark row of another window);
    ``every_step_float32``: the former history instead (every step, float32), as a control row."""
    from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback

    uninstall()
    original = ScheduledPruningCallback._accumulating

    def _accumulating(self: Any, step: int) -> bool:
        if not original(self, step):
            return False
        pruner = self._require_pruner()
        if self._retry or not hasattr(pruner, "accumulates_at"):
            return True
        if window is not None:
            pruner.scorer.window = window
        if every_step_float32:
            pruner.scorer.window, pruner.scorer.dtype = None, torch.float32
        return pruner.accumulates_at(step, next_update_step(self._require_schedule(), step))

    ScheduledPruningCallback._accumulating = _accumulating  # type: ignore[method-assign]
    ScheduledPruningCallback._window_wired = original  # type: ignore[attr-defined]


def uninstall() -> None:
    """Undo :func:`install` (a worker process that runs other rows next)."""
    from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback

    original = getattr(ScheduledPruningCallback, "_window_wired", False)
    if original:
        ScheduledPruningCallback._accumulating = original  # type: ignore[method-assign]
        ScheduledPruningCallback._window_wired = False  # type: ignore[attr-defined]
