"""bench/mask_pass.py: a short run writes one row per kernel, dense's ratio 1."""

from __future__ import annotations

import csv
import sys

from bench import mask_pass


def test_a_short_run_writes_every_kernel_row(tmp_path, monkeypatch):
    arguments = ["--models", "mlp", "--steps", "2", "--warmup", "0", "--rounds", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["mask_pass.py", *arguments])
    mask_pass.main()
    with open(tmp_path / "mask_pass.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in rows] == list(mask_pass.VARIANTS)
    assert float(rows[0]["ratio_to_dense"]) == 1.0
    assert all(float(r["step_ms"]) > 0 for r in rows)
    assert "| mlp | pieces (the library) |" in (tmp_path / "mask_pass.md").read_text()
