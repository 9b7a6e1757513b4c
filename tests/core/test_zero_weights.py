"""Issue 24: exact zeros and empty parameters under global pruning; an empty `include`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.core.options import PruningOptions
from pat_callbacks.core.pruner import Pruner


def three_layers(zero: int, sizes=(16, 64, 64, 4)) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(sizes[i], sizes[i + 1]) for i in range(3)))
    with torch.no_grad():
        model[zero].weight.zero_()
    return model


def real(model: nn.Sequential) -> float:
    weights = [layer.weight for layer in model]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("allocation", ["global", "global_raw"])
def test_an_all_zero_layer_bigger_than_the_budget_is_masked_whole_and_masks_count_what_the_weights_show(allocation):
    model = three_layers(zero=1)  # 4096 of 4416 weights are exact zeros: more than a 0.5 target
    pruner = Pruner(model, allocation=allocation)
    with pytest.warns(UserWarning, match="'1.weight' is pruned to"):
        assert pruner.prune_to(0.5)
    total = sum(layer.weight.numel() for layer in model)
    assert pruner.sparsity() * total == real(model) * total - 1  # what the weights show, less the zero kept
    assert pruner.layer_sparsity() == {"0.weight": 0.0, "1.weight": 4095 / 4096, "2.weight": 0.0}
    assert int(pruner.masks["1.weight"].sum()) == 1  # every layer keeps one weight


@pytest.mark.parametrize("zero", [0, 2])
def test_zeros_within_the_budget_leave_the_overall_count_exact(zero):
    model = three_layers(zero=zero)
    pruner = Pruner(model, allocation="global")
    with pytest.warns(UserWarning, match="is pruned to"):
        pruner.prune_to(0.5)
    assert real(model) == pytest.approx(0.5, abs=1e-3) and pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
    others = [name for name in pruner.params if name != f"{zero}.weight"]
    assert all(pruner.layer_sparsity()[name] > 0.3 for name in others)


def test_an_empty_parameter_is_left_out_with_a_warning():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"\['0.weight'\] have no entries"):
        pruner = Pruner(model, allocation="global")
    assert pruner.prune_to(0.5) and list(pruner.params) == ["1.weight"] and pruner.sparsity() == 0.5


def test_an_empty_include_list_is_refused():
    with pytest.raises(ValueError, match=r"Expected `include` to hold at least one glob pattern, but got \[\]"):
        PruningOptions(include=[])


def test_a_falling_target_still_lifts_masks_whose_weights_are_zero_because_they_are_masked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 4))
    pruner = Pruner(model, allocation="global")
    pruner.prune_to(0.8)
    assert pruner.prune_to(0.3)
    assert pruner.sparsity() == pytest.approx(0.3, abs=1e-3)
