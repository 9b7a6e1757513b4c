"""bench/scale.py measures what it says on a tiny model (timings are not asserted: they belong to the benchmark)."""

from __future__ import annotations

import pytest

from bench.scale import VARIANTS, measure


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_measures_an_update_and_gradient_masking(variant):
    row = measure(0.25, variant, threads=1)
    assert row["variant"] == variant and row["weights_m"] == 0.25
    assert row["pass_ms"] > 0 and row["update_ms"] > 0 and row["update_per_pass"] > 0
    assert row["transient_per_weight_bytes"] >= 0 and row["grad_mask_per_pass"] > 0
