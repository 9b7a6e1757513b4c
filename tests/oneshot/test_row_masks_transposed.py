"""Per-row (Wanda) masks of ``in x out`` weights (Hugging Face ``Conv1D``): compared within each output unit, a column
of the stored matrix, exactly as the same layer stored ``out x in`` as an ``nn.Linear`` (before this file only a
doctest held it; a mask computed along the stored rows passed every other test, since the layer's count stays
exact)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pat_callbacks.core.patterns import prune_count
from pat_callbacks.oneshot import one_shot_prune, row_mask, row_masks

torch.set_num_threads(1)


def test_row_masks_of_an_in_x_out_matrix_are_the_row_masks_of_its_transpose():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 5, generator=g)  # 12 inputs x 5 outputs: 0.5 of 12 per output, 30 of 60
    masks = row_masks({"t": scores, "w": scores.t().contiguous()}, {"t": 0.5, "w": 0.5}, transposed=["t"])
    assert torch.equal(masks["t"], masks["w"].t())
    assert ((~masks["t"]).sum(0) == 6).all()  # every output unit (a column) loses 6 of its 12 inputs
    assert not torch.equal(masks["t"], row_mask(scores, 0.5))  # not along the stored rows
    for out in range(5):  # within an output unit, every pruned score is below every kept one
        column, kept = scores[:, out], masks["t"][:, out]
        assert column[~kept].max() < column[kept].min()


def test_uneven_counts_go_to_the_output_units_where_one_more_costs_least():
    scores = torch.tensor([[1.0, 9.0, 9.5], [1.0, 2.0, 9.0], [1.0, 5.0, 9.0]]).t()  # in x out: units are columns
    mask = row_masks({"t": scores}, {"t": 0.45}, transposed=["t"])["t"]  # 4 of 9: unit 1 prunes one more
    assert mask.t().int().tolist() == [[0, 1, 1], [0, 0, 1], [0, 1, 1]]


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_per_row_prunes_a_conv1d_as_the_equal_linear(sparsity):
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(6, 10), nn.ReLU(), Conv1D(4, 6))  # Conv1D(nf=out, nx=in): weight in x out
    linear = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
            lin.weight.copy_(c.weight.t())
            lin.bias.copy_(c.bias)
    batches = [torch.randn(32, 10) * torch.linspace(0.1, 5, 10)]  # uneven input norms: not magnitude's masks
    one_shot_prune(conv, "wanda", sparsity, calibration=batches, per_row=True)
    one_shot_prune(linear, "wanda", sparsity, calibration=batches, per_row=True)
    for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
        assert torch.equal(c.weight == 0, (lin.weight == 0).t())
        assert int((c.weight == 0).sum()) == prune_count(c.weight.numel(), sparsity)
    assert set((conv[0].weight == 0).sum(0).tolist()) == {round(sparsity * 10)}  # per output unit, 10 inputs each
