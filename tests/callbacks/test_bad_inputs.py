"""Every bad input fails before the first training step, with a message naming the key and the value."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lightning.pytorch.callbacks import Callback
from torch import nn

from pat_callbacks import CubicSchedule, DynamicSparseTraining, GradualPruning
from pat_callbacks.app.models import Classifier
from tests.conftest import make_module


class NoTrainingStep(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step started before the bad input was reported")


def gradual(**kwargs) -> Callable[[], Callback]:
    options = {"final_sparsity": 0.5, "start_step": 0, "end_step": 40, "update_every": 10} | kwargs
    return lambda: GradualPruning(**options)


def dynamic(**kwargs) -> Callable[[], Callback]:
    options = {"sparsity": 0.5, "method": "rigl", "stop_step": 40, "update_every": 10} | kwargs
    return lambda: DynamicSparseTraining(**options)


class NoPrunableLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.scale = nn.Parameter(nn.init.ones_(nn.Parameter(nn.Linear(64, 10).weight.new_empty(10, 64))))

    def forward(self, x):
        return self.norm(x.flatten(1)) @ self.scale.t()


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


CASES = [
    ("sparsity_one", gradual(final_sparsity=1.0), None, "`final_sparsity` to be a float in [0, 1), but got 1.0"),
    ("sparsity_negative", gradual(final_sparsity=-0.1), None, "`final_sparsity` to be a float in [0, 1), but got -0.1"),
    ("sparsity_text", gradual(final_sparsity="abc"), None, "`final_sparsity` to be a float in [0, 1), but got 'abc'"),
    (
        "end_before_start",
        gradual(start_step=50, end_step=10),
        None,
        "Expected `end_step` > `start_step`, but got start_step=50, end_step=10",
    ),
    ("unknown_schedule", gradual(schedule="cosine"), None, "Unknown `schedule` 'cosine'"),
    ("unknown_criterion", gradual(criterion="snip"), None, "Unknown `criterion` 'snip'"),
    ("unknown_allocation", gradual(allocation="lamp"), None, "Unknown `allocation` 'lamp'"),
    ("unknown_method", dynamic(method="deepr"), None, "Unknown `method` 'deepr'"),
    ("update_every_zero", gradual(update_every=0), None, "`update_every` to be an integer >= 1, but got 0"),
    ("dst_update_every_zero", dynamic(update_every=0), None, "`update_every` to be an integer >= 1, but got 0"),
    (
        "drop_fraction_above_one",
        dynamic(drop_fraction=1.2),
        None,
        "`drop_fraction` to be a float in [0, 1], but got 1.2",
    ),
    ("dst_sparsity_one", dynamic(sparsity=1.0), None, "`sparsity` to be a float in [0, 1), but got 1.0"),
    ("dst_unknown_decay", dynamic(decay="step"), None, "Unknown `decay` 'step'"),
    ("dst_global", dynamic(allocation="global"), None, "`allocation` to be one of 'erk', 'er', 'uniform'"),
    ("include_matches_nothing", gradual(include=["encoder.*"]), None, "`include` pattern 'encoder.*' matches no"),
    ("exclude_matches_nothing", gradual(exclude=["decoder.*"]), None, "`exclude` pattern 'decoder.*' matches no"),
    ("no_prunable_layer", gradual(), NoPrunableLayer, "No parameter to prune in Classifier"),
    ("keep_leaves_nothing", gradual(keep_first=True), OneLayer, "keep_first/keep_last leave no parameter to prune"),
    ("layer_pattern_nothing", gradual(layer_sparsity={"head.*": 0.5}), None, "`layer_sparsity` pattern 'head.*'"),
    ("layer_sparsity_value", gradual(layer_sparsity={"net.*": 1.5}), None, "`layer_sparsity['net.*']` to be a float"),
    ("caps_inverted", gradual(min_sparsity=0.9, max_sparsity=0.2), None, "got 0.9 > 0.2"),
    ("odd_even_without_phase", gradual(schedule="odd_even"), None, "needs `phase_steps` or `phase_epochs`"),
    ("start_fraction_above_one", gradual(start_step=None, start_fraction=1.5), None, "`start_fraction` to be a float"),
    (
        "end_twice",
        gradual(end_epoch=2),
        None,
        "Give the end of the pruning window once, in one unit, but got end_step=40, end_epoch=2",
    ),
    ("power_for_cubic", gradual(power=2), None, "`power` does not apply to schedule 'cubic'"),
    ("initial_above_final", gradual(initial_sparsity=0.7), None, "initial_sparsity=0.7 > final_sparsity=0.5"),
    (
        "remask_text",
        gradual(remask_weights="often"),
        None,
        "`remask_weights` to be True, False or 'auto', but got 'often'",
    ),
    (
        "schedule_object_and_steps",
        lambda: GradualPruning(schedule=CubicSchedule(final_sparsity=0.5, end_step=10), start_step=3),
        None,
        "do not also pass start_step",
    ),
    (
        "window_shorter_than_a_step",
        gradual(start_step=None, end_step=None, start_epoch=0.001, end_epoch=0.002),
        None,
        "resolved to start_step=0, end_step=0",
    ),
]


@pytest.mark.parametrize(("build", "network", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_before_the_first_training_step(fit, build, network, message):
    assert len(CASES) >= 20
    with pytest.raises(ValueError) as excinfo:
        callback = build()
        module = Classifier(network()) if network is not None else make_module()
        fit([callback, NoTrainingStep()], module=module)
    assert message in str(excinfo.value)
