"""Masks and weights agree across DDP ranks (2 CPU processes, gloo, ddp_fork).

Agreement is by construction where it can be (DDP averages gradients before ``on_before_optimizer_step``, and
every generator is seeded identically), and enforced where it cannot: after each update, masks are broadcast
from rank 0. The rank-dependent criterion below would disagree without that broadcast.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from pat_callbacks import DynamicSparseTraining, GradualPruning
from pat_callbacks.core.criteria import Criterion
from tests.conftest import make_module, make_trainer


class RankDependentCriterion(Criterion):
    """Different random scores on every rank: the worst case for agreement."""

    name: ClassVar[str] = "rank_random"

    def score(self, param, grad, state):
        generator = torch.Generator().manual_seed(1000 + dist.get_rank())
        return torch.rand(param.shape, generator=generator) * (param.detach() != 0)


class AgreementChecker(Callback):
    """After every mask update, gather masks and weights from all ranks and require them to be equal."""

    def __init__(self, pruning) -> None:
        self.pruning = pruning
        self.updates = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.pruning.last_update_step != trainer.global_step:
            return
        self.updates += 1
        for name, mask in self.pruning.store.masks.items():
            masks = trainer.strategy.all_gather(mask.to(torch.uint8))
            weights = trainer.strategy.all_gather(self.pruning.store.params[name].detach())
            if not (torch.equal(masks[0], masks[1]) and torch.equal(weights[0], weights[1])):
                raise AssertionError(f"ranks disagree on {name} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module):
        if self.updates == 0:
            raise AssertionError("no mask update was checked")


PRUNERS: dict[str, Any] = {
    "rank_dependent_scores": lambda: GradualPruning(
        final_sparsity=0.8, start_step=0, end_step=20, update_every=5, criterion=RankDependentCriterion()
    ),
    "taylor_local_batches": lambda: GradualPruning(
        final_sparsity=0.8, start_step=0, end_step=20, update_every=5, criterion="taylor", allocation="global"
    ),
    "set_random_regrowth": lambda: DynamicSparseTraining(sparsity=0.8, regrowth="set", update_every=5, end_step=20),
}


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_ranks_hold_identical_masks_and_weights_after_every_update(tmp_path, digits, pruner):
    pruning = PRUNERS[pruner]()
    trainer = make_trainer(
        tmp_path,
        [pruning, AgreementChecker(pruning)],
        strategy="ddp_fork",
        devices=2,
        max_steps=25,
        deterministic=False,
    )
    trainer.fit(make_module(), datamodule=digits)  # a disagreement raises inside the workers
