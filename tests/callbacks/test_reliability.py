"""Issue 14: the README's promises at the edges (last-step NaN, impossible budgets, no revival, tiny layers,
resume with a changed config, frozen and lazy layers, keep-the-sparsity fine-tuning)."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from pat_callbacks import DynamicSparseTraining, GradualPruning
from pat_callbacks.app.models import MLP, Classifier
from pat_callbacks.callbacks.keep import KeepSparsity
from tests.callbacks.test_gradual import GradientCorruptor, GradientRepair
from tests.conftest import make_module, make_trainer

LAYERS = ("net.layers.0.weight", "net.layers.2.weight", "net.layers.4.weight")  # 2048, 1024, 320 weights


class NoTrainingStep(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step started before the bad input was reported")


# ---------------------------------------------------------------- 1: NaN / Inf at the last update step
@pytest.mark.parametrize("bad_steps", [{40}, set(range(40, 60))], ids=["last_update_step", "every_step_after"])
def test_non_finite_scores_at_the_last_update_step_still_reach_the_target(fit, bad_steps):
    pruning = GradualPruning(final_sparsity=0.8, criterion="taylor", start_step=10, end_step=40, update_every=10)
    with pytest.warns(UserWarning, match="NaN or Inf"):
        fit([GradientCorruptor(bad_steps, float("inf")), pruning, GradientRepair()])
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=1e-3)
    for name, mask in pruning.store.masks.items():
        assert (pruning.store.params[name].detach()[~mask] == 0).all()


# ---------------------------------------------------------------- 2: impossible budgets
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"allocation": "global", "max_sparsity": 0.3, "final_sparsity": 0.9},
            r"final_sparsity=0.9 cannot .* allocation='global', max_sparsity=0.3; reachable: \[0, 0.2998\]",
        ),
        (
            {"allocation": "global", "min_sparsity": 0.9, "final_sparsity": 0.3},
            r"final_sparsity=0.3 cannot .* allocation='global', min_sparsity=0.9; reachable: \[0.9001, 0.9991\]",
        ),
        (
            {"layer_sparsity": {LAYERS[0]: 0.0, LAYERS[1]: 0.0}, "final_sparsity": 0.9},
            r"final_sparsity=0.9 cannot be reached with .*layer_sparsity=.*reachable: \[0, 0.09404\]",
        ),
    ],
    ids=["max_cap", "min_cap", "pinned_big_layers"],
)
def test_impossible_budgets_are_refused_before_the_first_step(fit, kwargs, message):
    pruning = GradualPruning(start_step=0, end_step=40, update_every=10, **kwargs)
    with pytest.raises(ValueError, match=message):
        fit([NoTrainingStep(), pruning])


def test_dst_with_pinned_layers_refuses_an_unreachable_sparsity(fit):
    pruning = DynamicSparseTraining(sparsity=0.9, layer_sparsity={LAYERS[0]: 0.0}, end_step=40)
    with pytest.raises(ValueError, match=r"sparsity=0.9 cannot be reached .*reachable: \[0, 0.3956\]"):
        fit([NoTrainingStep(), pruning])


# ---------------------------------------------------------------- 3: gradient criteria never revive
class MaskHistory(Callback):
    def __init__(self, pruning):
        self.pruning, self.revived = pruning, 0
        self.previous: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        masks = self.pruning.store.masks
        for name, mask in masks.items():
            if name in self.previous:
                self.revived += int((mask & ~self.previous[name]).sum())
        self.previous = {name: mask.clone() for name, mask in masks.items()}


@pytest.mark.parametrize("criterion", ["taylor", "movement", "fisher"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_gradient_criteria_never_revive_pruned_weights(fit, criterion, allocation):
    pruning = GradualPruning(
        final_sparsity=0.8, criterion=criterion, allocation=allocation, start_step=5, end_step=55, update_every=5
    )
    history = MaskHistory(pruning)
    fit([pruning, history])
    assert history.revived == 0
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=1e-3)


# ---------------------------------------------------------------- 5: no layer pruned to 100%
class WithTinyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.tiny, self.fc2 = nn.Linear(64, 1), nn.Linear(1, 1), nn.Linear(1, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.tiny(torch.relu(self.fc1(x.flatten(1))))))


@pytest.mark.parametrize(
    "build",
    [
        lambda: GradualPruning(final_sparsity=0.9, start_step=0, end_step=20, update_every=10),
        lambda: GradualPruning(final_sparsity=0.95, allocation="global", start_step=0, end_step=20, update_every=10),
        lambda: DynamicSparseTraining(sparsity=0.9, allocation="erk", end_step=20, update_every=10),
        lambda: DynamicSparseTraining(sparsity=0.9, allocation="uniform", end_step=20, update_every=10),
    ],
    ids=["uniform", "global", "dst_erk", "dst_uniform"],
)
def test_every_layer_keeps_at_least_one_weight(fit, build):
    torch.manual_seed(0)
    module = Classifier(WithTinyLayer())
    pruning = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit([pruning], module=module, max_steps=30)
    assert all(int(mask.sum()) >= 1 for mask in pruning.store.masks.values()), pruning.store.layer_sparsity()


def test_a_layer_past_0_99_is_warned_about(fit):
    pruning = GradualPruning(
        final_sparsity=0.9, start_step=0, end_step=20, update_every=10, layer_sparsity={LAYERS[0]: 0.995}
    )
    with pytest.warns(UserWarning, match=r"'net.layers.0.weight' is pruned to 0.99[0-9]* \(over 0.99\)"):
        fit([pruning], max_steps=30)


# ---------------------------------------------------------------- 7: frozen layers
class FrozenFirst(Classifier):
    def __init__(self):
        super().__init__(MLP(64, (32, 32), 10))
        self.net.layers[0].weight.requires_grad_(False)


def test_frozen_layers_are_left_dense_and_a_gradient_criterion_on_them_fails_in_setup(fit):
    pruning = GradualPruning(final_sparsity=0.5, criterion="taylor", start_step=0, end_step=20, update_every=10)
    fit([pruning], module=FrozenFirst(), max_steps=25)
    assert LAYERS[0] not in pruning.store.params
    included = GradualPruning(
        final_sparsity=0.5, criterion="taylor", include=["net.layers.*.weight"], start_step=0, end_step=20
    )
    with pytest.raises(ValueError, match=r"criterion='taylor' reads gradients, but \['net.layers.0.weight'\] are"):
        fit([NoTrainingStep(), included], module=FrozenFirst())


# ---------------------------------------------------------------- lazy modules
class Lazy(Classifier):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 10)))


def test_uninitialised_lazy_layers_fail_in_setup_saying_what_to_do(fit):
    pruning = GradualPruning(final_sparsity=0.5, start_step=0, end_step=20, update_every=10)
    with pytest.raises(ValueError, match="run a forward pass or build the model before fit, or use configure_model"):
        fit([NoTrainingStep(), pruning], module=Lazy())


# ---------------------------------------------------------------- 8: resume with a changed config
def _first_run(tmp_path, digits, pruning):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=30, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, [pruning, checkpoint], max_steps=30, enable_checkpointing=True)
    trainer.fit(make_module(), datamodule=digits)
    return tmp_path / "ckpt" / "step=30.ckpt", {name: mask.clone() for name, mask in pruning.store.masks.items()}


class MasksAtStart(Callback):
    def __init__(self, pruning):
        self.pruning, self.masks = pruning, None

    def on_train_start(self, trainer, pl_module):
        self.masks = {name: mask.clone() for name, mask in self.pruning.store.masks.items()}


def test_resume_with_a_changed_final_sparsity_keeps_the_masks_and_reaches_the_new_target(tmp_path, digits):
    window = {"start_step": 5, "end_step": 50, "update_every": 5}
    ckpt, saved = _first_run(tmp_path, digits, GradualPruning(final_sparsity=0.8, **window))
    pruning = GradualPruning(final_sparsity=0.9, **window)
    start = MasksAtStart(pruning)
    trainer = make_trainer(tmp_path, [pruning, start], max_steps=60)
    with pytest.warns(
        UserWarning, match=r"saved under .*'final_sparsity': 0.8.*continues with .*'final_sparsity': 0.9"
    ):
        trainer.fit(make_module(seed=5), datamodule=digits, ckpt_path=ckpt)
    assert start.masks.keys() == saved.keys()
    assert all(torch.equal(start.masks[name], saved[name]) for name in saved)
    assert pruning.store.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_resume_of_dst_with_a_changed_sparsity_is_refused_naming_both_configs(tmp_path, digits):
    ckpt, _ = _first_run(tmp_path, digits, DynamicSparseTraining(sparsity=0.8, update_every=10, end_step=50))
    pruning = DynamicSparseTraining(sparsity=0.5, update_every=10, end_step=50)
    trainer = make_trainer(tmp_path, [pruning, NoTrainingStep()], max_steps=60)
    with pytest.raises(ValueError, match=r"'sparsity': 0.8.*'sparsity': 0.5"):
        trainer.fit(make_module(seed=5), datamodule=digits, ckpt_path=ckpt)


def test_resume_of_dst_with_another_method_keeps_the_masks(tmp_path, digits):
    ckpt, saved = _first_run(tmp_path, digits, DynamicSparseTraining(sparsity=0.8, update_every=10, end_step=50))
    pruning = DynamicSparseTraining(sparsity=0.8, regrowth="static", update_every=10, end_step=50)
    trainer = make_trainer(tmp_path, [pruning], max_steps=40)
    with pytest.warns(UserWarning, match="saved under"):
        trainer.fit(make_module(seed=5), datamodule=digits, ckpt_path=ckpt)
    assert all(torch.equal(pruning.store.masks[name], saved[name]) for name in saved)


# ---------------------------------------------------------------- keep-this-sparsity fine-tuning
def test_fine_tuning_a_pruned_checkpoint_keeps_its_exact_zeros(tmp_path, digits):
    pruning = GradualPruning(final_sparsity=0.8, start_step=0, end_step=20, update_every=10)
    trainer = make_trainer(tmp_path, [pruning], max_steps=25)
    module = make_module()
    trainer.fit(module, datamodule=digits)
    zeros = {name: (p.detach() == 0).clone() for name, p in module.named_parameters() if name in LAYERS}

    keep = KeepSparsity()
    make_trainer(tmp_path, [keep], max_steps=30).fit(module, datamodule=digits)
    params = dict(module.named_parameters())
    for name, was_zero in zeros.items():
        assert torch.equal(params[name].detach() == 0, was_zero), name
    assert keep.store.sparsity() == pytest.approx(0.8, abs=1e-3)
