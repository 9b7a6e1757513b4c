"""The scheduled callbacks feed Taylor / Fisher history only over the ``accumulate_window`` steps before each update."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pat_callbacks import GradualPruning
from pat_callbacks.app.config import GradualPruningConf
from pat_callbacks.core.criteria import get_criterion

WINDOW = dict(sparsity=0.8, start_step=10, end_step=50, update_every=10, criterion="taylor", allocation="global")


class _Clock(Callback):
    step = -1

    def on_train_batch_start(self, trainer, *args) -> None:
        self.step = trainer.global_step


def _accumulated_steps(monkeypatch, fit, callback: GradualPruning, criterion: str = "taylor") -> tuple[list[int], Any]:
    """The steps at which the criterion's history was added to, and the fitted module."""
    steps: list[int] = []
    clock = _Clock()
    kind = type(get_criterion(criterion))
    original = kind.accumulate_many

    def counting(self, params, grads, states):
        steps.append(clock.step)
        original(self, params, grads, states)

    monkeypatch.setattr(kind, "accumulate_many", counting)
    _, module = fit([callback, clock], max_steps=60)
    monkeypatch.undo()
    return steps, module


def test_the_history_takes_only_the_window_before_each_update(monkeypatch, fit):
    steps, _ = _accumulated_steps(monkeypatch, fit, GradualPruning(**WINDOW, accumulate_window=3))
    updates = [10, 20, 30, 40, 50]
    assert steps == [step for update in updates for step in (update - 2, update - 1, update)]  # 3 adds per update


def test_the_default_window_covers_every_step_of_updates_closer_than_it(monkeypatch, fit):
    callback = GradualPruning(**WINDOW)  # the default window (40) is wider than update_every (10)
    assert (callback.options.accumulate_window, callback.options.history_dtype) == (40, "bfloat16")
    steps, _ = _accumulated_steps(monkeypatch, fit, callback)
    assert steps == list(range(0, 51))  # from one update_every before the start to end_step, as before


def test_no_window_restores_every_step_float32_bit_for_bit(monkeypatch, fit):
    class FormerWiring(GradualPruning):
        """The callback as it was before the window: accumulate() with no step, every step of the window."""

        def _accumulating(self, step):
            schedule = self._require_schedule()
            return self._retry or schedule.start_step - schedule.update_every <= step <= schedule.end_step

        def _next_update(self, step):
            return None

    results = []
    for cls in (FormerWiring, GradualPruning):
        callback = cls(
            **{**WINDOW, "update_every": 15, "end_step": 40}, accumulate_window=None, history_dtype="float32"
        )
        steps, module = _accumulated_steps(monkeypatch, fit, callback)
        results.append((steps, {k: v.clone() for k, v in module.state_dict().items()}, callback.store.masks))
    (old_steps, old_weights, old_masks), (new_steps, new_weights, new_masks) = results
    assert old_steps == new_steps == list(range(0, 41))  # from start_step - update_every (< 0) to end_step
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    assert all(torch.equal(old_masks[k], new_masks[k]) for k in old_masks)


def test_a_fisher_history_is_windowed_too(monkeypatch, fit):
    steps, _ = _accumulated_steps(
        monkeypatch, fit, GradualPruning(**{**WINDOW, "criterion": "fisher"}, accumulate_window=2), "fisher"
    )
    assert steps == [step for update in (10, 20, 30, 40, 50) for step in (update - 1, update)]


def test_a_retried_update_accumulates_every_step_until_it_is_made():
    callback = GradualPruning(**WINDOW, accumulate_window=2)
    callback._resolve = lambda trainer: None  # the window is in steps: resolved at construction
    callback._retry = True
    assert callback._accumulating(13) and callback._next_update(13) is None  # every step, as before the window


@pytest.mark.filterwarnings("ignore:.*the final sparsity will not be reached")
def test_the_history_holds_at_most_half_the_parameter_bytes(fit):
    callback = GradualPruning(**WINDOW, accumulate_window=3)
    fit([callback], max_steps=49)  # steps 0..48: inside the window of the update at 50 (48, 49, 50)
    params = callback.store.params
    per_entry = sum(
        t.numel() * t.element_size() for s in callback.criterion_state.values() for t in s.values() if t.dim()
    )
    scalars = sum(
        t.numel() * t.element_size() for s in callback.criterion_state.values() for t in s.values() if not t.dim()
    )
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    assert per_entry == param_bytes // 2  # one bfloat16 buffer per pruned weight
    assert scalars == 4 * len(params)  # and one float32 count per layer
    assert all(int(s["count"]) == 1 for s in callback.criterion_state.values())  # step 48 only so far


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"accumulate_window": 0}, "Expected `accumulate_window` to be an integer >= 1, but got 0"),
        ({"history_dtype": "float16"}, "Unknown `history_dtype` 'float16'; expected one of: 'bfloat16', 'float32'"),
    ],
)
def test_bad_window_arguments_are_refused_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        GradualPruning(sparsity=0.9, **arguments)


def test_hydra_refuses_a_bad_history_dtype_or_window_when_composed():
    schema = OmegaConf.structured(GradualPruningConf)
    assert (schema.accumulate_window, schema.history_dtype) == (40, "bfloat16")
    with pytest.raises(ValidationError, match=r"Invalid value 'float16', expected one of \[bfloat16, float32\]"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["history_dtype=float16"]))
    with pytest.raises(ValidationError, match="Value 'forty'"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["accumulate_window=forty"]))
    former = OmegaConf.merge(schema, OmegaConf.from_dotlist(["accumulate_window=null", "history_dtype=float32"]))
    callback = GradualPruning(
        sparsity=0.9, accumulate_window=former.accumulate_window, history_dtype=former.history_dtype
    )
    assert (callback.options.accumulate_window, callback.options.history_dtype) == (None, "float32")
