import pytest
import torch

from pat_callbacks.criteria import CRITERIA, Criterion, MagnitudeCriterion, get_criterion


def test_magnitude_matches_reference():
    w = torch.tensor([[-2.0, 0.0], [0.5, 3.0]])
    assert torch.equal(MagnitudeCriterion().score(w, None, {}), torch.tensor([[2.0, 0.0], [0.5, 3.0]]))


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_criterion_contract(name):
    criterion = get_criterion(name)
    assert isinstance(criterion, Criterion) and criterion.name == name
    w = torch.randn(3, 4, requires_grad=True)
    scores = criterion.score(w, torch.randn(3, 4), {})
    assert scores.shape == w.shape and not scores.requires_grad


def test_unknown_criterion_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown `criterion` 'l3'; expected one of: 'magnitude'"):
        get_criterion("l3")
