"""The accumulation window as the benchmarks wire it (bench/window_wiring.py), and the history precision smoke run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.window_wiring import install, next_update_step, uninstall
from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback
from pat_callbacks.core.schedules import CubicSchedule

ROOT = Path(__file__).resolve().parents[2]


def test_next_update_step_is_the_first_update_at_or_after_the_step():
    schedule = CubicSchedule(final_sparsity=0.9, start_step=10, end_step=35, update_every=10)
    updates = schedule.update_steps()
    for step in range(0, 40):
        expected = next((u for u in updates if u >= step), schedule.end_step)
        assert next_update_step(schedule, step) == expected, step


def test_install_and_uninstall_restore_the_callbacks_own_method():
    original = ScheduledPruningCallback._accumulating
    install()
    install()  # idempotent
    assert ScheduledPruningCallback._accumulating is not original
    uninstall()
    assert ScheduledPruningCallback._accumulating is original


def test_history_precision_quick_run_writes_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/history_precision.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    table = (tmp_path / "history_precision.md").read_text()
    assert "| bfloat16 | all | 0.9 |" in table and "| float32 | all | 0.9 | 1.00000 | 1.00000 | 1.00000 |" in table
    assert done.returncode == 0
