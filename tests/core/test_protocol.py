"""MaskingPruner: the one protocol the callbacks drive, implemented by Pruner and StructuredPruner alike."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import pat_callbacks
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.protocol import MaskingPruner
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.structured.pruner import StructuredPruner

CALLBACKS = Path(pat_callbacks.__file__).parent / "callbacks"
# The callbacks' shared machinery, which drives a Pruner and a StructuredPruner alike.
SHARED = ("base.py", "_guards.py", "scheduled.py")  # gradual.py and dynamic.py drive a Pruner only


def _members() -> set[str]:
    names = set(MaskingPruner.__annotations__)
    names |= {name for name in vars(MaskingPruner) if not name.startswith("_")}
    return names


def _pruners() -> list[MaskStore]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    return [Pruner(model), StructuredPruner(model, torch.zeros(1, 4))]


@pytest.mark.parametrize("index", [0, 1], ids=["Pruner", "StructuredPruner"])
def test_both_pruners_implement_every_member_of_the_protocol(index):
    pruner = _pruners()[index]
    assert isinstance(pruner, MaskingPruner) and isinstance(pruner, MaskStore)
    for name in _members():
        assert hasattr(pruner, name), name
    assert pruner.criterion_state == {} and pruner.sensitivities is None  # before any step
    accepted = inspect.signature(pruner.prune_to).parameters
    assert {"sparsity", "scores", "optimizers", "step"} <= set(accepted)
    assert pruner.prune_to(0.5, scores=None, optimizers=(), step=0) and pruner.sparsity() > 0


def test_the_protocol_is_what_the_shared_callback_code_calls_on_a_pruner():
    called = set()
    for name in SHARED:
        source = (CALLBACKS / name).read_text()
        assert not re.search(r"getattr\(\s*(self\.)?pruner", source), name  # no probing
        called |= set(re.findall(r"\bpruner\.([a-z_]+)", source))
    assert called, SHARED
    assert called <= _members(), sorted(called - _members())


def test_a_structured_pruner_keeps_no_history():
    structured = _pruners()[1]
    structured.accumulate()
    structured.after_update()
    assert structured.criterion_state == {} and structured.needs_grad is False and structured.scorer_name == "l2"
