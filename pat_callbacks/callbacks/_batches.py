"""What the callbacks that run batches themselves run them through: the module's network, the default loss of the
sensitivity probe, the default calibration forward; and the batches, from a Trainer's loaders on the module's
device."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


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


def network_of(pl_module: pl.LightningModule, ignore: Collection[int] = ()) -> nn.Module:
    """The module that computes ``pl_module``'s outputs: ``pl_module`` itself when it defines ``forward``, else its
    one child module with parameters (``self.net`` of a module whose ``training_step`` calls ``self.net(x)``);
    ``ignore``: ids of parameters that are not the network's (a teacher held by the module).

    Example:
        >>> class Wrapper(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 2)
        >>> type(network_of(Wrapper())).__name__
        'Linear'
    """
    if type(pl_module).forward is not pl.LightningModule.forward:
        return pl_module
    children = [
        (name, child)
        for name, child in pl_module.named_children()
        if any(id(p) not in ignore for p in child.parameters())
    ]
    if len(children) != 1:
        raise ValueError(
            f"Cannot tell which module of {type(pl_module).__name__} is the network: it defines no forward and has "
            f"{len(children)} child modules with parameters ({', '.join(name for name, _ in children) or 'none'})"
        )
    return children[0][1]


def calibration_forward(pl_module: pl.LightningModule, batch: Any) -> Any:
    """One-shot calibration's default forward: activations only, no loss and no labels. A mapping batch (a Hugging
    Face ``BatchEncoding``) goes in as keywords, ``labels`` left out; a module that defines a ``loss(batch)``
    method (``LanguageModel``, which knows its inputs) runs it; otherwise the inputs of an ``(x, y, ...)`` batch (or
    the batch itself) go through :func:`network_of`.

    Example:
        >>> class Regression(pl.LightningModule):   # an MSE model: its float targets are never read
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(3, 1)
        >>> tuple(calibration_forward(Regression(), (torch.ones(4, 3), torch.rand(4, 1))).shape)
        (4, 1)
    """
    if isinstance(batch, Mapping):
        return network_of(pl_module)(**{key: value for key, value in batch.items() if key != "labels"})
    loss = getattr(type(pl_module), "loss", None)
    if callable(loss) and not isinstance(getattr(pl_module, "loss", None), nn.Module):
        return pl_module.loss(batch)
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return network_of(pl_module)(inputs)


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
