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
    """Cross-entropy of ``pl_module(x)`` against ``y`` for an ``(x, y)`` batch.

    Example:
        >>> module = pl.LightningModule(); module.forward = lambda x: torch.zeros(len(x), 4)
        >>> round(float(cross_entropy(module, (torch.ones(2, 3), torch.tensor([0, 1])))), 4)  # log(4)
        1.3863
    """
    inputs, targets = batch[0], batch[1]
    return torch.nn.functional.cross_entropy(pl_module(inputs), targets)


def module_loss_or_cross_entropy(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The default loss of the callbacks that run batches themselves (the sensitivity probe, one-shot
    calibration): the module's own ``loss(batch)`` when it defines a callable ``loss`` (e.g. ``LanguageModel``),
    else :func:`cross_entropy` of an ``(x, y)`` batch. Pass ``loss_fn`` / ``forward`` to choose otherwise.

    Example:
        >>> module = pl.LightningModule(); module.loss = lambda batch: torch.tensor(0.5)
        >>> float(module_loss_or_cross_entropy(module, (torch.ones(2, 3), torch.tensor([0, 1]))))
        0.5
    """
    if callable(getattr(pl_module, "loss", None)):
        return pl_module.loss(batch)
    return cross_entropy(pl_module, batch)


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
