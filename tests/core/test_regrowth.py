import math

import pytest
import torch

from pat_callbacks.core import regrowth as regrowth_module
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.core.regrowth import drop_and_grow, regrow_in_place, swapped_entries, update_fraction


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_update_fraction_is_zero_after_the_end(decay):
    assert update_fraction(100, 0.3, 100, decay) == 0.0
    assert update_fraction(500, 0.3, 100, decay) == 0.0


def test_cosine_decay_matches_the_formula():
    for t in (0, 25, 50, 75, 100):
        expected = 0.3 / 2 * (1 + math.cos(math.pi * t / 100)) if t < 100 else 0.0
        assert update_fraction(t, 0.3, 100, "cosine") == pytest.approx(expected)
    assert update_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert update_fraction(50, 0.3, 100) == pytest.approx(0.15)


def test_rigl_drops_lowest_active_magnitudes_and_grows_top_gradients():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    weight = torch.tensor([0.5, -0.1, 0.3, -0.05, 0.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.1, -0.8, 0.3, 0.7])  # active grads must not matter
    new = drop_and_grow(mask, weight, grad, fraction=0.5, regrowth="rigl")
    assert new.tolist() == [True, False, True, False, False, True, False, True]


def test_set_grows_only_among_previously_inactive_entries():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = torch.rand(50) > 0.7
        weight = torch.randn(50) * mask
        new = drop_and_grow(mask, weight, None, fraction=0.4, regrowth="set", generator=generator)
        grown = new & ~mask
        dropped = mask & ~new
        assert int(new.sum()) == int(mask.sum())  # sparsity constant
        assert int(grown.sum()) == int(dropped.sum()) == round(0.4 * int(mask.sum()))
        assert not (grown & mask).any()  # grown only where inactive before
        kept_active = mask & new
        if dropped.any() and kept_active.any():  # dropped are the lowest |w| of the active ones
            assert weight.abs()[dropped].max() <= weight.abs()[kept_active].min()


def test_set_is_reproducible_with_a_seeded_generator():
    mask = torch.rand(100, generator=torch.Generator().manual_seed(0)) > 0.8
    weight = torch.randn(100, generator=torch.Generator().manual_seed(1)) * mask
    first = drop_and_grow(mask, weight, None, 0.3, "set", torch.Generator().manual_seed(5))
    second = drop_and_grow(mask, weight, None, 0.3, "set", torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_rigl_without_gradient_is_refused():
    with pytest.raises(ValueError, match="regrowth='rigl' needs the dense gradient"):
        drop_and_grow(torch.ones(4, dtype=torch.bool), torch.ones(4), None, 0.5, "rigl")


def _two_selections(monkeypatch):
    """Force the former path: a drop selection and a grow selection (what sharded layers still take)."""
    monkeypatch.setattr(regrowth_module, "_ONE_SELECTION_LIMIT", 0)


@pytest.mark.parametrize("regrowth", ["rigl", "set"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.8])
def test_one_selection_swaps_the_same_entries_as_two(monkeypatch, regrowth, density):
    generator = torch.Generator().manual_seed(0)
    for trial in range(5):
        mask = torch.rand(64, 37, generator=generator) < density
        weight = torch.randn(64, 37, generator=generator).round(decimals=1) * mask  # ties in |w|
        grad = torch.randn(64, 37, generator=generator).round(decimals=1)  # ties in |g|, zeros too
        grad[:, :3] = 0.0
        for fraction in (0.0, 0.1, 0.3, 1.0):
            one = swapped_entries(mask, weight, grad, fraction, regrowth, torch.Generator().manual_seed(trial))
            with monkeypatch.context() as patched:
                _two_selections(patched)
                two = swapped_entries(mask, weight, grad, fraction, regrowth, torch.Generator().manual_seed(trial))
            assert torch.equal(one, two), (trial, fraction)


def test_rigl_on_a_fixed_seed_gives_the_same_masks_as_two_selections(monkeypatch):
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5))
        pruner = Pruner(model)
        pruner.prune_to(0.8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
        for step in range(30):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step % 5 == 4:
                pruner.regrow(0.3, "rigl", optimizers=[optimizer])
            pruner.mask_grads()
            optimizer.step()
        return {name: mask.clone() for name, mask in pruner.masks.items()}

    one = run()
    with monkeypatch.context() as patched:
        _two_selections(patched)
        two = run()
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_rigl_makes_one_selection_per_layer(monkeypatch):
    calls = []
    original = regrowth_module._one_selection
    monkeypatch.setattr(regrowth_module, "_one_selection", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(regrowth_module, "select_lowest_kept", lambda *a: pytest.fail("a second selection"))
    layer = torch.nn.Linear(8, 8)
    layer.weight.grad = torch.randn(8, 8)
    masked = MaskStore({"weight": layer.weight})
    masked.set_masks({"weight": torch.arange(64).view(8, 8) % 3 == 0})
    regrow_in_place(masked, 0.5, "rigl")
    assert len(calls) == 1


def test_method_is_the_former_name_of_regrowth():
    mask = torch.tensor([True, True, False, False])
    weight, grad = torch.tensor([0.9, 0.1, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.2, 0.7])
    with pytest.warns(DeprecationWarning, match="`method` is now called `regrowth`"):
        assert drop_and_grow(mask, weight, grad, 0.5, method="rigl").tolist() == [True, False, False, True]
    with pytest.warns(DeprecationWarning, match="`method` is now called `regrowth`"):
        swapped_entries(mask, weight, grad, 0.5, method="set", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Unknown `method` 'snip'"), pytest.warns(DeprecationWarning):
        swapped_entries(mask, weight, grad, 0.5, method="snip")
    pruner = Pruner(torch.nn.Linear(4, 4))
    pruner.prune_to(0.5)
    with pytest.warns(DeprecationWarning, match="`method` is now called `regrowth`"):
        metrics = pruner.regrow(0.25, method="set", generator=torch.Generator().manual_seed(0))
    assert metrics is not None and metrics["pruning/regrown"] == 2.0
    with pytest.raises(ValueError, match="Unknown `regrowth` 'snip'"):
        pruner.regrow(0.25, "snip")
