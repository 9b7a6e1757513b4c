from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from pat_callbacks import CubicSchedule, GradualPruning
from pat_callbacks.app.models import MLP, Classifier
from pat_callbacks.core.patterns import prune_count
from tests.conftest import make_module, make_trainer


class ZeroChecker(Callback):
    """After every batch (so after every optimizer step), pruned weights must be exactly zero."""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.checked_steps: set[int] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.pruning.store.masks.items():
            leaked = self.pruning.store.params[name].detach()[~mask]
            assert (leaked == 0).all(), f"{name}: {int((leaked != 0).sum())} pruned weights non-zero"
        if self.pruning.store.masks:
            self.checked_steps.add(trainer.global_step)


class AnyOptimizer(Classifier):
    def __init__(self, make_optimizer, **kwargs):
        super().__init__(MLP(64, (32, 32), 10), **kwargs)
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3, amsgrad=True),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def _pruning(**kwargs) -> GradualPruning:
    # Zhu & Gupta's magnitude / uniform, explicit: most tests here check per-layer counts or magnitudes.
    options = {"final_sparsity": 0.8, "schedule": "cubic", "start_step": 0, "end_step": 40, "update_every": 10}
    options |= {"criterion": "magnitude", "allocation": "uniform"}
    options.update(kwargs)
    return GradualPruning(**options)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_pruned_weights_stay_zero_without_remasking(fit, optimizer):
    """The invariant the default relies on: masked gradients + reset state keep zeros at zero."""
    pl.seed_everything(0, verbose=False)
    pruning = _pruning(remask_weights=False)
    checker = ZeroChecker(pruning)
    _trainer, _ = fit([pruning, checker], module=AnyOptimizer(OPTIMIZERS[optimizer]))
    assert pruning._remask_after_step is False
    assert len(checker.checked_steps) >= 50


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        {"gradient_clip_val": 0.1},
        {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
        {"accumulate_grad_batches": 4, "max_steps": 20},
        {"precision": "bf16-mixed", "max_steps": 45},
        "fp16_grad_scaler",
    ],
    ids=["clip_norm", "clip_value", "accumulate_4", "bf16_mixed", "fp16_mixed_grad_scaler"],
)
def test_pruned_weights_stay_zero_under_training_modes(fit, trainer_kwargs):
    if trainer_kwargs == "fp16_grad_scaler":  # Lightning maps '16-mixed' to bf16 on CPU: build the fp16 path
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        trainer_kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)], "max_steps": 45}
    pruning = _pruning(end_step=15, update_every=5)
    checker = ZeroChecker(pruning)
    _trainer, _module = fit(
        [pruning, checker], module=make_module(optimizer="adamw", weight_decay=0.05), **trainer_kwargs
    )
    assert checker.checked_steps
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=0.01)


def test_unknown_optimizer_falls_back_to_remasking(fit):
    pl.seed_everything(0, verbose=False)
    pruning = _pruning()
    checker = ZeroChecker(pruning)
    fit([pruning, checker], module=AnyOptimizer(lambda p: torch.optim.NAdam(p, lr=1e-2)))
    assert pruning._remask_after_step is True
    assert checker.checked_steps


def test_uniform_reaches_the_target_in_every_layer(fit):
    pruning = _pruning(final_sparsity=0.75)
    _trainer, _module = fit([pruning])
    for name, param in pruning.store.params.items():
        assert int((param == 0).sum()) == prune_count(param.numel(), 0.75), name
    assert pruning.target_sparsity == 0.75


@pytest.mark.parametrize("allocation", ["global", "global_raw"])
def test_global_reaches_the_target_overall(fit, allocation):
    pruning = _pruning(final_sparsity=0.9, allocation=allocation)
    fit([pruning])
    params = pruning.store.params
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros == prune_count(total, 0.9)
    per_layer = pruning.store.layer_sparsity()
    if allocation == "global_raw":  # raw magnitudes differ by layer size at init: far from uniform
        assert max(per_layer.values()) - min(per_layer.values()) > 0.01


