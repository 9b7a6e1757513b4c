"""Edges of the reliability issue's smaller items: the refusal of a reshaped target, the warning of a resume with
another pruning callback, the teacher of Distillation under QAT."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback
from torch import nn

from pat_callbacks import GradualPruning, OneShotPruning
from pat_callbacks.callbacks._guards import rebind_replaced
from pat_callbacks.core.pruner import Pruner
from tests.conftest import make_module, make_trainer


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


def test_resuming_a_one_shot_checkpoint_with_gradual_pruning_says_truly_that_its_zeros_are_not_held(tmp_path, digits):
    trainer = make_trainer(tmp_path, [OneShotPruning(sparsity=0.5)], max_steps=3)
    trainer.fit(make_module(), datamodule=digits)
    checkpoint = tmp_path / "oneshot.ckpt"
    trainer.save_checkpoint(checkpoint)
    seen: dict[int, float] = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights = [p for n, p in pl_module.named_parameters() if n.endswith("weight")]
            seen[trainer.global_step] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    pruning = GradualPruning(sparsity=0.7, start_step=5, end_step=8, verbose=False)
    resumed = make_trainer(tmp_path, [Watch(), pruning], max_steps=6)
    with pytest.warns(UserWarning, match=r"nothing holds its zeros: training updates them from the first step on"):
        resumed.fit(make_module(), datamodule=digits, ckpt_path=checkpoint)
    assert seen[3] == pytest.approx(0.5, abs=1e-3)  # the checkpoint's zeros at resume ...
    assert seen[4] < 0.45  # ... are trained away before start_step, as the warning says
