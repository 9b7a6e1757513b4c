"""A progress bar for step-limited runs: ``step/max_steps`` and the current sparsity, one bar for the whole fit.

Lightning's ``TQDMProgressBar`` counts batches per epoch and titles the bar ``Epoch N/max_epochs``, which a run
limited by ``max_steps`` (``max_epochs=-1``) shows as ``Epoch 149/-2``. :class:`StepProgressBar` counts optimizer
steps instead, up to ``max_steps`` (else the estimated total), and keeps the pruning callbacks' ``pruning/sparsity``
next to the loss in its postfix (they log it with ``prog_bar=True``). Validation and test bars are Lightning's own.

Example:
    >>> import lightning.pytorch as pl
    >>> bar = StepProgressBar(refresh_rate=50)
    >>> trainer = pl.Trainer(max_steps=6000, callbacks=[bar], logger=False, enable_checkpointing=False)
    >>> bar.train_description, bar.refresh_rate
    ('Step', 50)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """One training bar over the whole run, counting optimizer steps to ``max_steps``.

    Args:
        refresh_rate: redraw every this many optimizer steps (default 50).
        leave: keep the finished bar on screen (default ``True``).

    Example:
        >>> bar = StepProgressBar(refresh_rate=10)
        >>> bar.train_description, bar.refresh_rate
        ('Step', 10)
    """

    def __init__(self, refresh_rate: int = 50, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self._keep = leave

    @property
    @override
    def train_description(self) -> str:
        return "Step"

    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    @override
    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.leave = self._keep
        self.train_progress_bar.reset(total=self._total_steps(trainer))
        self.train_progress_bar.initial = 0
        self.train_progress_bar.n = int(trainer.global_step)  # a resumed run starts where it stopped
        self.train_progress_bar.set_description(self.train_description)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: nothing restarts at an epoch boundary

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = int(trainer.global_step)
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws the bar

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = int(trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.close()

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        sparsity = metrics.pop("pruning/sparsity", None)
        if sparsity is not None:
            metrics["sparsity"] = f"{float(sparsity):.3f}"
        return metrics
