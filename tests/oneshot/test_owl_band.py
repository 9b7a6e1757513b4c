"""OWL keeps every planned sparsity within target +- owl_lambda, the size-weighted mean exact, even when one
block's outliers dominate (the issue's 0.787 for a 0.9 target, lambda 0.08)."""

from __future__ import annotations

import pytest
import torch

from pat_callbacks.core.owl import owl_sparsities


def _dominated(blocks: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    scores = {f"blocks.{i}.w": torch.rand(1000) for i in range(blocks)}
    scores["blocks.0.w"] = torch.cat([torch.ones(700), 1000 * torch.ones(300)])  # one block: 30% outliers
    return scores


@pytest.mark.parametrize(("target", "lam"), [(0.9, 0.08), (0.7, 0.08), (0.5, 0.2), (0.95, 0.1)])
def test_one_dominating_block_keeps_every_layer_in_the_band_and_the_mean_exact(target, lam):
    scores = _dominated()
    out = owl_sparsities(scores, target, owl_lambda=lam)
    assert all(target - lam - 1e-9 <= s <= min(target + lam, 1.0) + 1e-9 for s in out.values()), out
    mean = sum(out[n] * scores[n].numel() for n in out) / sum(s.numel() for s in scores.values())
    assert mean == pytest.approx(target, abs=1e-9)
    assert out["blocks.0.w"] == min(out.values())  # the outlier block is still pruned least


def test_within_the_band_the_plan_is_unchanged():
    scores = {"blocks.0.w": torch.ones(100), "blocks.1.w": torch.cat([torch.ones(90), 100 * torch.ones(10)])}
    assert owl_sparsities(scores, 0.7) == pytest.approx({"blocks.0.w": 0.78, "blocks.1.w": 0.62})
