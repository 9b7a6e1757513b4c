import pytest
import torch

from pat_callbacks.allocation import allocate
from pat_callbacks.patterns import prune_count


def _scores():
    torch.manual_seed(0)
    return {"small": torch.rand(10, 5) * 0.1, "large": torch.rand(20, 30), "mid": torch.rand(8, 8)}


def test_uniform_gives_each_layer_the_target():
    assert allocate("uniform", _scores(), 0.7) == {"small": 0.7, "large": 0.7, "mid": 0.7}


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_global_threshold_hits_the_overall_target_exactly(target):
    scores = _scores()
    sparsities = allocate("global", scores, target)
    total = sum(s.numel() for s in scores.values())
    pruned = sum(prune_count(scores[n].numel(), s) for n, s in sparsities.items())
    assert pruned == prune_count(total, target)
    # One threshold: nothing kept in any layer scores below anything pruned elsewhere.
    everything = torch.cat([s.flatten() for s in scores.values()])
    assert pruned == 0 or everything.sort().values[pruned - 1] <= everything.sort().values[pruned]
    if target == 0.5:
        assert sparsities["small"] == 1.0  # all its scores are below the others'


def test_global_assigns_ties_exactly():
    scores = {"a": torch.zeros(4), "b": torch.zeros(4)}
    assert allocate("global", scores, 0.25) == {"a": 0.5, "b": 0.0}


def test_unknown_allocation_is_refused():
    with pytest.raises(ValueError, match="Unknown `allocation` 'erk2'; expected one of: 'global', 'uniform'"):
        allocate("erk2", _scores(), 0.5)
