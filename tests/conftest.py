"""Tiny, seeded Lightning setups on scikit-learn's digits (ships offline; ~23 steps per epoch at batch 64)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.app.models import MLP, Classifier
from pat_callbacks.core.allocation import ALLOCATIONS
from pat_callbacks.core.criteria import CRITERIA
from pat_callbacks.core.schedules import SCHEDULES
from pat_callbacks.oneshot import ONE_SHOT_METHODS
from pat_callbacks.structured.importance import STRUCTURED_IMPORTANCES

REGISTRIES = (CRITERIA, SCHEDULES, ALLOCATIONS, STRUCTURED_IMPORTANCES, ONE_SHOT_METHODS)


@pytest.fixture(autouse=True)
def _registries_as_shipped():
    """What a test (or a documented example it runs) registers is removed after it, so the names every other test
    and doctest lists are the shipped ones, whatever the order."""
    before = [set(registry.names()) for registry in REGISTRIES]
    yield
    for registry, names in zip(REGISTRIES, before, strict=True):
        for name in set(registry.names()) - names:
            del registry[name]


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


# Rank variables earlier in-process DDP tests leave in os.environ: with them a worker would not launch its ranks.
_LAUNCH_VARIABLES = {
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
}
_GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_gloo_worker(module: str, *args: str, before_attempt: Callable[[], None] | None = None) -> None:
    """Run ``python -m module args`` (a 2-rank gloo worker) from the repository root, without launch variables;
    fail with its output unless it exits 0. gloo's threads can abort at interpreter exit after the work is done
    (``terminate called without an active exception``): then it runs once more; any other failure fails at once.
    ``before_attempt`` runs before each attempt (e.g. to remove the last attempt's rendezvous file)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("PL_")}
    root = Path(__file__).resolve().parents[1]
    for _attempt in range(2):
        if before_attempt is not None:
            before_attempt()
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode == 0 or _GLOO_EXIT_ABORT not in done.stdout + done.stderr:
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
