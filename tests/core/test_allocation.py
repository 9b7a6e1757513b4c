import pytest
import torch

from pat_callbacks.core.allocation import allocate, plan_sparsities
from pat_callbacks.core.patterns import prune_count, unstructured_mask


def _scores():
    torch.manual_seed(0)
    return {"small": torch.rand(10, 5) * 0.1, "large": torch.rand(20, 30), "mid": torch.rand(8, 8)}


def test_uniform_gives_each_layer_the_target():
    assert allocate("uniform", _scores(), 0.7) == {"small": 0.7, "large": 0.7, "mid": 0.7}


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_global_threshold_hits_the_overall_target_exactly(target):
    scores = _scores()
    sparsities = allocate("global_raw", scores, target)
    total = sum(s.numel() for s in scores.values())
    pruned = sum(prune_count(scores[n].numel(), s) for n, s in sparsities.items())
    assert pruned == prune_count(total, target)
    # One threshold: nothing kept in any layer scores below anything pruned in any layer.
    masks = {name: unstructured_mask(scores[name], sparsities[name]) for name in scores}
    kept = torch.cat([scores[name][masks[name]] for name in scores])
    dropped = torch.cat([scores[name][~masks[name]] for name in scores])
    assert dropped.numel() == pruned
    assert pruned == 0 or kept.numel() == 0 or float(dropped.max()) <= float(kept.min())
    if target == 0.5:
        assert sparsities["small"] == 1.0  # all its scores are below the others'


def test_global_assigns_ties_exactly():
    scores = {"a": torch.zeros(4), "b": torch.zeros(4)}
    assert allocate("global_raw", scores, 0.25) == {"a": 0.5, "b": 0.0}


