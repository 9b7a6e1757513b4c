"""Wanda: scores equal |W| * ||X|| by hand; usable with the Pruner's allocations and patterns; per-row comparison."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pat_callbacks.core.patterns import prune_count
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.oneshot import Calibration, one_shot_prune, row_mask, wanda_scores

torch.set_num_threads(1)


def test_scores_equal_weight_magnitude_times_input_norm_by_hand():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]]))
    batches = [torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.0, 2.0]])]
    calib = Calibration(layer, ["weight"]).collect(batches)
    scores = wanda_scores({"weight": layer.weight}, {"weight": calib.norms("weight")})["weight"]
    norms = [5.0, 1.0, 5.0**0.5]  # sqrt(3^2 + 4^2), sqrt(1), sqrt(1^2 + 2^2)
    by_hand = torch.tensor([[abs(w) * n for w, n in zip(row, norms, strict=True)] for row in layer.weight.tolist()])
    assert torch.allclose(scores, by_hand)


def test_scores_of_an_in_x_out_matrix_run_along_its_rows():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 4))
    x = torch.randn(5, 4)
    pruner = Pruner(model, pattern="2:4")
    calib = Calibration(model, pruner.params).collect([x])
    scores = wanda_scores(pruner.params, {"0.weight": calib.norms("0.weight")}, pruner.transposed)["0.weight"]
    expected = model[0].weight.detach().abs() * x.norm(dim=0).view(-1, 1)
    assert torch.allclose(scores, expected)


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_scores_drive_every_allocation_of_the_pruner(allocation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 8) * torch.linspace(0.1, 4.0, 8)  # uneven input norms: Wanda differs from magnitude
    calib = Calibration(model, ["0.weight", "2.weight"]).collect([x])
    pruner = Pruner(model, allocation=allocation)
    scores = wanda_scores(pruner.params, {n: calib.norms(n) for n in pruner.params})
    by_magnitude = Pruner(copy.deepcopy(model), allocation=allocation)
    assert by_magnitude.prune_to(0.6)
    magnitude_masks = by_magnitude.masks
    assert pruner.prune_to(0.6, scores=scores)
    zeros = sum(int((p == 0).sum()) for p in pruner.params.values())
    assert zeros == round(pruner.sparsity() * 512) and abs(zeros - 0.6 * 512) <= 1
    assert any(not torch.equal(pruner.masks[n], magnitude_masks[n]) for n in pruner.masks)
    for name, mask in pruner.masks.items():  # within a layer, every pruned score is below every kept one
        assert scores[name][~mask].max() <= scores[name][mask].min()


def test_per_row_comparison_prunes_rows_alike_to_one_and_every_layer_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(16, 10) * torch.linspace(0.1, 5, 10)]  # uneven input norms
    result = one_shot_prune(model, "wanda", 0.3, calibration=batches)
    assert ((model[0].weight == 0).sum(1) == 3).all()  # 0.3 of 10 per row: 18 of 60 exactly
    per_row = (model[2].weight == 0).sum(1)  # 0.3 of 18 is 5 (not 3 x round(1.8) = 6): rows prune 1 or 2
    assert int(per_row.sum()) == prune_count(18, 0.3) and set(per_row.tolist()) == {1, 2}
    assert result.sparsity == (18 + 5) / (60 + 18)  # counted on the masks, where the weights are 0


def test_the_rows_that_prune_one_more_are_those_where_it_costs_least():
    scores = torch.tensor([[1.0, 9.0, 9.5], [1.0, 2.0, 9.0], [1.0, 5.0, 9.0]])  # 4 of 9 at 0.45: one row +1
    assert row_mask(scores, 0.45).int().tolist() == [[0, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_per_row_mask_keeps_the_highest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert row_mask(scores, 0.75).int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("sequential", [True, False])
def test_two_four_holds_after_wanda_counted_on_the_weights(sequential):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Conv1D(8, 16))  # the last stored in x out
    one_shot_prune(model, "wanda", pattern="2:4", sequential=sequential, calibration=[torch.randn(32, 8)])
    assert ((model[0].weight == 0).view(16, 2, 4).sum(-1) == 2).all()
    along_inputs = (model[2].weight == 0).t().reshape(8, 4, 4)  # groups of 4 consecutive inputs per output
    assert (along_inputs.sum(-1) == 2).all()


@pytest.mark.parametrize("family", ["char_gpt", "hf_gpt2"])
def test_per_row_wanda_reaches_every_layers_exact_count_on_transformers(family):
    """0.7 of a row of 16 or 48 inputs rounds (11.2, 33.6): every layer's zeros, counted on the weights, are still
    exactly prune_count(numel, 0.7), also through GPT-2's transposed Conv1D and a tied embedding."""
    from pat_callbacks.app.models import CharGPT

    torch.manual_seed(0)
    if family == "char_gpt":
        net = CharGPT(vocab_size=12, context=8, dim=16, layers=2, heads=2)  # output head tied to the embedding
        forward = None
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        net = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=8, n_embd=16, n_layer=2, n_head=2)).eval()
        forward = lambda model, batch: model(batch).logits  # noqa: E731
    batches = [torch.randint(0, 12, (4, 8)) for _ in range(2)]
    result = one_shot_prune(net, "wanda", 0.7, calibration=batches, forward=forward)
    assert result.pruner.transposed or family == "char_gpt"  # GPT-2's Conv1D weights are in x out
    for name, weight in result.pruner.params.items():
        assert int((weight == 0).sum()) == prune_count(weight.numel(), 0.7), name


def test_per_row_mask_breaks_ties_in_index_order_within_rows_and_across_rows():
    scores = torch.ones(3, 4)
    assert row_mask(scores, 0.5).int().tolist() == [[0, 0, 1, 1]] * 3
    assert row_mask(scores, 7 / 12).int().tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]  # row 0: one more
