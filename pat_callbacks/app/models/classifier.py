"""A small classification LightningModule: cross-entropy, accuracy, a named optimizer.

Example:
    >>> from pat_callbacks.app.models import ConvBase
    >>> module = Classifier(ConvBase(), optimizer="adam", lr=1e-2)
    >>> type(module.configure_optimizers()).__name__
    'Adam'
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from pat_callbacks.core._validation import check_choice, check_number, check_positive

__all__ = ["OPTIMIZERS", "Classifier"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class Classifier(pl.LightningModule):
    """Wraps any ``net`` mapping inputs to class logits.

    Args:
        net: the network (its parameters are what the pruning callbacks see, under the ``net.`` prefix).
        num_classes: number of classes, for the accuracy metric.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) weight decay.
        momentum: SGD momentum.

    Example:
        >>> import torch
        >>> from pat_callbacks.app.models import MLP
        >>> Classifier(MLP(64, (16,), 10))(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_positive("lr", lr)
        check_number("weight_decay", weight_decay)
        check_number("momentum", momentum)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(y))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer == "sgd":
            kwargs["momentum"] = hp.momentum
        return OPTIMIZERS[hp.optimizer](self.parameters(), **kwargs)