def test_unknown_allocation_is_refused():
    with pytest.raises(
        ValueError,
        match=r"Unknown `allocation` 'erk2'; expected one of: 'er', 'erk', 'global', 'global_raw', 'owl', "
        r"'sensitivity', 'uniform'$",
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


def test_normalised_global_does_not_wipe_out_a_small_scale_layer():
    """Raw global magnitude prunes a layer whose weights are 100x smaller entirely; normalised global does not."""
    torch.manual_seed(0)
    scores = {"tiny_scale": torch.rand(40, 40) * 0.01, "large_scale": torch.rand(40, 40)}
    raw = allocate("global_raw", scores, 0.5)
    assert raw["tiny_scale"] > 0.95
    normalised = allocate("global", scores, 0.5)
    assert 0.3 < normalised["tiny_scale"] < 0.7
    pruned = sum(prune_count(1600, s) for s in normalised.values())
    assert pruned == prune_count(3200, 0.5)


@pytest.mark.parametrize("method", ["global", "global_raw"])
def test_global_honours_caps_and_keeps_the_total(method):
    torch.manual_seed(1)
    scores = {"a": torch.rand(30, 30) * 0.01, "b": torch.rand(30, 30), "c": torch.rand(10, 90) * 3}
    sparsities = allocate(method, scores, 0.6, min_sparsity=0.3, max_sparsity=0.8)
    assert all(0.3 - 1e-9 <= s <= 0.8 + 1e-9 for s in sparsities.values())
    pruned = sum(prune_count(900, s) for s in sparsities.values())
    assert pruned == prune_count(2700, 0.6)


def test_sensitivity_gives_the_less_sensitive_layer_more_sparsity_within_caps():
    numel = {"robust": 1000, "fragile": 1000, "middle": 500}
    sens = {"robust": 0.001, "fragile": 2.0, "middle": 0.5}
    sparsities = allocate(
        "sensitivity",
        {n: torch.zeros(k) for n, k in numel.items()},
        0.7,
        min_sparsity=0.2,
        max_sparsity=0.95,
        sensitivities=sens,
    )
    assert sparsities["robust"] > sparsities["middle"] > sparsities["fragile"]
    assert all(0.2 - 1e-9 <= s <= 0.95 + 1e-9 for s in sparsities.values())
    pruned = sum(prune_count(numel[n], s) for n, s in sparsities.items())
    assert pruned == prune_count(2500, 0.7)


def test_measure_sensitivity_finds_the_redundant_layer():
    """Layer `b` is a duplicate of `a` whose outputs are averaged: pruning one copy hurts less than pruning
    the layer everything goes through (`head`)."""
    from torch import nn

    from pat_callbacks.core.allocation import measure_sensitivity
    from pat_callbacks.core.criteria import MagnitudeCriterion

    torch.manual_seed(0)

    class Redundant(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(8, 16)
            self.b.load_state_dict(self.a.state_dict())
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu((self.a(x) + self.b(x)) / 2))

    model = Redundant()
    x = torch.randn(256, 8)
    y = model(x).argmax(1)  # the model's own labels: loss is low and every layer matters
    params = {"a": model.a.weight, "b": model.b.weight, "head": model.head.weight}
    before = {n: p.detach().clone() for n, p in params.items()}
    scores = {n: MagnitudeCriterion().score(p, None, {}) for n, p in params.items()}
    sens = measure_sensitivity(
        model, params, scores, 0.9, [(x, y)], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    )
    assert sens["head"] > sens["a"] > 0 and sens["head"] > sens["b"] > 0
    assert all(torch.equal(before[n], p) for n, p in params.items())  # weights restored
    sparsities = allocate("sensitivity", scores, 0.5, sensitivities=sens)
    assert sparsities["a"] > sparsities["head"] and sparsities["b"] > sparsities["head"]


def test_plan_pins_layer_overrides_and_splits_the_rest_without_a_trainer():
    scores = {"a.weight": torch.rand(100), "b.weight": torch.rand(300), "c.weight": torch.rand(600)}
    final = plan_sparsities("uniform", scores, 0.8, layer_sparsity={"a.*": 0.2})
    assert final["a.weight"] == 0.2
    pruned = sum(prune_count(s.numel(), final[n]) for n, s in scores.items())
    assert pruned == 800  # the others take what the pinned layer leaves: the overall count is exact
    halfway = plan_sparsities("uniform", scores, 0.4, final_target=0.8, layer_sparsity={"a.*": 0.2})
    assert halfway["a.weight"] == pytest.approx(0.1)  # pinned layers follow the schedule proportionally
    capped = plan_sparsities("global_raw", scores, 0.5, max_sparsity=0.6)
    assert max(capped.values()) <= 0.6 + 1e-9


def test_the_one_threshold_check_fails_for_a_per_layer_split(monkeypatch):
    """The check above can fail: a uniform split of the same budget is not one threshold."""
    import tests.core.test_allocation as this

    monkeypatch.setattr(this, "allocate", lambda method, scores, target: {name: target for name in scores})
    with pytest.raises(AssertionError):
        test_global_threshold_hits_the_overall_target_exactly(0.3)


def test_keep_one_leaves_a_weight_in_every_layer_and_pruned_entries_stay_pruned():
    scores = {"one": torch.tensor([5.0]), "big": torch.rand(100)}
    for method in ("uniform", "global", "global_raw", "erk", "er"):
        sparsities = allocate(method, scores, 0.95, keep_one=True)
        assert all(prune_count(scores[n].numel(), s) < scores[n].numel() for n, s in sparsities.items()), method
    pruned = {"one": torch.tensor([False]), "big": torch.arange(100) < 50}
    high = {"one": torch.tensor([0.0]), "big": torch.cat([torch.full((50,), 9.0), torch.rand(50)])}
    sparsities = allocate("global_raw", high, 0.6, pruned=pruned)
    assert prune_count(100, sparsities["big"]) >= 50


def test_allocations_are_one_registry_with_declared_needs():
    from pat_callbacks.core.allocation import ALLOCATIONS, SHAPE_ALLOCATIONS
    from pat_callbacks.core.registry import Registry

    assert isinstance(ALLOCATIONS, Registry)
    assert sorted(SHAPE_ALLOCATIONS) == ["er", "erk", "uniform"] and "global" not in SHAPE_ALLOCATIONS
    assert {name for name, a in ALLOCATIONS.items() if a.capped} == {"global", "global_raw", "sensitivity"}
    with pytest.raises(ValueError, match="allocation='sensitivity' needs measured `sensitivities`"):
        allocate("sensitivity", _scores(), 0.5)


def test_owl_is_an_allocation_with_the_same_numbers_as_owl_sparsities():
    from pat_callbacks.core.owl import owl_sparsities

    scores = {f"blocks.{i}.w": torch.rand(200) ** (i + 1) * 10 for i in range(3)}
    expected = owl_sparsities(scores, 0.6, owl_lambda=0.1, owl_m=3.0)
    assert allocate("owl", scores, 0.6, owl_lambda=0.1, owl_m=3.0) == expected
    assert plan_sparsities("owl", scores, 0.6, owl_lambda=0.1, owl_m=3.0) == expected
    with pytest.warns(DeprecationWarning, match="`lam` is now called `owl_lambda`"):
        assert owl_sparsities(scores, 0.6, lam=0.1, m=3.0) == expected


def test_a_pruner_prunes_with_allocation_owl_and_refuses_it_sharded():
    from torch import nn

    from pat_callbacks.core.options import PruningOptions
    from pat_callbacks.core.pruner import Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    pruner = Pruner(model, allocation="owl")
    assert pruner.prune_to(0.5) and abs(pruner.sparsity() - 0.5) < 0.01
    with pytest.raises(ValueError, match="allocation='owl' \\(its outlier ratios count whole layers\\)"):
        PruningOptions(allocation="owl").check_shardable()


def test_an_allocation_registered_from_user_code_drives_a_pruner():
    from torch import nn

    from pat_callbacks.core.allocation import ALLOCATIONS
    from pat_callbacks.core.pruner import Pruner

    @ALLOCATIONS.register("last_dense_test", needs_scores=False)
    def last_dense(scores, target, **options):
        names = list(scores)
        total = sum(s.numel() for s in scores.values())
        rest = sum(scores[n].numel() for n in names[:-1])
        return {**dict.fromkeys(names[:-1], min(target * total / rest, 0.99)), names[-1]: 0.0}

    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        pruner = Pruner(model, allocation="last_dense_test")
        pruner.prune_to(0.25)
        assert pruner.layer_sparsity() == {"0.weight": 0.5, "1.weight": 0.0}
    finally:
        del ALLOCATIONS["last_dense_test"]
