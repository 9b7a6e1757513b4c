"""Structured importances: vectorised over channels, equal to a naive per-channel reference; a registry of classes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bench.export import ResidualCNN
from pat_callbacks.structured import (
    STRUCTURED_IMPORTANCES,
    StructuredPruner,
    channel_groups,
    channel_masks,
    channel_scores,
    get_structured_importance,
    head_groups,
    shrink,
)


def _reference(group, params, importance, grads):
    """The naive form: a Python loop over channels and slices."""
    scores = []
    for channel in group.gates() if importance == "gate" else group.slices:
        total = torch.zeros(())
        for name, dim, index in channel:
            values = params[name].detach().index_select(dim, index)
            if importance == "l1":
                total += values.abs().sum()
            elif importance == "l2":
                total += values.square().sum()
            else:
                total += (values * grads[name].index_select(dim, index)).sum()
        scores.append(total)
    stacked = torch.stack(scores)
    return {"l1": stacked, "l2": stacked.sqrt(), "group_taylor": stacked.square(), "gate": stacked.abs()}[importance]


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.view(-1, 8, 8))
        return self.fc(self.attn(tokens, tokens, tokens, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("importance", sorted(STRUCTURED_IMPORTANCES))
def test_vectorised_importances_equal_the_per_channel_reference(importance):
    torch.manual_seed(0)
    cnn, attention = ResidualCNN(width=8), AttentionNet()
    nn.functional.cross_entropy(cnn(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))).backward()
    nn.functional.cross_entropy(attention(torch.randn(4, 64)), torch.randint(0, 10, (4,))).backward()
    cases = [
        (cnn, channel_groups(cnn.eval(), torch.randn(1, 3, 16, 16), ignore=["head.weight"])),
        (attention, head_groups(attention)),
    ]
    for model, groups in cases:
        params = dict(model.named_parameters())
        grads = {name: p.grad for name, p in params.items()}
        for group in groups:
            got = channel_scores(group, params, importance, grads)
            assert got.shape == (group.n_channels,)
            assert torch.allclose(got, _reference(group, params, importance, grads), rtol=1e-5, atol=1e-7)


def test_masks_follow_the_pruned_channels_through_every_coupling():
    torch.manual_seed(0)
    model = ResidualCNN(width=8).eval()
    params = dict(model.named_parameters())
    groups = channel_groups(model, torch.randn(1, 3, 16, 16), ignore=["head.weight"])
    pruned = {g.root: torch.arange(g.n_channels) % 3 == 0 for g in groups}
    masks = channel_masks(groups, pruned, params)
    for group in groups:
        for channel, slices in enumerate(group.slices):
            for name, dim, index in slices:
                selected = masks[name].index_select(dim, index)
                assert bool((~selected).all()) if pruned[group.root][channel] else bool(selected.any()), (name, channel)


def test_group_taylor_is_not_the_unstructured_taylor_and_the_old_name_warns():
    assert "taylor" not in STRUCTURED_IMPORTANCES
    with pytest.warns(DeprecationWarning, match="now called 'group_taylor'"):
        assert get_structured_importance("taylor").name == "group_taylor"


def test_structured_pruner_runs_in_a_plain_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    pruner = StructuredPruner(model, torch.zeros(1, 8), importance="gate")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for step in range(12):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step in (4, 8):
            assert pruner.prune_to(0.25 * step / 4, optimizers=[optimizer], step=step)
        pruner.mask_grads()
        optimizer.step()
    channels = pruner.pruned_channels()
    assert {root: len(c) for root, c in channels.items()} == {"0.weight": 8, "2.weight": 8}  # classifier kept
    assert (model[0].weight[channels["0.weight"]] == 0).all() and (model[2].weight[:, channels["0.weight"]] == 0).all()
    assert (model[2].weight[channels["2.weight"]] == 0).all() and (model[4].weight[:, channels["2.weight"]] == 0).all()


def test_a_structured_pruner_has_no_single_weight_regrowth():
    """Regrowing single weights would leave channels partly zero: StructuredPruner shares masks, not regrow()."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = StructuredPruner(model, torch.zeros(1, 4))
    assert pruner.prune_to(0.5)
    assert not hasattr(pruner, "regrow")
    assert set(pruner.pruned_channels()) == {"0.weight"}
    assert len(pruner.pruned_channels()["0.weight"]) == 3


class _Wrapper(nn.Module):
    """What a LightningModule is to its network: the names of the weights gain a ``net.`` prefix."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_shrink_takes_the_names_of_the_module_around_the_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    pruner = StructuredPruner(_Wrapper(net), x[:1], criterion="l1")
    assert pruner.prune_to(0.5)
    pruned = pruner.pruned_channels()
    assert set(pruned) == {"net.0.weight"}  # named from the wrapper, as pruned_channels() of a callback are
    expected = net(x)
    small = shrink(net, x[:1], pruned)  # the inner network: the prefix is dropped (was KeyError 'net.0.weight')
    assert small[0].out_features == 3 and torch.allclose(small(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"'net\.9\.weight' is no parameter of Sequential"):
        shrink(net, x[:1], {"net.9.weight": [0]})


def test_the_criterion_is_stored_as_criterion_and_an_unknown_one_is_refused_by_its_name():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = StructuredPruner(model, torch.zeros(1, 4), criterion="l1")
    assert pruner.criterion.name == "l1" and pruner.scorer_name == "l1"
    valid = ", ".join(repr(name) for name in sorted(STRUCTURED_IMPORTANCES))
    with pytest.raises(ValueError, match=re.escape(f"Unknown `criterion` 'l3'; expected one of: {valid}")):
        StructuredPruner(model, torch.zeros(1, 4), criterion="l3")
    with pytest.raises(ValueError, match=r"Unknown `criterion` 'l3'"):
        StructuredPruner(model, torch.zeros(1, 4), importance="l3")  # the former keyword too
    with pytest.warns(DeprecationWarning, match="`importance` is now called `criterion`"):
        old = StructuredPruner(model, torch.zeros(1, 4), importance="gate")
    assert old.criterion.name == "gate"


def test_final_sparsity_is_refused_by_name_not_ignored():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = StructuredPruner(model, torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"takes no `final_sparsity` \(got 0.8\)"):
        pruner.prune_to(0.5, final_sparsity=0.8)
    assert not pruner.masks  # nothing pruned
    assert pruner.prune_to(0.5) and len(pruner.pruned_channels()["0.weight"]) == 3
