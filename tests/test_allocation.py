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
    with pytest.raises(
        ValueError, match="Unknown `allocation` 'erk2'; expected one of: 'er', 'erk', 'global', 'uniform'"
    ):
        allocate("erk2", _scores(), 0.5)


def test_erk_matches_the_formula_and_the_global_target():
    shapes = {"conv1": (25, 1, 5), "conv2": (25, 25, 3), "conv3": (25, 25, 3), "fc": (10, 125)}
    scores = {name: torch.zeros(shape) for name, shape in shapes.items()}
    target = 0.9
    sparsities = allocate("erk", scores, target)
    numel = {name: s.numel() for name, s in scores.items()}
    total = sum(numel.values())
    kept = {name: numel[name] - prune_count(numel[name], sparsities[name]) for name in shapes}
    assert sum(kept.values()) == total - prune_count(total, target)  # global target, to the weight
    raw = {name: sum(shape) / torch.tensor(shape).prod().item() for name, shape in shapes.items()}
    dense = {name for name, s in sparsities.items() if s == 0.0}
    sparse = [name for name in shapes if name not in dense]
    # density proportional to (sum of dims) / (product of dims), within one weight per layer
    epsilon = (sum(kept[n] for n in sparse)) / sum(raw[n] * numel[n] for n in sparse)
    for name in sparse:
        assert abs(kept[name] - epsilon * raw[name] * numel[name]) <= 1.0
    assert sparsities["conv1"] < sparsities["conv2"]  # the small first layer keeps more


def test_erk_keeps_layers_dense_when_they_would_exceed_density_one():
    scores = {"tiny": torch.zeros(2, 2), "big": torch.zeros(100, 100)}
    sparsities = allocate("erk", scores, 0.5)
    assert sparsities["tiny"] == 0.0
    total = 4 + 10_000
    assert 4 + (10_000 - prune_count(10_000, sparsities["big"])) == total - prune_count(total, 0.5)


def test_er_ignores_kernel_dimensions():
    scores = {"conv": torch.zeros(20, 10, 3, 3), "fc": torch.zeros(20, 10)}
    sparsities = allocate("er", scores, 0.8)
    assert sparsities["conv"] == pytest.approx(sparsities["fc"], abs=0.01)
