import pytest
import torch
from torch import nn

from pat_callbacks.core.masks import MaskStore


def _store(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return model, MaskStore({"0.weight": model[0].weight, "2.weight": model[2].weight})


def _stepped(model, optimizer):
    """``optimizer`` after one step on ``model``: every parameter has optimizer state."""
    model(torch.randn(4, 6)).pow(2).sum().backward()
    optimizer.step()
    return optimizer


def test_masks_are_bool_and_weights_zeroed_in_place():
    model, store = _store()
    weight = model[0].weight
    before = weight.detach().clone()
    ptr = weight.data_ptr()
    mask = torch.rand(5, 6) > 0.5
    store.set_masks({"0.weight": mask})
    store.apply()
    assert store.masks["0.weight"].dtype == torch.bool
    assert weight.data_ptr() == ptr  # no copy, no reparametrisation
    assert torch.equal(weight.detach(), before * mask)
    assert not hasattr(model[0], "weight_orig") and not model[0]._forward_pre_hooks
    assert store.layer_sparsity()["2.weight"] == 0.0


def test_set_masks_reports_newly_pruned_entries():
    _, store = _store()
    first = torch.tensor([[True] * 6, [False] * 6, [True] * 6, [True] * 6, [True] * 6])
    newly = store.set_masks({"0.weight": first})["0.weight"]
    assert torch.equal(newly, ~first)
    second = first.clone()
    second[0, :3] = False
    second[1, 0] = True  # regrown: not newly pruned
    newly = store.set_masks({"0.weight": second})["0.weight"]
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[0, :3] = True
    assert torch.equal(newly, expected)


def test_mask_grads_zeroes_only_pruned_gradients():
    model, store = _store()
    model(torch.randn(4, 6)).sum().backward()
    grad = model[0].weight.grad.clone()
    mask = torch.rand(5, 6) > 0.3
    store.set_masks({"0.weight": mask})
    store.mask_grads()
    assert torch.equal(model[0].weight.grad, grad * mask)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
    ],
)
def test_reset_optimizer_state_zeroes_every_state_tensor_of_pruned_entries(make_optimizer):
    model, store = _store()
    optimizer = make_optimizer(model.parameters())
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()
    mask = torch.rand(5, 6) > 0.5
    newly = store.set_masks({"0.weight": mask})
    assert store.reset_optimizer_state([optimizer], newly) >= 1
    for value in optimizer.state[model[0].weight].values():
        if torch.is_tensor(value) and value.shape == mask.shape:
            assert (value[~mask] == 0).all()
            assert (value[mask] != 0).any()


def test_sparsity_and_state_dict_round_trip():
    _model, store = _store()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0] = False
    store.set_masks({"2.weight": mask})
    assert store.layer_sparsity() == {"0.weight": 0.0, "2.weight": pytest.approx(1 / 3)}
    assert store.sparsity() == pytest.approx(5 / 45)
    state = store.state_dict()
    _, other = _store(seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.masks["2.weight"], mask)
    other.clear()
    assert not other.is_active and other.sparsity() == 0.0


def test_bad_masks_are_refused():
    _, store = _store()
    with pytest.raises(ValueError, match=r"Mask for '0.weight' has shape \(2,\), expected \(5, 6\)"):
        store.set_masks({"0.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'nope' is not a maskable parameter"):
        store.set_masks({"nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not pruned parameters of this model"):
        store.load_state_dict({"masks": {"other.weight": torch.ones(1, dtype=torch.bool)}})


def test_pruned_weights_are_positive_zeros_so_exports_store_no_signs():
    weight = torch.nn.Parameter(torch.tensor([-1.5, 2.0, -3.0, 4.0]))
    store = MaskStore({"w": weight})
    store.set_masks({"w": torch.tensor([False, True, False, True])})
    store.apply()
    assert weight.tolist() == [0.0, 2.0, 0.0, 4.0]
    assert not bool(torch.signbit(weight.detach()[[0, 2]]).any())  # +0.0, not -0.0


def test_prune_shrinks_masks_in_place_zeroes_weights_and_resets_optimizer_state():
    model, store = _store()
    optimizer = _stepped(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    first = torch.zeros(5, 6, dtype=torch.bool)
    first[0] = True
    store.prune({"0.weight": first}, optimizers=[optimizer])
    mask = store.masks["0.weight"]
    second = torch.zeros(5, 6, dtype=torch.bool)
    second[1, :2] = True
    store.prune({"0.weight": second}, optimizers=[optimizer])
    assert store.masks["0.weight"] is mask  # shrunk where it lies
    assert torch.equal(mask, ~(first | second))
    assert (model[0].weight[~mask] == 0).all() and (model[0].weight[mask] != 0).all()
    assert torch.equal(store.last_changed["0.weight"], second)  # only this update's entries
    assert (optimizer.state[model[0].weight]["momentum_buffer"][~mask] == 0).all()
    assert store.sparsity() == pytest.approx(8 / 45)


def test_flip_swaps_entries_keeps_the_count_and_zeroes_the_optimizer_state_of_both_sides():
    model, store = _store()
    optimizer = _stepped(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    keep = torch.ones(5, 6, dtype=torch.bool)
    keep[0] = False
    store.set_masks({"0.weight": keep})
    swapped = torch.zeros(5, 6, dtype=torch.bool)
    swapped[0, 0] = swapped[1, 0] = True  # regrow one, drop one
    agreed = store.flip({"0.weight": swapped}, optimizers=[optimizer])
    assert torch.equal(agreed["0.weight"], swapped)
    assert int(store.masks["0.weight"].sum()) == int(keep.sum())
    assert bool(store.masks["0.weight"][0, 0]) and not bool(store.masks["0.weight"][1, 0])
    assert model[0].weight[1, 0].item() == 0
    assert (optimizer.state[model[0].weight]["momentum_buffer"][swapped] == 0).all()
    with pytest.raises(ValueError, match=r"Cannot flip '2\.weight': it has no mask"):
        store.flip({"2.weight": torch.zeros(3, 5, dtype=torch.bool)})


def test_set_masks_commits_and_reset_adds_regrown_entries():
    model, store = _store()
    optimizer = _stepped(model, torch.optim.Adam(model.parameters(), lr=0.1))
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    regrown = torch.zeros(5, 6, dtype=torch.bool)
    regrown[mask] = True
    store.set_masks({"0.weight": mask}, reset={"0.weight": regrown}, optimizers=[optimizer])
    assert torch.equal(model[0].weight.detach() == 0, ~mask)  # no separate apply() needed
    assert torch.equal(store.last_changed["0.weight"], torch.ones(5, 6, dtype=torch.bool))
    assert (optimizer.state[model[0].weight]["exp_avg"] == 0).all()


def test_state_dict_keeps_its_keys_and_a_state_without_a_target_loads():
    _, store = _store()
    store.target_sparsity = 0.25
    store.set_masks({"0.weight": torch.rand(5, 6) > 0.5})
    state = store.state_dict()
    assert set(state) == {"target_sparsity", "masks"} and state["masks"]["0.weight"].dtype == torch.bool
    _, other = _store(seed=1)
    other.load_state_dict(state)
    assert other.target_sparsity == 0.25 and torch.equal(other.masks["0.weight"], state["masks"]["0.weight"])
    _, old = _store(seed=1)
    old.load_state_dict({"masks": state["masks"]})  # what a MaskStore of before saved: its sparsity is the target
    assert old.target_sparsity == pytest.approx(old.sparsity())
