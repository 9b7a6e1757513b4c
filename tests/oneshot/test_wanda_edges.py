"""Wanda at its edges: a sparsity that would empty a layer keeps one weight (the highest score) and is warned about,
in the words magnitude's Pruner uses."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pat_callbacks.oneshot import one_shot_prune, row_mask, row_masks


@pytest.mark.parametrize("sparsity", [0.999, 1.0])
def test_row_mask_keeps_the_highest_score_of_the_layer(sparsity):
    scores = torch.tensor([[1.0, 9.0, 3.0], [4.0, 2.0, 8.0]])
    assert row_mask(scores, sparsity).int().tolist() == [[0, 1, 0], [0, 0, 0]]


def test_row_mask_of_one_row_or_one_weight_keeps_one():
    assert row_mask(torch.tensor([[3.0, 1.0, 2.0]]), 1.0).int().tolist() == [[1, 0, 0]]
    assert row_mask(torch.tensor([[3.0]]), 1.0).tolist() == [[True]]


def test_row_mask_below_the_edge_is_unchanged():
    scores = torch.tensor([[1.0, 9.0, 3.0], [4.0, 2.0, 8.0]])
    assert row_mask(scores, 4 / 6).int().tolist() == [[0, 1, 0], [0, 0, 1]]


def test_row_masks_warn_about_a_layer_past_0_99():
    scores = {"big": torch.rand(8, 16), "small": torch.rand(2, 4)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = row_masks(scores, {"big": 0.999, "small": 0.999})
    assert {name: int(m.sum()) for name, m in masks.items()} == {"big": 1, "small": 1}
    messages = [str(w.message) for w in caught]
    assert messages == [
        "Wanda: 'big' is pruned to 0.9922 (over 0.99), keeping 1 of 128 weights: the layer nearly cuts the network "
        "off; pin it lower with `layer_sparsity` or leave it out with `exclude`"
    ]  # 'small' keeps 1 of 8: 0.875, not past 0.99


def test_row_masks_at_ordinary_sparsities_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row_masks({"w": torch.rand(8, 16)}, {"w": 0.9})


@pytest.mark.parametrize("options", [{}, {"allocation": "owl"}, {"sequential": False}])
def test_one_shot_wanda_at_0_999_keeps_one_weight_per_layer_and_warns_like_magnitude(options):
    warned = {}
    for method, kwargs in (("magnitude", {}), ("wanda", options)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = one_shot_prune(model, method, 0.999, calibration=[torch.randn(32, 16)], **kwargs)
        assert {name: int(m.sum()) for name, m in result.pruner.masks.items()} == {"0.weight": 1, "2.weight": 1}
        assert [int((p != 0).sum()) for p in (model[0].weight, model[2].weight)] == [1, 1]
        warned[method] = [str(w.message).split(": ", 1)[1] for w in caught if "over 0.99" in str(w.message)]
    assert warned["wanda"] == warned["magnitude"]
    assert len(warned["wanda"]) == 1 and "'0.weight' is pruned to 0.9922" in warned["wanda"][0]


@pytest.mark.parametrize(("method", "options"), [("wanda", {"per_row": False}), ("magnitude", {"allocation": "owl"})])
def test_a_layer_compared_as_a_whole_keeps_a_weight_at_0_999_with_a_warning(method, options):
    from torch import nn

    from pat_callbacks.oneshot import one_shot_prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(4, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match="0.99"):
        one_shot_prune(model, method, 0.999, calibration=batches, **options)
    assert all(int((layer.weight != 0).sum()) >= 1 for layer in (model[0], model[2]))