def test_masks_follow_the_schedule_at_every_update(fit):
    seen: dict[int, float] = {}

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step - 1] = pruning.store.sparsity()

    pruning = _pruning(final_sparsity=0.8, start_step=5, end_step=45, update_every=10)
    fit([pruning, Recorder()])
    schedule = pruning.schedule
    numel = pruning.store.numel()
    for step in (4, 5, 15, 24, 25, 45, 59):
        target = schedule(max(t for t in [*schedule.update_steps(), -1] if t <= step)) if step >= 5 else 0.0
        assert seen[step] == pytest.approx(target, abs=3 / numel + 1e-3), step


def test_odd_even_weights_regrow_in_recover_phases_and_are_zero_in_prune_phases(fit):
    zeros: dict[int, float] = {}

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            params = pruning.store.params.values()
            zeros[trainer.global_step - 1] = sum(int((p == 0).sum()) for p in params) / pruning.store.numel()

    pruning = GradualPruning(final_sparsity=0.8, schedule="odd_even", start_step=10, end_step=50, phase_steps=10)
    checker = ZeroChecker(pruning)
    fit([pruning, checker, Recorder()])
    for step in (10, 19, 30, 39, 50, 59):  # prune phases (and the final one)
        assert zeros[step] >= 0.79, step
    for step in (25, 29, 45, 49):  # recover phases: pruned weights train again from zero
        # (some stay zero: digits' border pixels are always 0, so their input weights get no gradient)
        assert zeros[step] < 0.5, step


