"""Gradient-criterion histories: bfloat16 only for bounded windows, float32 products, layers without a gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.core.criteria import get_criterion
from pat_callbacks.core.scoring import BFLOAT16_MAX_TERMS, Scorer
from pat_callbacks.core.targets import select_parameters


def _weight() -> nn.Parameter:
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    weight.grad = torch.tensor([1.0, 0.25])  # |w * g| = [1.0, 0.5]
    return weight


@pytest.mark.parametrize(
    ("window", "step", "next_update", "dtype"),
    [
        (40, 9, 10, torch.bfloat16),  # a window before a known update: bfloat16, as asked
        (40, None, None, torch.float32),  # a plain loop's accumulate(): unbounded, float32
        (40, 9, None, torch.float32),  # no next update (a retried update): float32
        (None, 9, 10, torch.float32),  # no window: the whole run, float32
        (BFLOAT16_MAX_TERMS + 1, 9, 10, torch.float32),  # a window longer than bfloat16 can sum
    ],
)
def test_bfloat16_is_kept_only_for_histories_a_window_bounds(window, step, next_update, dtype):
    scorer = Scorer(get_criterion("taylor"), {"w": _weight()}, window=window, history_dtype="bfloat16")
    scorer.accumulate(step, next_update)
    assert scorer.state["w"]["sum"].dtype == dtype


def test_a_plain_loop_history_of_many_steps_keeps_every_term():
    weight = _weight()
    scorer = Scorer(get_criterion("taylor"), {"w": weight}, window=40, history_dtype="bfloat16")
    for _ in range(1000):  # a bfloat16 sum of 1.0s would stop at 256
        scorer.accumulate()
    assert scorer.score("w").tolist() == [1.0, 0.5]


@pytest.mark.parametrize("name", ["taylor", "movement"])
def test_half_precision_products_are_taken_in_float32(name):
    weight = nn.Parameter(torch.tensor([4e-3, 1e-3, 3e-3, 2e-3], dtype=torch.float16))
    weight.grad = torch.full((4,), 4e-6, dtype=torch.float16)  # w * g underflows float16
    criterion = get_criterion(name)
    state: dict[str, torch.Tensor] = {}
    criterion.accumulate_many([weight], [weight.grad], [state])
    criterion.accumulate_many([weight], [weight.grad], [state])  # the multi-tensor path too
    scores = criterion.score(weight, None, state).abs()
    assert bool((scores > 0).all()) and scores.argsort().tolist() == [1, 3, 2, 0]
    assert criterion.score(weight, weight.grad, {}).abs().argsort().tolist() == [1, 3, 2, 0]  # no history yet


def test_a_layer_without_a_gradient_at_the_update_is_scored_from_its_history():
    weight = _weight()
    scorer = Scorer(get_criterion("taylor"), {"w": weight}, window=40, history_dtype="float32")
    scorer.accumulate(9, 10)
    weight.grad = None  # a branch the update step's batch did not use
    assert scorer.score("w").tolist() == [1.0, 0.5]
    scorer.reset_history()
    with pytest.raises(RuntimeError, match="'w' has neither"):
        scorer.score("w")


def test_a_sparse_embedding_is_refused_as_a_target_naming_it():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Cannot prune '0.weight': its Embedding has sparse=True"):
        select_parameters(model, include=["0.weight", "1.weight"])
    assert list(select_parameters(model)) == ["1.weight"]  # by default embeddings stay dense: nothing refused
