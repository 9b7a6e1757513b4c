"""Tiny, seeded Lightning setups on scikit-learn's digits (ships offline; ~23 steps per epoch at batch 64)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.app.models import MLP, Classifier

torch.set_num_threads(1)


def make_module(seed: int = 0, optimizer: str = "adam", lr: float = 1e-2, **kwargs: Any) -> Classifier:
    pl.seed_everything(seed, verbose=False)
    return Classifier(MLP(64, (32, 32), 10), optimizer=optimizer, lr=lr, **kwargs)


def make_trainer(tmp_path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_steps": 60,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


@pytest.fixture
def fit(tmp_path, digits) -> Callable[..., tuple[pl.Trainer, Classifier]]:
    """fit(callbacks, module=None, **trainer_kwargs) -> (trainer, module)."""

    def _fit(callbacks: list, module: Classifier | None = None, **kwargs: Any) -> tuple[pl.Trainer, Classifier]:
        module = module if module is not None else make_module()
        trainer = make_trainer(tmp_path, callbacks, **kwargs)
        trainer.fit(module, datamodule=digits)
        return trainer, module

    return _fit