def test_epochs_are_converted_once_the_epoch_length_is_known(fit):
    pruning = GradualPruning(final_sparsity=0.5, schedule="linear", start_epoch=1, end_epoch=2, update_every=5)
    assert pruning.schedule is None
    trainer, _ = fit([pruning], accumulate_grad_batches=2, max_steps=30)
    steps_per_epoch = -(-trainer.num_training_batches // 2)
    assert (pruning.schedule.start_step, pruning.schedule.end_step) == (steps_per_epoch, 2 * steps_per_epoch)


def test_default_window_is_a_fraction_of_training(fit):
    pruning = GradualPruning(final_sparsity=0.5)
    fit([pruning], max_steps=101)
    assert (pruning.schedule.start_step, pruning.schedule.end_step) == (10, 70)
    assert pruning.store.sparsity() == pytest.approx(0.5, abs=0.01)


def test_a_schedule_object_is_accepted(fit):
    schedule = CubicSchedule(final_sparsity=0.6, start_step=0, end_step=20, update_every=5)
    pruning = GradualPruning(schedule=schedule)
    fit([pruning], max_steps=25)
    assert pruning.schedule is schedule and pruning.store.sparsity() == pytest.approx(0.6, abs=0.01)
    with pytest.raises(ValueError, match=r"carries its own sparsity and steps; do not also pass end_step"):
        GradualPruning(schedule=schedule, end_step=10)


def test_a_plain_callable_is_a_schedule(fit):
    """Like Lightning's ModelPruning `amount`: a callable step -> sparsity, updated every `update_every` steps."""
    seen: list[tuple[int, float]] = []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights = [p for n, p in pl_module.named_parameters() if n.endswith("weight")]
            zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            seen.append((trainer.global_step - 1, zeros))

    pruning = GradualPruning(schedule=lambda step: 0.3 if step < 20 else 0.6, update_every=10)
    fit([pruning, Recorder()], max_steps=41)
    assert pruning.schedule.end_step == 40 and pruning.final_sparsity == 0.6
    assert dict(seen)[5] == pytest.approx(0.3, abs=1e-3) and dict(seen)[25] == pytest.approx(0.6, abs=1e-3)


def test_warns_when_training_ends_before_the_schedule(fit):
    with pytest.warns(UserWarning, match="schedule ends at step 500 but training has 60 optimizer steps"):
        fit([_pruning(end_step=500)])


def test_sparsity_is_logged_per_layer_and_in_the_progress_bar(tmp_path, digits):
    pruning = _pruning(end_step=20, update_every=10)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(tmp_path, [pruning], logger=logger, max_steps=30)
    trainer.fit(make_module(), datamodule=digits)
    assert trainer.progress_bar_metrics["pruning/sparsity"] == pytest.approx(0.8, abs=0.01)
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    column = "pruning/sparsity/net.layers.0.weight"
    logged = {int(r["step"]): float(r[column]) for r in rows if r.get(column)}
    assert set(logged) >= {0, 10, 20}  # one row per mask update, at its step
    assert logged[20] == pytest.approx(0.8, abs=0.01)
    assert "pruning/target" in rows[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, "`final_sparsity` to be a float in [0, 1), but got 1.0"),
        ({"final_sparsity": -0.1}, "`final_sparsity` to be a float in [0, 1), but got -0.1"),
        ({"final_sparsity": "abc"}, "`final_sparsity` to be a float in [0, 1), but got 'abc'"),
        ({"end_step": 0, "start_step": 10}, "Expected `end_step` > `start_step`"),
        ({"update_every": 0}, "`update_every` to be an integer >= 1, but got 0"),
        ({"schedule": "cubical"}, "Unknown `schedule` 'cubical'"),
        ({"criterion": "l3"}, "Unknown `criterion` 'l3'"),
        ({"allocation": "erk9"}, "Unknown `allocation` 'erk9'"),
        ({"start_step": None, "start_fraction": 1.5}, "`start_fraction` to be a float in [0, 1], but got 1.5"),
        (
            {"start_step": None, "end_step": None, "end_epoch": 1, "start_epoch": 3},
            "Expected `end_epoch` > `start_epoch`",
        ),
        ({"end_step": 5, "end_epoch": 3}, "Give the end of the pruning window once"),
        ({"schedule": "odd_even"}, "needs `phase_steps` or `phase_epochs`"),
        ({"power": 2}, "`power` does not apply to schedule 'cubic'"),
        ({"remask_weights": "sometimes"}, "`remask_weights` to be True, False or 'auto'"),
        ({"exclude": 5}, "Expected `exclude` to be a glob pattern or a list of them, but got 5"),
        ({"drop_fraction": 2}, "`drop_fraction` to be a float in [0, 1], but got 2"),
        ({"regrow_fraction": 2}, "`regrow_fraction` to be a float in [0, 1], but got 2"),
        ({"regrow_fraction": 0.1, "drop_fraction": 0.2}, "Give `drop_fraction`"),
        ({"min_sparsity": 0.9, "max_sparsity": 0.5}, "Expected `min_sparsity` <= `max_sparsity`, but got 0.9 > 0.5"),
        ({"layer_sparsity": {"fc.*": 1.5}}, "Expected `layer_sparsity['fc.*']` to be a float in [0, 1), but got 1.5"),
        ({"layer_sparsity": [0.5]}, "Expected `layer_sparsity` to be a mapping of pattern -> sparsity"),
        ({"sensitivity_batches": 0}, "`sensitivity_batches` to be an integer >= 1, but got 0"),
        ({"probe_sparsity": 1.0}, "`probe_sparsity` to be a float in [0, 1), but got 1.0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    options = {"final_sparsity": 0.5, "start_step": 0, "end_step": 100} | kwargs
    with pytest.raises(ValueError) as excinfo:
        GradualPruning(**options)
    assert message in str(excinfo.value)


def test_pattern_matching_nothing_fails_before_the_first_step(fit):
    class NoStep(Callback):
        def on_train_batch_start(self, *args):
            raise AssertionError("a training step ran")

    with pytest.raises(ValueError, match=r"`exclude` pattern 'head\.\*' matches no parameter"):
        fit([_pruning(exclude=["head.*"]), NoStep()])


def _state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path, digits):
    """Checkpoints written at every epoch end by the uninterrupted run; resume from the middle one
    (step 46 of 69, between two mask updates) and finish with identical weights and masks."""
    schedule_kwargs = {"final_sparsity": 0.8, "start_step": 5, "end_step": 60, "update_every": 10}
    full = GradualPruning(**schedule_kwargs)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, [full, every_epoch], max_steps=69, enable_checkpointing=True)
    module = make_module(seed=3)
    trainer.fit(module, datamodule=digits)
    expected, expected_masks = _state(module), copy.deepcopy(full.store.masks)

    resumed = GradualPruning(**schedule_kwargs)
    trainer = make_trainer(tmp_path, [resumed], max_steps=69)
    module = make_module(seed=99)  # different init: everything must come from the checkpoint
    trainer.fit(module, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "step=46.ckpt")
    assert resumed.last_update_step == 60 and trainer.global_step == 69
    got = _state(module)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(resumed.store.masks[k], expected_masks[k]) for k in expected_masks)


