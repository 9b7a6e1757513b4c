from __future__ import annotations

import itertools

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pat_callbacks import DynamicSparseTraining
from pat_callbacks.core.patterns import prune_count
from tests.conftest import make_module, make_trainer


class MaskHistory(Callback):
    """Masks before every optimizer step (placed after the DST callback, so after its update)."""

    def __init__(self, dst: DynamicSparseTraining) -> None:
        self.dst = dst
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.regrown_checks = 0

    def on_train_start(self, trainer, pl_module):
        self.masks[-1] = {k: v.clone() for k, v in self.dst.store.masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        previous = self.masks[max(self.masks)]
        current = {k: v.clone() for k, v in self.dst.store.masks.items()}
        self.masks[step] = current
        if self.dst.last_update_step != step:
            return
        for name, mask in current.items():
            regrown = mask & ~previous[name]
            param = self.dst.store.params[name]
            assert (param.detach()[regrown] == 0).all(), "regrown weights must start at zero"
            for value in optimizer.state[param].values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert (value[regrown] == 0).all(), "optimizer state of regrown weights must be zero"
            self.regrown_checks += int(regrown.sum())


def _dst(**kwargs) -> DynamicSparseTraining:
    options = {"sparsity": 0.8, "regrowth": "rigl", "update_every": 10, "drop_fraction": 0.3, "end_step": 50}
    options.update(kwargs)
    return DynamicSparseTraining(**options)


@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize("allocation", ["erk", "uniform"])
def test_sparsity_is_constant_per_layer_and_drops_equal_regrowths(fit, method, allocation):
    dst = _dst(regrowth=method, allocation=allocation)
    history = MaskHistory(dst)
    fit([dst, history], module=make_module(optimizer="adam"))
    steps = sorted(history.masks)
    initial = history.masks[-1]
    for name, mask in initial.items():
        expected_active = int(mask.sum())
        for step in steps:
            assert int(history.masks[step][name].sum()) == expected_active, (name, step)
    total = sum(m.numel() for m in initial.values())
    kept = sum(int(m.sum()) for m in initial.values())
    if allocation == "erk":
        assert total - kept == prune_count(total, 0.8)  # the global target, to the weight
    else:
        assert all(int((~m).sum()) == prune_count(m.numel(), 0.8) for m in initial.values())  # every layer
    changed_steps = [
        s
        for p, s in itertools.pairwise(steps)
        if any(not torch.equal(history.masks[p][n], history.masks[s][n]) for n in initial)
    ]
    assert changed_steps == [10, 20, 30, 40]  # every update_every steps until stop_step
    assert history.regrown_checks > 0
    assert dst._extra_metrics["pruning/dropped"] == dst._extra_metrics["pruning/regrown"] > 0


def test_static_mask_never_changes_and_weights_stay_zero(fit):
    dst = _dst(regrowth="static")
    history = MaskHistory(dst)
    _trainer, _module = fit([dst, history])
    first = history.masks[-1]
    assert all(torch.equal(history.masks[s][n], first[n]) for s in history.masks for n in first)
    for name, mask in dst.store.masks.items():
        assert (dst.store.params[name].detach()[~mask] == 0).all()


def test_sgd_momentum_buffers_of_regrown_weights_are_zero(fit):
    dst = _dst(regrowth="set")
    history = MaskHistory(dst)
    fit([dst, history], module=make_module(optimizer="sgd", lr=0.05))
    assert history.regrown_checks > 0


def test_same_seed_gives_identical_masks(fit):
    runs = []
    for _ in range(2):
        dst = _dst(regrowth="set", seed=7)
        fit([dst], module=make_module(seed=1))
        runs.append({k: v.clone() for k, v in dst.store.masks.items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    dst = _dst(regrowth="set", seed=8)
    fit([dst], module=make_module(seed=1))
    assert any(not torch.equal(runs[0][k], dst.store.masks[k]) for k in runs[0])


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_resume_between_updates_gives_the_same_masks(tmp_path, digits, method):
    kwargs = {"regrowth": method, "end_step": 60, "update_every": 10}
    full = _dst(**kwargs)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, [full, every_epoch], max_steps=69, enable_checkpointing=True)
    module = make_module(seed=2)
    trainer.fit(module, datamodule=digits)

    resumed = _dst(**kwargs)
    trainer = make_trainer(tmp_path, [resumed], max_steps=69)
    other = make_module(seed=5)
    trainer.fit(other, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "step=23.ckpt")  # between updates 20, 30
    assert all(torch.equal(resumed.store.masks[k], full.store.masks[k]) for k in full.store.masks)
    assert all(
        torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "`sparsity` to be a float in [0, 1), but got 1.0"),
        ({"regrowth": "snip"}, "Unknown `regrowth` 'snip'; expected one of: 'rigl', 'set', 'static'"),
        ({"drop_fraction": 1.5}, "`drop_fraction` to be a float in [0, 1], but got 1.5"),
        ({"update_every": 0}, "`update_every` to be an integer >= 1, but got 0"),
        ({"decay": "cos"}, "Unknown `decay` 'cos'"),
        ({"allocation": "global"}, "`allocation` to be one of 'erk', 'er', 'uniform' (DST's initial mask is random"),
        ({"allocation": "erk2"}, "but got 'erk2'"),
        ({"stop_fraction": -0.5}, "`stop_fraction` to be a float in [0, 1], but got -0.5"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        _dst(**kwargs)
    assert message in str(excinfo.value)


def test_end_step_and_end_fraction_are_the_window_words_and_the_former_names_still_work():
    from types import SimpleNamespace

    run = SimpleNamespace(estimated_stepping_batches=200)
    new = DynamicSparseTraining(sparsity=0.8, end_fraction=0.5)
    with pytest.warns(DeprecationWarning, match="`stop_fraction` is now called `end_fraction`"):
        old = DynamicSparseTraining(sparsity=0.8, stop_fraction=0.5)
    for dst in (new, old):
        dst._resolve(run)
        assert (dst.end_fraction, dst.stop_fraction, dst._resolved_end_step) == (0.5, 0.5, 100)
    with pytest.warns(DeprecationWarning, match="`stop_step` is now called `end_step`"):
        old = DynamicSparseTraining(sparsity=0.8, stop_step=30)
    assert (old.end_step, old.stop_step) == (30, 30) == (_dst(end_step=30, stop_step=None).end_step, 30)
    with pytest.raises(ValueError, match="Give `end_step` \\(the new name of `stop_step`\\), not both"):
        DynamicSparseTraining(sparsity=0.8, end_step=20, stop_step=30)
    with pytest.raises(ValueError, match="`end_step` to be an integer >= 0, but got -1"):
        DynamicSparseTraining(sparsity=0.8, end_step=-1)


def test_non_finite_gradients_skip_the_rigl_update(fit):
    from tests.callbacks.test_gradual import GradientCorruptor, GradientRepair

    dst = _dst(regrowth="rigl")
    history = MaskHistory(dst)
    with pytest.warns(UserWarning, match="mask update is skipped"):
        fit([GradientCorruptor({20}, float("nan")), dst, GradientRepair(), history])
    assert all(torch.equal(history.masks[20][n], history.masks[19][n]) for n in history.masks[19])
    assert any(not torch.equal(history.masks[30][n], history.masks[29][n]) for n in history.masks[29])


def test_method_is_the_former_name_of_regrowth():
    with pytest.warns(DeprecationWarning, match="`method` is now called `regrowth`"):
        old = DynamicSparseTraining(sparsity=0.8, method="set")
    assert old.regrowth == "set" and old.method_name == "set/erk"
    with pytest.raises(ValueError, match="Give `regrowth` \\(the new name of `method`\\), not both"):
        DynamicSparseTraining(sparsity=0.8, regrowth="static", method="set")
