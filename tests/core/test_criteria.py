import pytest
import torch

from pat_callbacks.core.criteria import (
    CRITERIA,
    Criterion,
    FisherCriterion,
    MagnitudeCriterion,
    MovementCriterion,
    RandomCriterion,
    TaylorCriterion,
    get_criterion,
)

# Three optimizer steps of a 3-weight parameter: weights and gradients written out by hand.
WEIGHTS = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.5, -1.0, 0.5]), torch.tensor([2.0, -0.5, 0.25])]
GRADS = [torch.tensor([-1.0, 1.0, 0.0]), torch.tensor([-0.5, 2.0, 1.0]), torch.tensor([1.0, -1.0, 2.0])]


def _accumulated(criterion: Criterion) -> dict:
    state: dict = {}
    for w, g in zip(WEIGHTS, GRADS, strict=True):
        criterion.accumulate(w, g, state)
    return state


def test_magnitude_matches_reference():
    w = torch.tensor([[-2.0, 0.0], [0.5, 3.0]])
    assert torch.equal(MagnitudeCriterion().score(w, None, {}), torch.tensor([[2.0, 0.0], [0.5, 3.0]]))


def test_taylor_is_the_mean_of_abs_w_times_g_over_the_steps():
    state = _accumulated(TaylorCriterion())
    # |w*g| per step: [1, 2, 0], [0.75, 2, 0.5], [2, 0.5, 0.5] -> mean
    expected = torch.tensor([(1 + 0.75 + 2) / 3, (2 + 2 + 0.5) / 3, (0 + 0.5 + 0.5) / 3])
    assert torch.allclose(TaylorCriterion().score(WEIGHTS[-1], GRADS[-1], state), expected)


def test_movement_is_minus_the_sum_of_w_times_g():
    state = _accumulated(MovementCriterion())
    # -w*g per step: [1, 2, 0], [0.75, 2, -0.5], [-2, -0.5, -0.5]
    expected = torch.tensor([1 + 0.75 - 2, 2 + 2 - 0.5, 0 - 0.5 - 0.5])
    assert torch.allclose(MovementCriterion().score(WEIGHTS[-1], None, state), expected)


def test_fisher_sums_every_squared_gradient_not_just_the_last():
    state = _accumulated(FisherCriterion())
    assert torch.allclose(state["sum_sq_grad"], torch.tensor([1 + 0.25 + 1, 1 + 4 + 1, 0 + 1 + 4]))
    mean_sq = torch.tensor([2.25, 6.0, 5.0]) / 3
    expected = 0.5 * WEIGHTS[-1] ** 2 * mean_sq
    assert torch.allclose(FisherCriterion().score(WEIGHTS[-1], None, state), expected)


def test_reset_forgets_history_for_since_last_update_criteria():
    criterion = TaylorCriterion()
    state = _accumulated(criterion)
    criterion.reset(state)
    criterion.accumulate(WEIGHTS[0], GRADS[0], state)
    assert torch.allclose(criterion.score(WEIGHTS[0], None, state), torch.tensor([1.0, 2.0, 0.0]))
    assert TaylorCriterion.resets_after_update and FisherCriterion.resets_after_update
    assert not MovementCriterion.resets_after_update


def test_random_is_seeded_and_keeps_zero_weights_lowest():
    w = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0])
    first = RandomCriterion(seed=3).score(w, None, {})
    assert torch.equal(first, RandomCriterion(seed=3).score(w, None, {}))
    assert (first[w == 0] == 0).all() and (first[w != 0] > 0).all()
    criterion = RandomCriterion(seed=3)
    criterion.score(w, None, {})
    saved = criterion.state_dict()
    following = criterion.score(w, None, {})
    restored = RandomCriterion(seed=0)
    restored.load_state_dict(saved)
    assert torch.equal(restored.score(w, None, {}), following)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_criterion_contract(name):
    criterion = get_criterion(name)
    assert isinstance(criterion, Criterion) and criterion.name == name
    w = torch.randn(3, 4, requires_grad=True)
    state: dict = {}
    if criterion.needs_history:
        criterion.accumulate(w, torch.randn(3, 4), state)
    scores = criterion.score(w, torch.randn(3, 4), state)
    assert scores.shape == w.shape and not scores.requires_grad
    assert criterion.needs_grad == (name in ("taylor", "movement", "fisher"))


def test_unknown_criterion_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown `criterion` 'l3'; expected one of: 'fisher', 'magnitude'"):
        get_criterion("l3")