def test_resume_restores_masks_before_the_first_step(tmp_path, digits):
    first = GradualPruning(final_sparsity=0.8, start_step=0, end_step=20, update_every=10)
    trainer = make_trainer(tmp_path, [first], max_steps=23)
    trainer.fit(make_module(), datamodule=digits)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert state["last_update_step"] == 20 and set(state["masks"]) == set(first.store.params)

    seen = {}

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("sparsity", resumed.store.sparsity())

    resumed = GradualPruning(final_sparsity=0.8, start_step=0, end_step=20, update_every=10)
    trainer = make_trainer(tmp_path, [resumed, FirstStep()], max_steps=30)
    trainer.fit(make_module(seed=1), datamodule=digits, ckpt_path=tmp_path / "a.ckpt")
    assert seen["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_pruned_checkpoint_loads_into_a_plain_model(tmp_path, fit):
    pruning = _pruning()
    trainer, module = fit([pruning])
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == set(module.state_dict())  # no weight_orig / weight_mask keys
    plain = Classifier.load_from_checkpoint(path, net=MLP(64, (32, 32), 10))
    zeros = (plain.net.layers[0].weight == 0).float().mean().item()
    assert zeros == pytest.approx(0.8, abs=0.01)


def test_pruning_reversal_regrows_high_gradient_weights_and_keeps_the_target(fit):
    regrown_per_update: dict[int, int] = {}
    previous: dict[str, torch.Tensor] = {}

    class Recorder(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if pruning.last_update_step == trainer.global_step and previous:
                count = 0
                for name, mask in pruning.store.masks.items():
                    back = mask & ~previous[name]  # pruned before, active now
                    count += int(back.sum())
                    param = pruning.store.params[name]
                    assert (param.detach()[back] == 0).all()
                    for value in optimizer.state[param].values():
                        if torch.is_tensor(value) and value.shape == param.shape:
                            assert (value[back] == 0).all()
                regrown_per_update[trainer.global_step] = count
            previous.update({k: v.clone() for k, v in pruning.store.masks.items()})

    pruning = _pruning(final_sparsity=0.8, drop_fraction=0.1)
    fit([pruning, Recorder(), ZeroChecker(pruning)])
    assert sum(regrown_per_update.values()) > 0
    for name, param in pruning.store.params.items():
        assert int((param == 0).sum()) >= prune_count(param.numel(), 0.8) - 0, name
        assert int((~pruning.store.masks[name]).sum()) == prune_count(param.numel(), 0.8), name


@pytest.mark.parametrize("criterion", ["taylor", "movement", "fisher", "random"])
def test_every_criterion_reaches_the_target_with_zero_leaks(fit, criterion):
    pruning = _pruning(criterion=criterion, start_step=10, end_step=40)
    checker = ZeroChecker(pruning)
    fit([pruning, checker])
    for name, param in pruning.store.params.items():
        assert int((~pruning.store.masks[name]).sum()) == prune_count(param.numel(), 0.8)
    assert checker.checked_steps


def test_gradient_criteria_accumulate_real_gradients_only_inside_the_window(fit):
    counts: dict[int, float] = {}

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            state = pruning.criterion_state.get("net.layers.0.weight", {})
            counts[trainer.global_step - 1] = float(state["count"]) if "count" in state else 0.0

    pruning = _pruning(criterion="fisher", start_step=20, end_step=40, update_every=10)
    fit([pruning, Recorder()])
    assert counts[5] == 0.0  # before start - update_every: nothing accumulated
    assert counts[15] == 6.0  # steps 10..15 accumulated
    assert counts[20] == 0.0  # reset right after the update at step 20
    assert counts[25] == 5.0
    assert counts[55] == 0.0  # after the end: reset and nothing more


def test_criterion_history_is_checkpointed_and_restored(tmp_path, digits):
    kwargs = {"criterion": "taylor", "start_step": 0, "end_step": 60, "update_every": 20}
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    full = _pruning(**kwargs)
    trainer = make_trainer(tmp_path, [full, every_epoch], max_steps=69, enable_checkpointing=True)
    module = make_module(seed=4)
    trainer.fit(module, datamodule=digits)
    state = torch.load(tmp_path / "ckpt" / "step=46.ckpt", weights_only=True)["callbacks"][full.state_key]
    assert float(state["criterion_state"]["net.layers.0.weight"]["count"]) == 5.0  # steps 41..45, after update 40

    resumed = _pruning(**kwargs)
    trainer = make_trainer(tmp_path, [resumed], max_steps=69)
    other = make_module(seed=8)
    trainer.fit(other, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "step=46.ckpt")
    assert all(torch.equal(resumed.store.masks[k], full.store.masks[k]) for k in full.store.masks)
    assert all(
        torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values(), strict=True)
    )


def test_sensitivity_allocation_measures_once_and_saves_the_ratios(fit):
    pruning = _pruning(final_sparsity=0.8, allocation="sensitivity", start_step=20, min_sparsity=0.3, max_sparsity=0.95)
    fit([pruning])
    assert pruning.sensitivities is not None and set(pruning.sensitivities) == set(pruning.store.params)
    per_layer = pruning.store.layer_sparsity()
    assert all(0.3 - 1e-9 <= s <= 0.95 + 1e-9 for s in per_layer.values())
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # not uniform
    total = pruning.store.numel()
    assert sum(int((~m).sum()) for m in pruning.store.masks.values()) == prune_count(total, 0.8)
    assert pruning.state_dict()["sensitivities"] == pruning.sensitivities
    # the least sensitive layer is the most pruned
    least = min(pruning.sensitivities, key=pruning.sensitivities.get)
    assert per_layer[least] == max(per_layer.values())


def test_layer_sparsity_overrides_and_keep_first_last(fit):
    pruning = _pruning(final_sparsity=0.8, keep_first=True, layer_sparsity={"net.layers.4.*": 0.5})
    fit([pruning])
    assert "net.layers.0.weight" not in pruning.store.params  # kept dense
    per_layer = pruning.store.layer_sparsity()
    assert per_layer["net.layers.4.weight"] == pytest.approx(0.5)
    total = pruning.store.numel()
    assert sum(int((~m).sum()) for m in pruning.store.masks.values()) == prune_count(total, 0.8)
    pruning = _pruning(keep_last=True)
    fit([pruning])
    assert list(pruning.store.params) == ["net.layers.0.weight", "net.layers.2.weight"]


def test_layer_sparsity_pattern_matching_nothing_fails_in_setup(fit):
    with pytest.raises(ValueError, match=r"`layer_sparsity` pattern 'head\.\*' matches no pruned parameter"):
        fit([_pruning(layer_sparsity={"head.*": 0.5})])


class GradientCorruptor(Callback):
    """Puts NaN / Inf into one gradient before the pruning callback reads it, at the given steps."""

    def __init__(self, steps: set[int], value: float) -> None:
        self.steps, self.value = steps, value

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            pl_module.net.layers[0].weight.grad[0, 0] = self.value


class GradientRepair(Callback):
    """After the pruning callback: keep the injected value out of the optimizer (the test is about masks)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.net.layers[0].weight.grad
        grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scores_skip_the_update_and_retry_at_the_next(fit, value):
    pruning = _pruning(criterion="taylor", start_step=10, end_step=40, update_every=10)
    seen: dict[int, float] = {}

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step - 1] = pruning.store.sparsity()

    with pytest.warns(UserWarning, match=r"NaN or Inf in the scores of \['net.layers.0.weight'\] at step 20"):
        fit([GradientCorruptor({20}, value), pruning, GradientRepair(), Recorder()])
    assert seen[20] == seen[19]  # skipped: masks unchanged
    assert seen[30] > seen[20]  # retried at the next update step
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=0.01)
    assert all(torch.isfinite(m.float()).all() for m in pruning.store.masks.values())


class GroupsAndScheduler(Classifier):
    """Two parameter groups (no weight decay on biases) and a per-step LR scheduler."""

    def __init__(self):
        super().__init__(MLP(64, (32, 32), 10))

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=60)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_param_groups_and_lr_scheduler(fit):
    pl.seed_everything(0, verbose=False)
    pruning = _pruning()
    checker = ZeroChecker(pruning)
    fit([pruning, checker], module=GroupsAndScheduler())
    assert len(checker.checked_steps) >= 50 and pruning._remask_after_step is False


class ManualOptimization(Classifier):
    def __init__(self):
        super().__init__(MLP(64, (32, 32), 10))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_is_supported_by_remasking(fit):
    pl.seed_everything(0, verbose=False)
    pruning = _pruning()
    checker = ZeroChecker(pruning)
    fit([pruning, checker], module=ManualOptimization())
    assert pruning._remask_after_step is True  # no guarantee about what a manual loop does: re-mask
    assert len(checker.checked_steps) >= 50
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=0.01)


def test_manual_optimization_with_a_gradient_criterion_is_refused_before_training(fit):
    with pytest.raises(ValueError, match="criterion='taylor' reads gradients"):
        fit([_pruning(criterion="taylor")], module=ManualOptimization())


def test_torch_compile_of_the_network(fit):
    """No hooks and no reparametrisation: a compiled network trains and prunes like an eager one."""
    module = make_module()
    module.net = torch.compile(module.net, backend="aot_eager")
    pruning = _pruning()
    checker = ZeroChecker(pruning)
    fit([pruning, checker], module=module, max_steps=45)
    assert next(iter(pruning.store.params)) == "net._orig_mod.layers.0.weight"
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=0.01)
    assert checker.checked_steps


def test_two_four_pattern_ends_with_exactly_two_of_every_four(fit):
    seen: dict[int, float] = {}

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step - 1] = pruning.store.sparsity()

    pruning = GradualPruning(pattern="2:4", schedule="linear", start_step=0, end_step=40, update_every=10)
    assert pruning.final_sparsity == 0.5
    checker = ZeroChecker(pruning)
    fit([pruning, checker, Recorder()])
    for name, param in pruning.store.params.items():
        groups = (param.detach() != 0).reshape(param.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all(), name
        assert (pruning.store.masks[name].reshape(param.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert seen[10] == pytest.approx(0.0) and seen[20] == pytest.approx(0.25) and seen[40] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "4:2"}, "did you mean '2:4'?"),
        ({"pattern": "2:4", "final_sparsity": 0.9}, "pattern='2:4' reaches sparsity 0.5, but got final_sparsity=0.9"),
        ({"pattern": "2:4", "allocation": "global"}, "use allocation='uniform', not 'global'"),
        ({"pattern": "2:4", "drop_fraction": 0.1}, "would break the '2:4' pattern"),
    ],
)
def test_bad_nm_arguments_fail_at_construction(kwargs, message):
    options = {"start_step": 0, "end_step": 100} | kwargs
    with pytest.raises(ValueError) as excinfo:
        GradualPruning(**options)
    assert message in str(excinfo.value)


def test_nm_pattern_on_a_layer_with_incompatible_rows_fails_in_setup(tmp_path, digits):
    from pat_callbacks.app.models import ConvBase

    with pytest.raises(ValueError, match=r"'net\.conv1\.weight' has shape \(25, 1, 5\); exclude it"):
        make_trainer(tmp_path, [GradualPruning(pattern="2:4", start_step=0, end_step=10)]).fit(
            Classifier(ConvBase()), datamodule=digits
        )


def test_block_pattern_reaches_the_target_in_whole_blocks(fit):
    pruning = GradualPruning(
        final_sparsity=0.75,
        pattern="block:4x4",
        start_step=0,
        end_step=20,
        update_every=10,
        exclude=["net.layers.4.*"],
        criterion="magnitude",
        allocation="uniform",
    )
    checker = ZeroChecker(pruning)
    fit([pruning, checker])
    for name, mask in pruning.store.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        blocks = rows.reshape(rows.shape[0] // 4, 4, rows.shape[1] // 4, 4).sum(dim=(1, 3))
        assert set(blocks.flatten().tolist()) <= {0, 16}, name
        assert float((blocks == 0).float().mean()) == pytest.approx(0.75, abs=1 / blocks.numel()), name


# ----------------------------------------------------------------------------------------- one vocabulary, defaults
def test_sparsity_is_the_target_and_final_sparsity_its_accepted_former_name():
    window = {"start_step": 0, "end_step": 40, "update_every": 10}
    assert GradualPruning(sparsity=0.7, **window).sparsity == 0.7
    assert GradualPruning(0.7, **window).final_sparsity == 0.7  # positional: the target
    with pytest.warns(DeprecationWarning, match="`final_sparsity` is now called `sparsity`"):
        former = GradualPruning(final_sparsity=0.7, **window)
    assert former.sparsity == 0.7
    assert former.state_key == GradualPruning(sparsity=0.7, **window).state_key  # old checkpoints still resume
    assert former.state_key == "GradualPruning{'final_sparsity': 0.7, 'schedule': 'cubic'}"
    with pytest.raises(ValueError, match=r"`sparsity` \(the new name of `final_sparsity`\), not both: got 0.9 and 0.8"):
        GradualPruning(sparsity=0.9, final_sparsity=0.8, **window)
    with pytest.raises(ValueError, match=r"Expected `sparsity` to be a float in \[0, 1\), but got 1.5"):
        GradualPruning(sparsity=1.5, **window)
    with pytest.raises(ValueError, match=r"`sparsity` is required with a named schedule"):
        GradualPruning(**window)


def test_defaults_are_the_best_measured_configuration_taylor_and_global():
    pruning = GradualPruning(sparsity=0.9)
    assert (pruning.criterion.name, pruning.allocation) == ("taylor", "global")
    assert pruning.method_name == "cubic/taylor/global"
    assert GradualPruning(pattern="2:4").allocation == "uniform"  # N:M fixes every layer's sparsity


def test_default_pruning_reaches_the_target_overall_with_layers_pruned_unevenly(fit):
    pruning = GradualPruning(sparsity=0.8, start_step=5, end_step=40, update_every=5)
    fit([pruning, ZeroChecker(pruning)])
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=1e-3)
    assert len({round(v, 3) for v in pruning.store.layer_sparsity().values()}) > 1


def test_a_window_with_fewer_than_three_updates_is_warned_about(fit):
    pruning = _pruning(start_step=5, end_step=40, update_every=100)
    with pytest.warns(
        UserWarning, match=r"\(steps 5 to 40\) raises the target in 1 mask update.*update_every=3 or less"
    ):
        fit([pruning])
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=0.01)


# ------------------------------------------------------------------------------------- lottery-ticket rewinding
class WeightRecorder(Callback):
    """Weights and Adam state of the pruned parameters after the optimizer step of the given steps."""

    def __init__(self, pruning: GradualPruning, steps: set[int]) -> None:
        self.pruning, self.steps, self.weights, self.state = pruning, steps, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            params = self.pruning.store.params
            self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in params.items()}
            optimizer = trainer.optimizers[0]
            self.state[trainer.global_step] = {n: optimizer.state[p]["exp_avg"].clone() for n, p in params.items()}


def test_rewinding_resets_surviving_weights_to_their_values_at_rewind_step(fit):
    pl.seed_everything(0, verbose=False)
    pruning = _pruning(start_step=10, end_step=40, rewind_step=5)
    recorder = WeightRecorder(pruning, {5, 41, 45})
    fit([pruning, recorder], max_steps=45)
    assert pruning.rewound_at_step == 41  # right after the optimizer step of the last update (end_step=40)
    snapshot, rewound = recorder.weights[5], recorder.weights[41]
    for name, mask in pruning.store.masks.items():
        assert torch.equal(rewound[name][mask], snapshot[name][mask]), name  # survivors: back to step 5
        assert (rewound[name][~mask] == 0).all(), name
        assert (recorder.state[41][name] == 0).all(), name  # the moments of the left-behind weights are gone
        assert not torch.equal(recorder.weights[45][name], rewound[name])  # and it trains on from there
    assert pruning.store.sparsity() == pytest.approx(0.8, abs=0.01)


def test_rewinding_is_checked_and_kept_in_the_checkpoint(fit, tmp_path):
    with pytest.raises(ValueError, match=r"`rewind_step` before the end of the pruning window \(end_step=40\)"):
        fit([_pruning(rewind_step=40)])
    with pytest.raises(ValueError, match="Expected `rewind_step` to be an integer >= 0, but got -1"):
        _pruning(rewind_step=-1)
    pruning = _pruning(rewind_step=5)
    fit([pruning], max_steps=20)
    state = pruning.state_dict()
    assert set(state["rewind_to"]) == set(pruning.store.params) and state["rewind_pending"] is False
    resumed = _pruning(rewind_step=5)
    resumed.load_state_dict(copy.deepcopy(state))
    assert all(torch.equal(resumed._rewind_to[n], v) for n, v in state["rewind_to"].items())


def test_the_former_name_regrow_fraction_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="`regrow_fraction` is now called `drop_fraction`"):
        pruning = GradualPruning(sparsity=0.8, regrow_fraction=0.1, start_step=0, end_step=10)
    assert pruning.drop_fraction == pruning.regrow_fraction == 0.1
