"""SparseGPT at its edges: input columns that never fire (pruned first, as the reference code does), a second call
with the first call's mask (masks nest, counts exact), and a sparsity that would empty a layer (one weight kept,
warned, as magnitude does)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pat_callbacks.core.patterns import prune_count
from pat_callbacks.oneshot import one_shot_prune, sparsegpt_prune
from tests.oneshot.test_sparsegpt_reference import _inputs, _obs_reference

torch.set_num_threads(1)

DEAD = torch.tensor([1, 5, 9, 14])  # one dead input in every group of 4


def _dead_layer(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 64 x 16 layer whose inputs 1, 5, 9 and 14 are always zero (``H_jj = 0``); ``scale`` sizes the others."""
    x = _inputs(256, 16) * scale
    x[:, DEAD] = 0.0
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), x


def _error(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    """Squared reconstruction error of the layer's outputs on the calibration inputs."""
    return float((x.double() @ (w.double() - new.double()).t()).square().sum())


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_dead_input_weights_are_pruned_first_and_the_error_is_no_worse_than_plain_obs(scale):
    """With small activations the damped diagonal made dead inputs outrank live weights (205 of 256 kept at 0.01,
    8.4x the OBS error); with zero saliency every dead weight goes first and the error is at most OBS's."""
    w, x = _dead_layer(scale)
    new, mask = sparsegpt_prune(w, x.t() @ x, 0.5)
    assert int((~mask).sum()) == prune_count(w.numel(), 0.5)
    assert not mask[:, DEAD].any()  # 256 dead weights, 512 pruned: all of them
    assert (new[~mask] == 0).all()
    reference, _ = _obs_reference(w, x, sparsity=0.5)
    assert _error(w, new, x) <= _error(w, reference, x)


def test_dead_input_weights_go_first_in_every_n_m_group():
    w, x = _dead_layer(0.01)
    _, mask = sparsegpt_prune(w, x.t() @ x, 0.0, nm=(2, 4), block_size=8)
    assert not mask[:, DEAD].any()
    assert mask.view(64, 4, 4).sum(-1).eq(2).all()


def test_dead_input_weights_the_count_leaves_keep_their_values():
    """A count below the dead entries prunes only dead ones (in index order); the rest keep their values (their
    column of ``H^-1`` is decoupled, no update reaches them) and every live weight is kept."""
    w, x = _dead_layer(0.01)
    new, mask = sparsegpt_prune(w, x.t() @ x, 0.1, block_size=8)  # 102 of the 256 dead weights
    pruned = ~mask
    assert int(pruned.sum()) == prune_count(w.numel(), 0.1)
    live = torch.ones(16, dtype=torch.bool)
    live[DEAD] = False
    assert mask[:, live].all()
    kept_dead = mask & ~live.view(1, -1)
    assert torch.equal(new[kept_dead], w[kept_dead])
    assert torch.equal(new == 0, pruned)  # the zeros are exactly the mask


def test_a_second_call_with_the_first_mask_nests_and_counts_exactly():
    """Blocks of 8: the OBS updates of earlier blocks make first-call zeros nonzero before a later block is chosen;
    without ``keep`` some of them are kept (revived), with it every one stays pruned and exactly zero."""
    w, x = _inputs(64, 32, seed=7)[:24], _inputs(512, 32, seed=8)
    hessian = x.t() @ x
    first, first_mask = sparsegpt_prune(w, hessian, 0.5, block_size=8)
    revived = 0
    for sparsity in (0.55, 0.6, 0.7):
        _, loose_mask = sparsegpt_prune(first, hessian, sparsity, block_size=8)
        revived += int((loose_mask & ~first_mask).sum())
        second, mask = sparsegpt_prune(first, hessian, sparsity, block_size=8, keep=first_mask)
        assert not mask[~first_mask].any()
        assert (second[~first_mask] == 0).all()
        assert int((~mask).sum()) == prune_count(w.numel(), sparsity)
        assert torch.equal(second == 0, ~mask)
    assert revived > 0  # what `keep` prevents


def test_a_lower_sparsity_than_the_first_mask_prunes_just_that_mask():
    w, x = _inputs(16, 32, seed=2), _inputs(256, 32, seed=3)
    first, first_mask = sparsegpt_prune(w, x.t() @ x, 0.5, block_size=8)
    second, mask = sparsegpt_prune(first, x.t() @ x, 0.2, block_size=8, keep=first_mask)
    assert torch.equal(mask, first_mask)
    assert torch.equal(second == 0, ~mask)


def test_keep_must_match_the_weight():
    with pytest.raises(ValueError, match=r"`keep` of shape \(2, 4\), but got \(4, 2\)"):
        sparsegpt_prune(torch.ones(2, 4), torch.eye(4), 0.5, keep=torch.ones(4, 2, dtype=torch.bool))


def test_one_shot_prune_again_with_the_pruner_nests_the_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    calibration = [torch.randn(128, 64) for _ in range(2)]
    first = one_shot_prune(model, "sparsegpt", 0.5, calibration=calibration, block_size=8)
    zeros = {name: (p.detach() == 0).clone() for name, p in first.pruner.params.items()}
    second = one_shot_prune(model, "sparsegpt", 0.8, calibration=calibration, block_size=8, pruner=first.pruner)
    for name, p in second.pruner.params.items():
        assert (p.detach()[zeros[name]] == 0).all(), name
        assert not second.pruner.masks[name][zeros[name]].any(), name
        assert int((~second.pruner.masks[name]).sum()) == prune_count(p.numel(), 0.8), name
        assert torch.equal(p.detach() == 0, ~second.pruner.masks[name]), name


def test_a_sparsity_that_would_empty_the_layer_keeps_one_weight():
    x, w = _inputs(64, 16), torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.999, 1.0):
        new, mask = sparsegpt_prune(w, x.t() @ x, sparsity)
        assert int(mask.sum()) == 1
        assert int((new != 0).sum()) == 1


def test_one_shot_prune_at_0_999_keeps_one_weight_per_layer_and_warns_like_magnitude():
    warned = {}
    for method in ("magnitude", "sparsegpt"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = one_shot_prune(model, method, 0.999, calibration=[torch.randn(32, 16)])
        assert {name: int(m.sum()) for name, m in result.pruner.masks.items()} == {"0.weight": 1, "2.weight": 1}
        assert [int((p != 0).sum()) for p in (model[0].weight, model[2].weight)] == [1, 1]
        warned[method] = [str(w.message).split(": ", 1)[1] for w in caught if "over 0.99" in str(w.message)]
    # the same words (0.weight: 127 of 128 pruned; 2.weight: 31 of 32 = 0.97 is not past 0.99)
    assert warned["sparsegpt"] == warned["magnitude"]
    assert len(warned["magnitude"]) == 1 and "'0.weight' is pruned to 0.9922" in warned["magnitude"][0]
