"""KeepSparsity: fine-tune a pruned model without losing its zeros (SparseML's constant pruning modifier)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
from typing_extensions import override

from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core.pruner import Pruner, PruningOptions

__all__ = ["KeepSparsity"]


class KeepSparsity(PruningCallback):
    """Keep the exact zeros a model has when training starts: masks are taken from the weights (``w == 0`` is
    pruned) and never change, so pruned weights stay exactly zero while the others are fine-tuned.

    Use it to fine-tune a pruned checkpoint (load the model from it, then fit with this callback). Without a
    callback the zeros are lost within a few steps; a new ``GradualPruning`` or ``DynamicSparseTraining`` would
    prune again from scratch. A run resumed from a checkpoint of this callback restores its masks.

    Args:
        include, exclude, keep_first, keep_last, allow_vectors: which weights are held at their zeros (see
            :class:`~pat_callbacks.core.pruner.PruningOptions`; default: the weights of Linear / Conv layers).
        remask_weights, log_per_layer, prog_bar, verbose: see :class:`~pat_callbacks.callbacks.base.PruningCallback`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning import Trainer
        >>> from pat_callbacks.app.models import MLP, Classifier
        >>> from pat_callbacks.app.data import DigitsDataModule
        >>> torch.manual_seed(0) and None
        >>> model = Classifier(MLP(64, (32,), 10))            # e.g. Classifier.load_from_checkpoint("pruned.ckpt")
        >>> with torch.no_grad():                             # stand-in for a pruned checkpoint: 80% exact zeros
        ...     _ = model.net.layers[0].weight.mul_(torch.rand(32, 64) > 0.8)
        >>> keep = KeepSparsity(include="net.layers.0.weight", verbose=False)
        >>> trainer = Trainer(callbacks=[keep], max_steps=10, logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
        >>> zeros = float((model.net.layers[0].weight == 0).float().mean())
        >>> round(zeros, 4) == round(keep.store.sparsity(), 4) and zeros > 0.75
        True
    """

    def __init__(
        self,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        allow_vectors: bool = False,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__(remask_weights=remask_weights, log_per_layer=log_per_layer, prog_bar=prog_bar, verbose=verbose)
        self.options = PruningOptions(
            include=include, exclude=exclude, keep_first=keep_first, keep_last=keep_last, allow_vectors=allow_vectors
        )
        self.method_name = "keep"

    @property
    def final_sparsity(self) -> float:
        """The sparsity held (known once training started)."""
        return self.target_sparsity

    @override
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        return Pruner(pl_module, self.options)

    @override
    def _resolve(self, trainer: pl.Trainer) -> None:
        pass

    @override
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        return False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        pruner = self._require_pruner()
        if not pruner.masks:  # a fresh run (a resumed one restored its masks)
            pruner.set_masks(
                {name: p.detach() != 0 for name, p in pruner.params.items()}, optimizers=trainer.optimizers
            )
            pruner.target_sparsity = pruner.sparsity()
            self.last_update_step = trainer.global_step
            self._refresh_sparsity()
