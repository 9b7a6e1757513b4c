"""bench/oneshot_scale.py measures both pipelines on a tiny Llama and finds them equal (timings not asserted)."""

from __future__ import annotations

from bench.oneshot_scale import extrapolate, main, markdown, measure


def test_both_pipelines_give_the_same_masks_and_weights_on_a_tiny_llama():
    rows = [
        measure(2, 32, method, pipeline, tokens=8, batches=2)
        for method in ("wanda", "sparsegpt")
        for pipeline in ("whole", "blocks")
    ]
    for method in ("wanda", "sparsegpt"):
        whole, blocks = (r for r in rows if r["method"] == method)
        assert (whole["masks"], whole["weights"]) == (blocks["masks"], blocks["weights"])
        assert whole["ms_per_block"] > 0 and blocks["peak_mb"] >= 0
    text = markdown(rows, "python bench/oneshot_scale.py --smoke")
    assert "| 32 | 2 | sparsegpt |" in text and "yes / yes" in text and "NO" not in text
    assert {e["model"] for e in extrapolate(rows)} == {"Llama-7B", "Llama-70B"}


def test_the_smoke_mode_writes_the_tables(tmp_path):
    main(["--smoke", "--methods", "wanda", "--out", str(tmp_path)])
    assert "Llama-70B" in (tmp_path / "oneshot_scale.md").read_text()
    assert (tmp_path / "oneshot_scale.csv").read_text().startswith("hidden,depth,method")
