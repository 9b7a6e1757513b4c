"""The callbacks are usable from a LightningCLI YAML (trainer.callbacks with class_path / init_args)."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from pat_callbacks import DynamicSparseTraining, GradualPruning
from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.app.models import Classifier

CALLBACKS = {
    "gradual": {
        "class_path": "pat_callbacks.GradualPruning",
        "init_args": {
            "final_sparsity": 0.7,
            "schedule": "cubic",
            "start_step": 0,
            "end_step": 10,
            "update_every": 5,
            "criterion": "taylor",
            "exclude": ["net.layers.4.*"],
        },
    },
    "dynamic": {
        "class_path": "pat_callbacks.DynamicSparseTraining",
        "init_args": {"sparsity": 0.7, "method": "set", "update_every": 5, "stop_step": 15, "allocation": "erk"},
    },
}


@pytest.mark.parametrize("callback", sorted(CALLBACKS))
def test_lightning_cli_yaml_with_a_pruning_callback(tmp_path, callback):
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 20,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [CALLBACKS[callback]],
        },
        "model": {
            "net": {
                "class_path": "pat_callbacks.app.models.MLP",
                "init_args": {"in_features": 64, "hidden_sizes": [32, 32]},
            },
            "lr": 0.01,
        },
        "data": {"batch_size": 64},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(Classifier, DigitsDataModule, args=["fit", "--config", str(path)], save_config_callback=None)
    pruning = next(c for c in cli.trainer.callbacks if isinstance(c, (GradualPruning, DynamicSparseTraining)))
    assert cli.trainer.global_step == 20
    assert pruning.store.sparsity() == pytest.approx(0.7, abs=0.01)
    if callback == "gradual":
        assert pruning.criterion.name == "taylor" and "net.layers.4.weight" not in pruning.store.params


def test_lightning_cli_reports_a_bad_value_before_training(tmp_path):
    bad = {"class_path": "pat_callbacks.GradualPruning", "init_args": {"final_sparsity": 1.5}}
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {"callbacks": [bad], "max_steps": 5},
                "model": {"net": {"class_path": "pat_callbacks.app.models.MLP", "init_args": {"in_features": 64}}},
            }
        )
    )
    with pytest.raises(ValueError, match=r"`final_sparsity` to be a float in \[0, 1\), but got 1.5"):
        LightningCLI(Classifier, DigitsDataModule, args=["fit", "--config", str(path)], save_config_callback=None)
