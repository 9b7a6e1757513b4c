"""OWL: ratios from outliers, sparsities within target +- lambda, mean at the target, more outliers -> less pruned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.core.patterns import prune_count
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.oneshot import layer_groups, one_shot_prune, outlier_ratios, owl_sparsities

torch.set_num_threads(1)


def _scores(outliers: list[int], size: int = 200) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.w": torch.cat([torch.ones(size - k), 50 * torch.ones(k)]) for i, k in enumerate(outliers)}


def test_ratios_count_scores_above_m_times_the_layer_mean():
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0])}  # mean 4: 16 > 3 * 4 once
    assert outlier_ratios(scores, m=3.0) == {"a": 0.2}
    assert outlier_ratios(scores, m=5.0) == {"a": 0.0}


@pytest.mark.parametrize("target", [0.5, 0.7, 0.8])
def test_sparsities_span_two_lambda_keep_the_mean_and_order_by_outliers(target):
    planned = owl_sparsities(_scores([0, 2, 4, 8]), target, lam=0.08, m=5.0)
    values = list(planned.values())
    # the linear map spans 2 lambda, but block 3's outliers would put it at target - 0.09: it is clipped to the band
    # and the others shifted up together so the mean stays the target (span 0.147 instead of 0.16)
    assert min(values) == pytest.approx(target - 0.08)
    assert max(values) - min(values) == pytest.approx(0.16 - 0.04 / 3)
    assert sum(values) / len(values) == pytest.approx(target)
    assert values == sorted(values, reverse=True)  # more outliers, less pruned


def test_unequal_layers_keep_the_overall_count():
    scores = {"blocks.0.w": torch.ones(100), "blocks.1.w": torch.cat([torch.ones(290), 50 * torch.ones(10)])}
    planned = owl_sparsities(scores, 0.7)
    pruned = sum(planned[n] * s.numel() for n, s in scores.items())
    assert pruned == pytest.approx(0.7 * 400)


def test_groups_are_transformer_blocks():
    groups = layer_groups(["net.blocks.0.attn.in_proj_weight", "net.blocks.0.mlp.2.weight", "head.weight"])
    assert groups == {
        "net.blocks.0.attn.in_proj_weight": "net.blocks.0",
        "net.blocks.0.mlp.2.weight": "net.blocks.0",
        "head.weight": "head.weight",
    }


def test_owl_output_feeds_the_pruner_as_layer_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    planned = owl_sparsities(_scores_of(model), 0.6, groups={"0.weight": "0.weight", "2.weight": "2.weight"})
    pruner = Pruner(model, layer_sparsity=planned)
    assert pruner.prune_to(0.6)
    for name, value in planned.items():
        assert pruner.layer_sparsity()[name] == pytest.approx(value, abs=1 / 128)


def _scores_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"0.weight": model[0].weight.detach().abs(), "2.weight": model[2].weight.detach().abs() ** 3}


def test_one_shot_with_owl_prunes_layers_at_their_planned_sparsities():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(128, 8)
    x[:, 0] *= 30  # an outlier feature: the first layer's column 0 dominates its scores
    result = one_shot_prune(model, "wanda", 0.7, owl=True, calibration=[x], owl_lambda=0.1, owl_m=3.0)
    assert len(set(result.planned.values())) > 1  # the layers differ
    for name, value in result.planned.items():
        weight = dict(model.named_parameters())[name]
        # compared per output row, the layer's count exact: prune_count(numel, planned) zeros
        assert int((weight == 0).sum()) == prune_count(weight.numel(), value)
    assert abs(result.sparsity - 0.7) < 0.02
