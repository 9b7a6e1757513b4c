"""bench/gpu.py runs every part in its CPU smoke mode (tiny sizes), so it cannot rot while no GPU is lent; timings
are not asserted (they belong to the benchmark)."""

from __future__ import annotations

import csv

from bench.gpu import run


def _rows(tmp_path):
    with open(tmp_path / "gpu.csv") as handle:
        return list(csv.DictReader(handle))


def test_smoke_updates_equality_kernels_and_shrink(tmp_path):
    run(["updates", "equality", "kernels", "shrink"], smoke=True, out=tmp_path)
    rows = _rows(tmp_path)
    assert not [r for r in rows if r["metric"] == "failed"], rows
    equal = {r["name"]: r["value"] for r in rows if r["part"] == "equality" and r["metric"] == "equal"}
    assert equal == {"uniform": "True", "global": "True", "2:4": "True", "rigl": "True"}
    assert {r["metric"] for r in rows if r["part"] == "updates"} >= {"host_passes", "device_passes"}
    assert any(r["part"] == "shrink" and r["metric"] == "whole_ratio" for r in rows)
    text = (tmp_path / "gpu.md").read_text()
    assert "CPU smoke run" in text and "CUDA rows: not run (no GPU lent on" in text
    assert "Not run: to_semi_structured needs CUDA" in text and "layers on the 2:4 kernel" in text


def test_smoke_training_steps_of_every_variant(tmp_path):
    run(["steps"], smoke=True, out=tmp_path)
    rows = _rows(tmp_path)
    assert not [r for r in rows if r["metric"] == "failed"], rows
    ratios = {r["name"] for r in rows if r["part"] == "steps" and r["metric"] == "rep1_step_ratio"}
    assert ratios == {"dense", "default", "magnitude-uniform", "rigl", "modelpruning"}
    extras = {r["name"] for r in rows if r["part"] == "steps" and r["metric"].endswith("update_extra_ms")}
    assert extras == {"default", "magnitude-uniform", "rigl", "modelpruning"}


def test_a_part_over_its_limit_keeps_what_it_finished_and_says_so(tmp_path, monkeypatch):
    import time

    from bench import gpu

    def slow_steps(rows, sizes, device, smoke):  # writes what it finished, then runs past its limit
        rows.section("steps", ["## Training steps", "", "| variant | ratio |", "|---|---|", "| dense | 1.00 |"])
        time.sleep(5)

    monkeypatch.setitem(gpu.RUNNERS, "steps", slow_steps)
    monkeypatch.setitem(gpu.SMOKE.limits, "steps", 1)
    rows = run(["steps"], smoke=True, out=tmp_path).rows
    assert [r["value"] for r in rows if r["metric"] == "failed"] == ["PartTimeout: over its 1 s limit"]
    text = (tmp_path / "gpu.md").read_text()
    assert "## Training steps" in text and "Failed: `PartTimeout: over its 1 s limit`" in text
