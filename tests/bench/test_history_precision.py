"""bench/history_precision.py: the quick run writes its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
