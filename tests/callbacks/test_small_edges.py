"""Edges of the reliability issue's smaller items: the refusal of a reshaped target, ..."""

from __future__ import annotations

import pytest
from torch import nn

from pat_callbacks.callbacks._guards import rebind_replaced
from pat_callbacks.core.pruner import Pruner


def test_a_target_replaced_by_another_shape_is_refused_with_both_shapes_and_what_to_do():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pruner = Pruner(model)
    pruner.prune_to(0.5)
    model[1] = nn.Linear(4, 3)
    with pytest.raises(RuntimeError) as raised:
        rebind_replaced("GradualPruning", pruner, model, step=7)
    message = str(raised.value)
    assert "at step 7, a replaced layer has another shape ('1.weight' is now (3, 4), its mask (2, 4))" in message
    assert "replace the layer before trainer.fit (e.g. in configure_model)" in message
    assert "load_state_dict" in message


def test_a_removed_target_is_still_named_as_removed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pruner = Pruner(model)
    model[1] = nn.Identity()
    with pytest.raises(RuntimeError, match=r"\['1.weight'\] is no longer a parameter of the model.*configure_model"):
        rebind_replaced("GradualPruning", pruner, model, step=3)
