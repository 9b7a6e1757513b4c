"""OneShotPruning at its edges: calibration runs activations only (no loss, no labels), on modules whose network is
an attribute; a reused instance prunes its next model; a resume with another target says what it keeps; the batches
given are the batches used."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pat_callbacks import OneShotPruning
from pat_callbacks.app.models import MLP
from tests.conftest import make_module, make_trainer


def _zeros(module: nn.Module) -> float:
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class Regression(pl.LightningModule):
    """An MSE model with float targets and no forward: the old default (cross-entropy of pl_module(x)) crashed."""

    def __init__(self) -> None:
        super().__init__()
        pl.seed_everything(0, verbose=False)
        self.net = MLP(64, (32,), 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y.float())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class LossAttribute(pl.LightningModule):
    """``self.loss`` is a loss *module*, not a ``loss(batch)`` method: the old default called it with the batch."""

    def __init__(self) -> None:
        super().__init__()
        pl.seed_everything(0, verbose=False)
        self.net = MLP(64, (32,), 10)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("module_class", [Regression, LossAttribute], ids=["mse_no_forward", "loss_module"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_needs_activations_only(tmp_path, digits, module_class, method):
    module = module_class()
    pruning = OneShotPruning(method, 0.5, calibration_batches=2, verbose=False)
    make_trainer(tmp_path, [pruning], max_steps=2).fit(module, datamodule=digits)
    assert pruning.store.sparsity() == 0.5 and abs(_zeros(module.net) - 0.5) < 1e-9


def test_a_reused_instance_prunes_its_next_model(tmp_path, digits):
    pruning = OneShotPruning("wanda", 0.5, calibration_batches=2, verbose=False)
    first, second = make_module(seed=0), make_module(seed=1)
    make_trainer(tmp_path, [pruning], max_steps=2).fit(first, datamodule=digits)
    make_trainer(tmp_path, [pruning], max_steps=2).fit(second, datamodule=digits)
    assert abs(_zeros(first.net) - 0.5) < 1e-9 and abs(_zeros(second.net) - 0.5) < 1e-9  # was 0.0: silently not


def test_a_resume_with_another_target_keeps_the_checkpoint_and_says_so(tmp_path, digits):
    module = make_module()
    trainer = make_trainer(tmp_path, [OneShotPruning("wanda", 0.5, calibration_batches=2, verbose=False)], max_steps=3)
    trainer.fit(module, datamodule=digits)
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    resumed = OneShotPruning("wanda", 0.7, calibration_batches=2, verbose=False)
    with pytest.warns(UserWarning, match=r"pruned to 0.5; it does not prune again.*not sparsity=0.7"):
        make_trainer(tmp_path, [resumed], max_steps=5).fit(
            make_module(), datamodule=digits, ckpt_path=tmp_path / "pruned.ckpt"
        )
    assert resumed.final_sparsity == 0.5 and resumed.store.sparsity() == 0.5  # what is reported is what the model has


def test_every_batch_given_calibrates(tmp_path, digits):
    digits.setup("fit")
    given = [batch for _, batch in zip(range(20), digits.train_dataloader(), strict=False)]
    pruning = OneShotPruning("wanda", 0.5, calibration=given, verbose=False)
    module = make_module()
    assert len(pruning._calibration_batches(None, module)) == 20  # was the calibration_batches default, 16
    unsized = OneShotPruning("wanda", 0.5, calibration=iter(given), verbose=False)
    with pytest.warns(UserWarning, match="first 16 batches of the given iterable, which holds more"):
        assert len(unsized._calibration_batches(None, module)) == 16


def test_the_readme_causal_lm_uses_one_shot_and_distillation_without_extra_arguments(tmp_path):
    """The README's CausalLM (``self.net`` a GPT-2, no forward, token batches): OneShotPruning and Distillation find
    the network themselves (no ``forward=`` or ``student_module=``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pat_callbacks import Distillation

    class CausalLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=96, n_positions=32)
            self.net = GPT2LMHeadModel(config)

        def training_step(self, batch, batch_idx):  # batch: [B, T + 1] token ids
            logits = self.net(batch[:, :-1]).logits
            return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    tokens = torch.randint(0, 96, (16, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(tokens, batch_size=4)
    module = CausalLM()
    pruning, distill = OneShotPruning("wanda", 0.5, calibration_batches=2, verbose=False), Distillation()
    make_trainer(tmp_path, [pruning, distill], max_steps=3).fit(module, loader)
    assert pruning.store.sparsity() == 0.5 and type(distill.teacher).__name__ == "GPT2LMHeadModel"
    assert float(module.trainer.callback_metrics["distill/loss"]) >= 0
