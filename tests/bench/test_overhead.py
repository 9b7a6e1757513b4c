"""bench/overhead.py: variants in their own processes take turns step by step; one that fails is reported."""

from __future__ import annotations

from bench import overhead


def test_variants_take_turns_and_a_failing_peer_is_reported_not_hidden():
    settings = {"steps": 2, "warmup": 1, "seed": 0, "threads": 1, "cpu_time": False}
    results = overhead.take_turns("cnn", ["dense", "torch.ao WeightNormSparsifier + CubicSL"], settings)
    dense = results["dense"]
    assert isinstance(dense, dict)
    assert len(dense["all_times"]) == 2 and all(t > 0 for t in dense["all_times"])
    assert dense["extra_bytes"] == 0 and dense["rss_mib"] > 0
    assert results["torch.ao WeightNormSparsifier + CubicSL"].startswith("RuntimeError: shape")
