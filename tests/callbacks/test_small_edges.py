"""Edges of the reliability issue's smaller items: the refusal of a reshaped target, the warning of a resume with
another pruning callback, the teacher of Distillation under QAT."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from pat_callbacks import Distillation, GradualPruning, OneShotPruning, QuantizationAwareTraining
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


def test_the_teacher_copies_full_precision_weights_while_qat_has_fake_quantized_ones_swapped_in(tmp_path, digits):
    # resumed past teacher_step without a saved teacher, the copy is made in the first training_step, after QAT
    # swapped its int4 values into the weights: the teacher must still be the full-precision model
    first = make_trainer(tmp_path, [QuantizationAwareTraining("int4", finalize=False)], max_steps=3)
    first.fit(make_module(), datamodule=digits)
    checkpoint = tmp_path / "qat.ckpt"
    first.save_checkpoint(checkpoint)
    distill, qat = Distillation(teacher_step=2, save_teacher=False), QuantizationAwareTraining("int4", finalize=False)
    masters: dict[str, torch.Tensor] = {}

    class Snap(Callback):
        def on_train_start(self, trainer, pl_module):
            masters.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    make_trainer(tmp_path, [Snap(), qat, distill], max_steps=4).fit(
        make_module(), datamodule=digits, ckpt_path=checkpoint
    )
    teacher = dict(distill.teacher.named_parameters())
    assert distill.teacher_step == 3
    assert teacher
    for name, value in teacher.items():  # the full-precision model, not its int4 grid
        assert torch.equal(value, masters[name] if name in masters else masters[f"net.{name}"]), name
