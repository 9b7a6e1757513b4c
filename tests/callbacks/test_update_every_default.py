"""The default ``update_every`` on a short run: a window resolved from the run's length that the default of 100
steps would cover in fewer than 3 mask updates gets about 10 (one info line, no warning); an explicit
``update_every`` is kept and warned about; the README demo's window (6,000 steps) keeps 100."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from pat_callbacks import GradualPruning
from pat_callbacks.app.config import register_configs
from pat_callbacks.app.run import CONF_DIR
from pat_callbacks.callbacks.scheduled import default_update_every
from tests.conftest import make_module, make_trainer

register_configs()


class _Sparsities(pl.Callback):
    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(round(self.pruning.pruner.sparsity(), 6))


def test_a_short_run_with_the_default_gets_about_ten_updates_and_no_warning(fit, caplog):
    pruning = GradualPruning(sparsity=0.9)
    sparsities = _Sparsities(pruning)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.filterwarnings("error", message=".*mask update.*")
        fit([pruning, sparsities], max_steps=60)
    schedule = pruning.schedule
    assert (schedule.start_step, schedule.end_step, schedule.update_every) == (5, 41, 3)  # 10% to 70% of 60
    raises = sum(1 for before, after in zip([0.0, *sparsities.seen], sparsities.seen, strict=False) if after > before)
    assert 10 <= raises <= 13, sparsities.seen
    assert sparsities.seen[-1] == pytest.approx(0.9, abs=1e-3)
    assert "update_every=3 (not the default 100): about 10 mask updates" in caplog.text


def test_an_explicit_update_every_that_is_too_coarse_still_warns(fit):
    pruning = GradualPruning(sparsity=0.9, update_every=100)
    with pytest.warns(UserWarning, match=r"window \(steps 5 to 41\).*update_every=100.*single jump.*update_every=3 "):
        fit([pruning], max_steps=60)
    assert pruning.schedule.update_every == 100


def test_a_window_given_in_steps_is_kept_as_given_and_warned_about(fit):
    pruning = GradualPruning(sparsity=0.9, start_step=5, end_step=41)
    with pytest.warns(UserWarning, match=r"single jump"):
        fit([pruning], max_steps=60)
    assert pruning.schedule.update_every == 100


def test_the_demo_window_keeps_its_update_every():
    # make demo: 6,000 steps, the default window 599 to 4199, the default 100: 36 raises of the target
    schedule = GradualPruning(sparsity=0.9).spec.resolve(steps_per_epoch=100, total_steps=6000)
    assert default_update_every(schedule) is schedule
    assert (schedule.start_step, schedule.end_step, schedule.update_every) == (599, 4199, 100)
    assert len(schedule.update_steps()) == 37
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+pruning=cubic", "pruning.sparsity=0.9"])
    assert instantiate(cfg.pruning).spec.resolve(steps_per_epoch=100, total_steps=6000) == schedule


def _state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_resumed_run_resolves_the_same_update_every_and_ends_bit_for_bit(tmp_path, digits):
    """The resolved value is derived from the window: a run resumed from the middle checkpoint (step 46 of 69,
    inside the window) resolves it again to the same value and ends with identical weights and masks."""
    full = GradualPruning(sparsity=0.8)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp_path, [full, every_epoch], max_steps=69, enable_checkpointing=True)
    module = make_module(seed=3)
    trainer.fit(module, datamodule=digits)
    expected, expected_masks = _state(module), copy.deepcopy(full.store.masks)
    assert full.schedule is not None and full.schedule.update_every < 100

    resumed = GradualPruning(sparsity=0.8)
    trainer = make_trainer(tmp_path, [resumed], max_steps=69)
    module = make_module(seed=99)  # different init: everything must come from the checkpoint
    trainer.fit(module, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "step=46.ckpt")
    assert resumed.schedule == full.schedule and trainer.global_step == 69
    got = _state(module)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(resumed.store.masks[k], expected_masks[k]) for k in expected_masks)
