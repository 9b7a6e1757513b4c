import math

import pytest
import torch

from pat_callbacks.core.regrowth import drop_and_grow, update_fraction


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
    new = drop_and_grow(mask, weight, grad, fraction=0.5, method="rigl")
    assert new.tolist() == [True, False, True, False, False, True, False, True]


def test_set_grows_only_among_previously_inactive_entries():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = torch.rand(50) > 0.7
        weight = torch.randn(50) * mask
        new = drop_and_grow(mask, weight, None, fraction=0.4, method="set", generator=generator)
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
    with pytest.raises(ValueError, match="method='rigl' needs the dense gradient"):
        drop_and_grow(torch.ones(4, dtype=torch.bool), torch.ones(4), None, 0.5, "rigl")
