"""bench/scale.py measures what it says on a tiny model (timings are not asserted: they belong to the benchmark)."""

from __future__ import annotations

import pytest

from bench.scale import CALLBACK_VARIANTS, VARIANTS, measure, measure_callback, measure_sharded


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_measures_an_update_and_gradient_masking(variant):
    row = measure(0.25, variant, threads=1)
    assert row["variant"] == variant and row["weights_m"] == 0.25
    assert row["pass_ms"] > 0 and row["update_ms"] > 0 and row["update_per_pass"] > 0
    assert row["transient_per_weight_bytes"] >= 0 and row["grad_mask_per_pass"] > 0


@pytest.mark.parametrize("variant", CALLBACK_VARIANTS)
def test_the_update_through_gradual_pruning_is_measured_and_reaches_the_target(variant):
    row = measure_callback(0.25, variant, threads=1)  # raises if the real weights are not at 80%
    assert row["mode"] == "callback" and row["variant"] == variant
    assert row["pass_ms"] > 0 and row["update_ms"] > 0 and row["grad_mask_per_pass"] > 0


def test_a_two_rank_sharded_update_is_measured_and_reaches_the_target():
    row = measure_sharded(0.25, "rigl")  # raises if the full model is not at 80% over both ranks
    assert row["mode"] == "sharded" and row["update_ms"] > 0 and row["transient_per_weight_bytes"] >= 0
