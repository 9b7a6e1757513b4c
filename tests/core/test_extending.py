"""docs/extending.md's example, run as written: each addition is registered under its name and is the one used."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pat_callbacks.core.allocation import ALLOCATIONS
from pat_callbacks.core.criteria import CRITERIA
from pat_callbacks.oneshot import ONE_SHOT_METHODS

DOC = Path(__file__).parents[2] / "docs" / "extending.md"
ADDED = ((CRITERIA, "row_normalised"), (ALLOCATIONS, "keep_last"), (ONE_SHOT_METHODS, "largest"))


@pytest.fixture
def example():
    """The doc's python block (the additions, then their use), run as written; tests/conftest.py removes the
    registrations afterwards."""
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)[0]
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_the_example_registers_each_addition_and_its_usage_runs(example):
    namespace = example
    assert all(name in registry for registry, name in ADDED)
    with pytest.raises(ValueError, match="'row_normalised' is already registered"):
        CRITERIA.register(namespace["RowNormalised"])


def test_a_pruner_with_the_new_criterion_and_allocation_prunes_what_they_say(example):
    from torch import nn

    from pat_callbacks.core import Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = Pruner(model, criterion="row_normalised", allocation="keep_last")
    assert pruner.prune_to(0.5)
    assert pruner.layer_sparsity() == {"0.weight": 0.625, "2.weight": 0.0}  # 160 of 320 weights, all in layer 0
    w = model[0].weight.detach().abs()
    relative = w / w.amax(dim=-1, keepdim=True)  # the criterion, written out: the 160 lowest are pruned
    lowest = torch.zeros(w.numel(), dtype=torch.bool)
    lowest[relative.flatten().argsort()[:160]] = True
    assert torch.equal(~pruner.masks["0.weight"].flatten(), lowest)
    assert bool((model[0].weight.flatten()[lowest] == 0).all())


def test_one_shot_prune_calls_the_new_method(example):
    from torch import nn

    from pat_callbacks.oneshot import one_shot_prune

    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    magnitudes = layer.weight.detach().abs().clone()
    result = one_shot_prune(layer, "largest", 0.5)
    assert result.options.name == "largest" and result.passes == 0
    kept, pruned = magnitudes[result.masks["weight"]], magnitudes[~result.masks["weight"]]
    assert kept.numel() == pruned.numel() == 32 and kept.max() <= pruned.min()  # the largest half went
