"""FSDP2 runs on 2 CPU ranks (gloo, Lightning's ModelParallelStrategy), one process per rank.

``python -m tests.sharded_worker CASE OUT_DIR [RESUME_FROM]``: Lightning re-runs this command for rank 1. The model is
built in ``configure_model`` and every Linear is ``fully_shard``-ed, so the pruned parameters are DTensors sharded by
rows (one layer's rows split unevenly). After fit, rank 0 writes ``OUT_DIR/CASE.pt``: the *full* weights (gathered
only here, to check them), the masks as the callback reports them, and its reported sparsities.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from pat_callbacks import Distillation, DynamicSparseTraining, GradualPruning
from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core.sharding import gather_full

STEPS = 15  # three epochs of 5 steps per rank (digits at batch 144 on 2 ranks)

CASES: dict[str, Callable[[], PruningCallback]] = {
    "uniform": lambda: GradualPruning(
        sparsity=0.8, criterion="magnitude", allocation="uniform", start_step=0, end_step=12, update_every=3
    ),
    "global_taylor": lambda: GradualPruning(
        final_sparsity=0.8, start_step=0, end_step=12, update_every=3, criterion="taylor", allocation="global"
    ),
    "two_four": lambda: GradualPruning(pattern="2:4", start_step=0, end_step=12, update_every=3, exclude="net.4.*"),
    "rigl": lambda: DynamicSparseTraining(sparsity=0.8, regrowth="rigl", update_every=3, end_step=12),
    "distill": lambda: GradualPruning(  # as "uniform", with Distillation from the dense start (EXTRA_CALLBACKS)
        sparsity=0.8, criterion="magnitude", allocation="uniform", start_step=0, end_step=12, update_every=3
    ),
}


def dense_net() -> nn.Sequential:
    """ShardedNet's network as configure_model builds it, unsharded: the dense start, a teacher on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 33), nn.ReLU(), nn.Linear(33, 12))


EXTRA_CALLBACKS: dict[str, Callable[[], list[pl.Callback]]] = {
    "distill": lambda: [Distillation(teacher=dense_net(), student_module="net", temperature=2.0)],
}


class ShardedNet(pl.LightningModule):
    """An MLP on digits whose layers are created and sharded in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = dense_net()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x)[:, :10], y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # Never called (digits has no validation split here), but without it a run resumed from an epoch-end
        # checkpoint trains one extra batch, dense runs too: on restart Lightning's training epoch loop is only done
        # once its validation loop has run (`_is_validation_done` in lightning/pytorch/loops/training_epoch_loop.py;
        # Lightning-AI/pytorch-lightning#19403). The same holds for limit_val_batches=0.
        pass

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MaskSnapshot(pl.Callback):
    """The full masks when training (re)starts and at the end of step ``at`` (where a checkpoint is written)."""

    def __init__(self, pruning: PruningCallback, at: int) -> None:
        self.pruning, self.at, self.snapshots = pruning, at, {}

    def _take(self, key: str) -> None:
        store = self.pruning.store
        self.snapshots[key] = {name: gather_full(mask, store.params[name]) for name, mask in store.masks.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take("start")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            self._take("checkpoint")


def run(case: str, out_dir: Path, resume_from: str | None = None) -> None:
    pruning = CASES[case]()
    snapshot = MaskSnapshot(pruning, at=10)
    callbacks: list[Any] = [pruning, snapshot, *EXTRA_CALLBACKS.get(case, list)()]
    if resume_from is None:
        callbacks.append(
            ModelCheckpoint(dirpath=out_dir / f"{case}-ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=resume_from is None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
    )
    module = ShardedNet()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=144), ckpt_path=resume_from)
    store = pruning.store
    full = {name: gather_full(p.detach().to_local(), p) for name, p in store.params.items()}
    masks = {name: gather_full(mask, store.params[name]) for name, mask in store.masks.items()}
    reported = {"sparsity": store.sparsity(), "layers": store.layer_sparsity(), "sparsity_all": pruning.sparsity_all}
    if case == "distill":
        reported["distill_loss"] = float(trainer.callback_metrics["distill/loss"])
        try:  # without a given teacher: refused at fit start, before any step, with the way out
            Distillation(student_module="net").on_fit_start(trainer, module)
            reported["refusal"] = "not refused"
        except ValueError as error:
            reported["refusal"] = str(error)
    if trainer.global_rank == 0:
        suffix = "-resumed" if resume_from else ""
        result = {"weights": full, "masks": masks, "reported": reported, "snapshots": snapshot.snapshots}
        torch.save(result, out_dir / f"{case}{suffix}.pt")


if __name__ == "__main__":
    # CASE[,CASE...] OUT_DIR [CKPT]: several cases run one after the other in the same two processes; CKPT may name
    # the case as {case} (e.g. DIR/{case}-ckpt/step=10.ckpt) to resume each case from its own checkpoint.
    for name in sys.argv[1].split(","):
        run(name, Path(sys.argv[2]), sys.argv[3].format(case=name) if len(sys.argv) > 3 else None)
    if torch.distributed.is_initialized():  # both ranks done before gloo goes: its threads can abort at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
