"""one_shot_prune: every method and pattern through a real transformer (nn.MultiheadAttention), zeros exact on the
weights, bad arguments refused at construction naming the value."""

from __future__ import annotations

import warnings

import pytest
import torch

from pat_callbacks.app.models import CharGPT
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.oneshot import OneShotOptions, one_shot_prune

torch.set_num_threads(1)


def _gpt() -> tuple[CharGPT, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = CharGPT(vocab_size=12, context=8, dim=16, layers=2, heads=2)
    batches = [torch.randint(0, 12, (4, 8)) for _ in range(2)]
    return net, batches


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(
    ("sparsity", "pattern", "owl"), [(0.5, "unstructured", False), (None, "2:4", False), (0.7, "unstructured", True)]
)
def test_every_method_leaves_exact_zeros_on_a_transformer(method, sparsity, pattern, owl):
    net, batches = _gpt()
    result = one_shot_prune(net, method, sparsity, pattern=pattern, owl=owl, calibration=batches)
    params = result.pruner.params
    assert sorted(params) == sorted(Pruner(net).params)  # attention in/out projections and MLP matrices
    zeros = sum(int((p == 0).sum()) for p in params.values())
    total = sum(p.numel() for p in params.values())
    assert zeros == round(result.sparsity * total)  # counted on the weights: the masks are the zeros
    assert result.sparsity == pytest.approx(sparsity or 0.5, abs=0.02)
    if pattern == "2:4":
        for name, p in params.items():
            assert ((p == 0).reshape(p.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert torch.isfinite(net(batches[0])).all()


def test_sequential_and_one_pass_agree_for_the_first_group_only():
    net_a, batches = _gpt()
    net_b, _ = _gpt()
    first = "blocks.0.mlp.0.weight"
    one_shot_prune(net_a, "wanda", 0.5, calibration=batches, sequential=True)
    one_shot_prune(net_b, "wanda", 0.5, calibration=batches, sequential=False)
    assert torch.equal(net_a.get_parameter(first) == 0, net_b.get_parameter(first) == 0)  # same dense inputs
    last = "blocks.1.mlp.2.weight"  # block 1 sees block 0 pruned in the sequential run only
    assert not torch.equal(net_a.get_parameter(last) == 0, net_b.get_parameter(last) == 0)


def test_an_existing_pruner_holds_the_masks_for_recovery():
    net, batches = _gpt()
    pruner = Pruner(net, pattern="2:4", exclude=["blocks.0.attn.*"])
    result = one_shot_prune(net, "sparsegpt", pattern="2:4", calibration=batches, pruner=pruner)
    assert result.pruner is pruner and "blocks.0.attn.in_proj_weight" not in pruner.masks
    assert bool((net.blocks[0].attn.in_proj_weight != 0).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "obs", "sparsity": 0.5}, "Unknown `method` 'obs'"),
        ({"method": "wanda", "sparsity": 1.5}, r"`sparsity` to be a float in \[0, 1\), but got 1.5"),
        ({"method": "wanda"}, "Expected `sparsity`"),
        ({"method": "wanda", "sparsity": 0.7, "pattern": "2:4"}, "reaches sparsity 0.5, but got sparsity=0.7"),
        ({"method": "wanda", "pattern": "2:4", "owl": True}, "owl=True sets a sparsity per layer"),
        ({"method": "wanda", "sparsity": 0.5, "pattern": "block:2x2"}, "pattern='block:2x2'"),
        ({"method": "wanda", "sparsity": 0.5, "owl_lambda": 0.6}, "`owl_lambda` in \\(0, 0.5\\), but got 0.6"),
        ({"method": "sparsegpt", "sparsity": 0.5, "damping": 0}, "`damping`"),
        ({"method": "wanda", "sparsity": 0.5, "allocation": "global"}, "not with per_row=True, sequential=True"),
        ({"method": "wanda", "sparsity": 0.5, "allocation": "sensitivity"}, "Unknown `allocation` 'sensitivity'"),
    ],
)
def test_bad_options_raise_at_construction_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneShotOptions(**kwargs)


def test_calibrated_methods_refuse_to_run_without_batches():
    net, _ = _gpt()
    with pytest.raises(ValueError, match="method='wanda' needs `calibration` batches"):
        one_shot_prune(net, "wanda", 0.5)
    assert not any(bool((p == 0).any()) for p in Pruner(net).params.values())  # nothing pruned


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_is_an_allocation_and_owl_true_gives_the_same_masks_and_weights(method):
    """The former flag and the allocation run the same code: the same masks and weights (and both the same as before
    the flag became an allocation: checked once against the previous commit, see the report of that change)."""
    results = []
    for kwargs in ({"allocation": "owl"}, {"owl": True}):
        net, batches = _gpt()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = one_shot_prune(net, method, 0.7, calibration=batches, owl_lambda=0.1, **kwargs)
        deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        assert deprecations == (
            ["`owl=True` is now `allocation='owl'`; the old form still works"] if "owl" in kwargs else []
        )
        results.append((result, net))
    (new, new_net), (old, old_net) = results
    assert new.options.allocation == old.options.allocation == "owl" and new.options.owl and old.options.owl
    assert new.options.name == old.options.name == f"{method}+owl" and new.passes == old.passes
    assert new.planned == old.planned and len(set(new.planned.values())) > 1  # OWL: not the same everywhere
    assert all(torch.equal(new.masks[n], old.masks[n]) for n in old.masks)
    new_state, old_state = new_net.state_dict(), old_net.state_dict()
    assert all(torch.equal(new_state[n], old_state[n]) for n in old_state)


def test_owl_true_with_another_allocation_names_both():
    with pytest.raises(ValueError, match="Give `allocation='owl'` \\(the new form of `owl=True`\\), not both"):
        OneShotOptions("wanda", 0.5, owl=True, allocation="erk")


def test_one_shot_methods_and_allocations_are_the_registries():
    from pat_callbacks.core.allocation import ALLOCATIONS
    from pat_callbacks.core.registry import Registry
    from pat_callbacks.oneshot import ONE_SHOT_METHODS, one_shot_allocations

    assert isinstance(ONE_SHOT_METHODS, Registry) and sorted(ONE_SHOT_METHODS) == ["magnitude", "sparsegpt", "wanda"]
    assert set(one_shot_allocations()) == set(ALLOCATIONS) - {"sensitivity"}
    with pytest.warns(DeprecationWarning, match="`ONE_SHOT_ALLOCATIONS` is now `one_shot_allocations\\(\\)`"):
        from pat_callbacks.oneshot import ONE_SHOT_ALLOCATIONS
    assert "owl" in ONE_SHOT_ALLOCATIONS


def test_a_shape_allocation_is_planned_up_front_for_every_method():
    """ERK splits by shapes alone, so it works a layer group at a time and with SparseGPT too."""
    from pat_callbacks.core.allocation import allocate

    net, batches = _gpt()
    result = one_shot_prune(net, "sparsegpt", 0.6, allocation="erk", calibration=batches)
    expected = allocate("erk", {n: p.detach() for n, p in result.pruner.params.items()}, 0.6)
    assert result.planned == expected and len(set(expected.values())) > 1
    for name, mask in result.masks.items():
        assert abs(1 - mask.float().mean().item() - expected[name]) < 1.0 / mask.numel() + 1e-6
