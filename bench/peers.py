"""The peer tools, wired so they run on the same data, model and step budget as pat-callbacks.

- :class:`ModelPruningToSparsity`: Lightning's ``ModelPruning`` (l1_unstructured, per layer) with an amount
  schedule that follows the cubic ramp at epoch ends (the only time it prunes) to the final sparsity.
- :class:`TorchAOCubic`: torch.ao.pruning ``WeightNormSparsifier`` driven by ``CubicSL`` every ``update_every``
  steps, masks squashed into the weights when training ends.
- :func:`rigl_torch_run`: rigl-torch 0.5.2's ``RigLScheduler`` in a plain PyTorch loop (its patched
  ``optimizer.step`` rejects Lightning's ``closure``). rigl-torch imports torchvision without declaring it; a stub
  module stands in for that one import (it only checks ``isinstance`` against ResNet blocks).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from pat_callbacks.core.schedules import CubicSchedule
from pat_callbacks.core.targets import select_parameters


def _modules_to_prune(model: nn.Module) -> list[tuple[nn.Module, str]]:
    modules = dict(model.named_modules())
    return [(modules[name.rsplit(".", 1)[0]], "weight") for name in select_parameters(model)]


class ModelPruningToSparsity(ModelPruning):
    """Lightning ModelPruning reaching ``final_sparsity`` along the cubic ramp, pruning at epoch ends.

    ``use_global_unstructured=False`` (default here, as in ``bench/accuracy.py``): every layer at the target;
    ``True`` is ModelPruning's own default, one L1 threshold over all layers (what ``make demo`` compares with).
    """

    def __init__(
        self, final_sparsity: float, start_epoch: int, end_epoch: int, use_global_unstructured: bool = False
    ) -> None:
        self.ramp = CubicSchedule(final_sparsity=final_sparsity, start_step=start_epoch, end_step=end_epoch)
        self.final_sparsity = final_sparsity
        self.method_name = f"Lightning ModelPruning ({'global' if use_global_unstructured else 'per-layer'} L1)"
        super().__init__(
            "l1_unstructured",
            amount=self._amount,
            use_global_unstructured=use_global_unstructured,
            use_lottery_ticket_hypothesis=False,  # its default rewinds weights at every pruning epoch
            verbose=0,
        )

    def _amount(self, epoch: int) -> float:
        before, after = self.ramp(epoch - 1) if epoch > 0 else 0.0, self.ramp(epoch)
        if after <= before:
            return 0.0
        return 1.0 - (1.0 - after) / (1.0 - before)  # fraction of the remaining weights to prune now

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._parameters_to_prune = _modules_to_prune(pl_module)
        super().setup(trainer, pl_module, stage)


class TorchAOCubic(Callback):
    """torch.ao.pruning: WeightNormSparsifier (unstructured) + CubicSL, stepped every ``update_every`` steps."""

    def __init__(self, final_sparsity: float, start_step: int, end_step: int, update_every: int = 100) -> None:
        self.final_sparsity = final_sparsity
        self.start_step, self.end_step, self.update_every = start_step, end_step, update_every

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.ao.pruning import WeightNormSparsifier
        from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

        self.sparsifier = WeightNormSparsifier(
            sparsity_level=self.final_sparsity, sparse_block_shape=(1, 1), zeros_per_block=1
        )
        self.sparsifier.prepare(pl_module, [{"tensor_fqn": name} for name in select_parameters(pl_module)])
        steps = max(1, (self.end_step - self.start_step) // self.update_every)
        self.scheduler = CubicSL(self.sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=steps)
        self.updates = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step >= self.start_step and (step - self.start_step) % self.update_every == 0 and step <= self.end_step:
            self.scheduler.step()
            self.sparsifier.step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sparsifier.squash_mask()


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    class _NotAResNetBlock:  # rigl-torch only uses these in isinstance checks
        pass

    resnet.Bottleneck = resnet.BasicBlock = _NotAResNetBlock
    models.resnet = resnet
    torchvision.models = models
    sys.modules.update({"torchvision": torchvision, "torchvision.models": models, "torchvision.models.resnet": resnet})


def rigl_torch_run(
    net: nn.Module, datamodule: pl.LightningDataModule, sparsity: float, steps: int, lr: float, seed: int
) -> dict[str, float]:
    """Train ``net`` with rigl-torch's RigLScheduler (paper defaults: delta 100, alpha 0.3, T_end 75%)."""
    _stub_torchvision()
    from rigl_torch.RigL import RigLScheduler

    torch.manual_seed(seed)
    datamodule.setup("fit")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = RigLScheduler(
        net,
        optimizer,
        dense_allocation=1 - sparsity,
        T_end=int(0.75 * steps),
        delta=100,
        alpha=0.3,
        ignore_linear_layers=False,
    )
    step = 0
    while step < steps:
        for x, y in datamodule.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if scheduler():
                optimizer.step()
            step += 1
            if step == steps:
                break
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    weights = [p for name, p in net.named_parameters() if name.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"test_acc": correct / total, "sparsity": zeros / sum(w.numel() for w in weights), "steps": step}
