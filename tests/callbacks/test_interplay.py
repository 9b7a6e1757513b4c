"""Issue 24: pruning callbacks next to other callbacks that rewrite weights (weight averaging), models and optimizers
changed mid-run, a second fit, smoke tests, resumes from another pruning callback, two pruning callbacks, frozen
backbones, manual optimization and windows past the end of training."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from torch import nn

from pat_callbacks import DynamicSparseTraining, GradualPruning
from pat_callbacks.app.models import MLP, Classifier
from tests.conftest import make_module, make_trainer

WINDOW = {"start_step": 0, "end_step": 20, "update_every": 5}


def zeros(params) -> float:
    """Exact zeros over ``params`` (the model's real weights)."""
    params = list(params)
    return sum(int((p.detach() == 0).sum()) for p in params) / sum(p.numel() for p in params)


def pruned_weights(module: Classifier) -> list[nn.Parameter]:
    return [layer.weight for layer in module.net.layers if isinstance(layer, nn.Linear)]


class NoTrainingStep(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step started before the bad input was reported")


# ---------------------------------------------------------------- 1: weight averaging keeps the masks
AVERAGING = {
    "swa": lambda: StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1),
    "ema": lambda: EMAWeightAveraging(decay=0.9),
    "weight_averaging": lambda: WeightAveraging(),
}


@pytest.mark.parametrize("pruning_first", [True, False], ids=["pruning_first", "averaging_first"])
@pytest.mark.parametrize("averaging", list(AVERAGING))
def test_weight_averaging_callbacks_end_at_the_target_sparsity(fit, averaging, pruning_first):
    pruning = GradualPruning(sparsity=0.8, verbose=False, **WINDOW)
    average = AVERAGING[averaging]()
    callbacks = [pruning, average] if pruning_first else [average, pruning]
    _, module = fit(callbacks, max_epochs=3, max_steps=-1)
    assert zeros(pruned_weights(module)) == pytest.approx(0.8, abs=1e-3)
    for name, mask in pruning.store.masks.items():
        assert (module.get_parameter(name).detach()[~mask] == 0).all(), name


# ---------------------------------------------------------------- 2: a target replaced mid-run
class ReplaceLayer(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.net.layers[2] = nn.Linear(32, 32)


def test_a_replaced_target_is_warned_about_and_masked_again(fit):
    pruning = GradualPruning(sparsity=0.8, criterion="magnitude", verbose=False, start_step=0, end_step=10)
    with pytest.warns(UserWarning, match=r"'net.layers.2.weight' was replaced .*step 12"):
        _, module = fit([ReplaceLayer(12), pruning], max_steps=20)
    assert module.net.layers[2].weight is pruning.store.params["net.layers.2.weight"]
    assert zeros(pruned_weights(module)) == pytest.approx(0.8, abs=1e-3)


def test_a_removed_target_is_refused_naming_it(fit):
    class RemoveLayer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 12:
                pl_module.net.layers[2] = nn.Identity()

    pruning = GradualPruning(sparsity=0.8, criterion="magnitude", verbose=False, start_step=0, end_step=10)
    with pytest.raises(RuntimeError, match=r"\['net.layers.2.weight'\] is no longer a parameter of the model"):
        fit([RemoveLayer(), pruning], max_steps=20)


# ---------------------------------------------------------------- 3: a second fit, a new optimizer
def test_a_second_fit_keeps_the_masks_of_the_first(tmp_path, digits):
    pruning = GradualPruning(sparsity=0.5, criterion="magnitude", verbose=False, start_step=0, end_step=10)
    module = make_module()
    make_trainer(tmp_path, [pruning], max_steps=12).fit(module, datamodule=digits)
    first = {name: mask.clone() for name, mask in pruning.store.masks.items()}
    make_trainer(tmp_path, [pruning], max_steps=12).fit(module, datamodule=digits)
    for name, mask in first.items():
        assert (module.get_parameter(name).detach()[~mask] == 0).all(), name
    assert zeros(pruned_weights(module)) == pytest.approx(0.5, abs=1e-3)


class Momentum(torch.optim.Optimizer):
    """A custom optimizer (not known to keep zeros at zero): heavy-ball momentum with weight decay."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad).add_(p, alpha=1e-2).add_(1e-3)  # drifts every entry
                p.add_(buf, alpha=-group["lr"])


class SwapOptimizer(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 15:
            trainer.strategy.optimizers = [Momentum(pl_module.parameters())]


class RevivedAfterEachStep(Callback):
    """Counts, after every training step, the masked entries that are not zero (placed after the pruning callback)."""

    def __init__(self, pruning):
        self.pruning, self.revived = pruning, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        masks = self.pruning.store.masks
        self.revived.append(sum(int((pl_module.get_parameter(n).detach()[~m] != 0).sum()) for n, m in masks.items()))


def test_an_optimizer_recreated_mid_run_still_keeps_pruned_weights_at_zero(fit):
    pruning = GradualPruning(sparsity=0.8, verbose=False, **WINDOW)
    check = RevivedAfterEachStep(pruning)
    fit([pruning, SwapOptimizer(), check], max_steps=30)
    assert len(check.revived) == 30 and max(check.revived) == 0


# ---------------------------------------------------------------- 4: Lightning's smoke test
@pytest.mark.parametrize("make", [lambda: GradualPruning(sparsity=0.8, verbose=False), lambda: DynamicSparseTraining()])
def test_fast_dev_run_prunes_once(fit, make):
    pruning = make()
    with (
        pytest.warns(UserWarning, match="fast_dev_run")
        if isinstance(pruning, GradualPruning)
        else warnings.catch_warnings()
    ):
        fit([pruning], fast_dev_run=True, max_steps=-1)
    assert pruning.store.sparsity() == pytest.approx(pruning.final_sparsity, abs=1e-3)
    assert zeros(pruning.store.params.values()) == pytest.approx(pruning.final_sparsity, abs=1e-3)


# ---------------------------------------------------------------- 6: another callback's checkpoint, two callbacks
def test_resuming_gradual_pruning_from_a_dst_checkpoint_warns_naming_both(tmp_path, digits):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1, filename="{step}")
    dst = DynamicSparseTraining(sparsity=0.8, update_every=10, stop_step=15, verbose=False)
    make_trainer(tmp_path, [dst, checkpoint], max_steps=20, enable_checkpointing=True).fit(
        make_module(), datamodule=digits
    )
    pruning = GradualPruning(sparsity=0.8, verbose=False, start_step=25, end_step=35, update_every=5)
    trainer = make_trainer(tmp_path, [pruning], max_steps=40)
    with pytest.warns(
        UserWarning, match=r"GradualPruning: the checkpoint holds the pruning state of DynamicSparseTraining"
    ):
        trainer.fit(make_module(), datamodule=digits, ckpt_path=tmp_path / "ckpt" / "step=20.ckpt")


@pytest.mark.parametrize(
    "second",
    [
        lambda: GradualPruning(sparsity=0.5, verbose=False, **WINDOW),
        lambda: DynamicSparseTraining(sparsity=0.5, verbose=False, stop_step=10),
    ],
    ids=["gradual", "dst"],
)
def test_two_pruning_callbacks_on_the_same_weights_are_refused_naming_both(fit, second):
    first = GradualPruning(sparsity=0.8, verbose=False, **WINDOW)
    other = second()
    with pytest.raises(ValueError, match=rf"{type(other).__name__} and GradualPruning both prune \['net.layers.0"):
        fit([first, other, NoTrainingStep()])


def test_two_pruning_callbacks_on_disjoint_weights_each_reach_their_target(fit):
    first = GradualPruning(sparsity=0.8, include="net.layers.0.weight", verbose=False, **WINDOW)
    second = DynamicSparseTraining(sparsity=0.5, exclude="net.layers.0.weight", verbose=False, stop_step=10)
    _, module = fit([first, second], max_steps=25)
    assert zeros([module.net.layers[0].weight]) == pytest.approx(0.8, abs=1e-3)
    assert zeros([module.net.layers[2].weight, module.net.layers[4].weight]) == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------- 7: frozen backbone
class FrozenBackbone(Classifier):
    def __init__(self):
        super().__init__(MLP(64, (32, 32), 10))
        for layer in self.net.layers[:3]:
            layer.requires_grad_(False)


def test_weights_frozen_at_fit_start_are_named_in_a_warning(fit):
    pruning = DynamicSparseTraining(sparsity=0.5, verbose=False, stop_step=10)
    with pytest.warns(UserWarning, match=r"\['net.layers.0.weight', 'net.layers.2.weight'\] are frozen .* not pruned"):
        fit([pruning], module=FrozenBackbone(), max_steps=5)
    assert list(pruning.store.params) == ["net.layers.4.weight"]


class Unfreeze(Callback):
    """BackboneFinetuning's effect, in short: the frozen layers train from `step` on."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.requires_grad_(True)


def test_gradual_pruning_prunes_a_backbone_once_it_is_unfrozen(fit):
    pruning = GradualPruning(sparsity=0.8, verbose=False, start_step=0, end_step=40, update_every=5)
    with pytest.warns(UserWarning, match=r"\['net.layers.0.weight', 'net.layers.2.weight'\] are frozen .* become"):
        _, module = fit([Unfreeze(12), pruning], module=FrozenBackbone(), max_steps=45)
    assert list(pruning.store.params) == ["net.layers.0.weight", "net.layers.2.weight", "net.layers.4.weight"]
    assert zeros(pruned_weights(module)) == pytest.approx(0.8, abs=1e-3)
    for name, mask in pruning.store.masks.items():
        assert (module.get_parameter(name).detach()[~mask] == 0).all(), name


# ---------------------------------------------------------------- 8: manual optimization
class Manual(Classifier):
    def __init__(self):
        super().__init__(MLP(64, (32, 32), 10))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_falls_back_to_magnitude_unless_taylor_was_asked_for(fit):
    pruning = GradualPruning(sparsity=0.8, verbose=False, **WINDOW)
    fit([pruning], module=Manual(), max_steps=25)
    assert pruning.criterion.name == "magnitude" and pruning.method_name == "cubic/magnitude/global"
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=1e-3)
    explicit = GradualPruning(sparsity=0.8, criterion="taylor", verbose=False, **WINDOW)
    with pytest.raises(ValueError, match=r"criterion=.taylor. reads gradients, which is not supported under manual"):
        fit([explicit, NoTrainingStep()], module=Manual())


# ---------------------------------------------------------------- 9: a window past the end of training
def test_a_window_that_starts_after_training_ends_is_refused_naming_both_numbers(fit):
    pruning = GradualPruning(sparsity=0.8, verbose=False, start_step=500, end_step=600, update_every=10)
    with pytest.raises(ValueError, match=r"starts at step 500, but training has 20 optimizer steps"):
        fit([pruning, NoTrainingStep()], max_steps=20)
