"""Batches for the sensitivity probe: from a Trainer's loaders, on the module's device."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


def probe_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` validation batches (training batches if the run has none), on the module's device."""
    loader = first_nonempty(trainer.val_dataloaders, trainer.train_dataloader)
    if loader is None:
        raise RuntimeError("allocation='sensitivity' needs a validation or training dataloader to probe")
    pl_module = trainer.lightning_module
    batches = []
    for batch in loader:
        batches.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
        if len(batches) == count:
            break
    return batches


def cross_entropy(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The module's own ``loss(batch)`` if it has one (e.g. LanguageModel), else cross-entropy of ``(x, y)``."""
    if callable(getattr(pl_module, "loss", None)):
        return pl_module.loss(batch)
    inputs, targets = batch[0], batch[1]
    return torch.nn.functional.cross_entropy(pl_module(inputs), targets)


def first_nonempty(*loaders: Any) -> Any:
    for loader in loaders:
        if isinstance(loader, (list, tuple)):
            loader = next((item for item in loader if item is not None), None)
        if loader is not None:
            try:
                if len(loader) == 0:
                    continue
            except TypeError:
                pass
            return loader
    return None
