"""Distillation and QAT under DDP (2 CPU processes, gloo, ddp_fork): ranks agree, zeros exact, KD in the loss."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from pat_callbacks import Distillation, GradualPruning, QuantizationAwareTraining
from tests.conftest import make_module, make_trainer


class RankAgreement(Callback):
    """At the end of fit: every rank holds the same weights, pruned entries zero, and distilled (loss > 0)."""

    def __init__(self, pruning, distill) -> None:
        self.pruning, self.distill = pruning, distill

    def on_train_end(self, trainer, pl_module):
        kd = trainer.callback_metrics.get("distill/loss")
        if kd is None or not float(kd) > 0:
            raise AssertionError(f"no distillation loss on rank {trainer.global_rank}: {kd}")
        for name, mask in self.pruning.store.masks.items():
            weight = self.pruning.store.params[name].detach()
            if not bool((weight[~mask] == 0).all()):
                raise AssertionError(f"{name}: pruned weights non-zero on rank {trainer.global_rank}")
            gathered = trainer.strategy.all_gather(weight)
            if not torch.equal(gathered[0], gathered[1]):
                raise AssertionError(f"ranks disagree on {name}")


def test_distillation_and_qat_under_ddp(tmp_path, digits):
    pruning = GradualPruning(sparsity=0.8, start_step=2, end_step=10, update_every=2, verbose=False)
    distill = Distillation(temperature=2.0)
    qat = QuantizationAwareTraining(bits=8, start_step=10)
    trainer = make_trainer(
        tmp_path,
        [pruning, distill, qat, RankAgreement(pruning, distill)],
        strategy="ddp_fork",
        devices=2,
        max_steps=14,
        deterministic=False,
    )
    trainer.fit(make_module(), datamodule=digits)  # a disagreement raises inside the workers
