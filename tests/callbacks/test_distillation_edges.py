"""Distillation at its edges: callback order, a teacher held by the module, the student found without being named,
typos found before the first step, the teacher at a later one-shot step, and distillation with no task loss."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pat_callbacks import Distillation, GradualPruning, OneShotPruning
from pat_callbacks.app.models import MLP
from pat_callbacks.recovery.distillation import mean_pooled
from tests.conftest import make_trainer


class WithTeacher(pl.LightningModule):
    """A LightningModule that holds its teacher (a common shape: ``self.teacher`` next to ``self.net``) and defines
    no forward: the student is ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        pl.seed_everything(0, verbose=False)
        self.net = MLP(64, (32, 32), 10)
        self.teacher = copy.deepcopy(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)


def _gradual() -> GradualPruning:
    return GradualPruning(sparsity=0.8, start_step=2, end_step=8, update_every=1, verbose=False)


@pytest.mark.parametrize("distillation_first", [False, True])
def test_a_teacher_held_by_the_module_is_never_pruned_in_either_order(tmp_path, digits, distillation_first):
    """[GradualPruning, Distillation(teacher=module.teacher)] pruned the teacher with the student; the other order
    did not. Now both orders give the same student and an untouched teacher."""
    results = []
    for first in (distillation_first, not distillation_first):
        module = WithTeacher()
        teacher_before = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
        pruning, distill = _gradual(), Distillation(teacher=module.teacher)
        callbacks = [distill, pruning] if first else [pruning, distill]
        make_trainer(tmp_path, callbacks, max_steps=12).fit(module, datamodule=digits)
        assert not any(name.startswith("teacher.") for name in pruning.store.params)
        for name, param in module.teacher.named_parameters():
            assert torch.equal(param, teacher_before[name]), name
        assert round(pruning.store.sparsity(), 2) == 0.8
        results.append({n: p.detach().clone() for n, p in module.net.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_a_teacher_that_is_the_student_is_refused_before_any_step(tmp_path, digits):
    module = WithTeacher()
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    with pytest.raises(ValueError, match="The teacher is the student itself"):
        make_trainer(tmp_path, [Distillation(teacher=module.net, student_module="net")], max_steps=4).fit(
            module, datamodule=digits
        )
    assert all(p.requires_grad for p in module.net.parameters())  # not frozen
    assert all(torch.equal(p, before[n]) for n, p in module.net.named_parameters())


def test_a_hidden_layer_typo_is_refused_at_fit_start(tmp_path, digits):
    module, steps = WithTeacher(), []

    class Steps(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    distill = Distillation(hidden_layers=["layers.9"], teacher_step=5, student_module="net")  # copied at step 5
    with pytest.raises(ValueError, match=r"'layers.9'.*valid names"):
        make_trainer(tmp_path, [distill, Steps()], max_steps=8).fit(module, datamodule=digits)
    assert steps == []


def test_the_student_of_a_module_without_forward_is_its_one_network(tmp_path, digits):
    """The README's shape (``self.net`` called in training_step, no forward): no ``student_module`` needed."""

    class NoForward(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            pl.seed_everything(0, verbose=False)
            self.net = MLP(64, (32,), 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module, distill = NoForward(), Distillation(teacher_step=0)
    make_trainer(tmp_path, [distill], max_steps=4).fit(module, datamodule=digits)
    assert type(distill.teacher).__name__ == "MLP"  # a copy of self.net, not of the LightningModule

    class TwoNets(NoForward):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(10, 10)

    with pytest.raises(ValueError, match=r"cannot tell the student: .* \(net, head\); set `student_module`"):
        make_trainer(tmp_path, [Distillation()], max_steps=4).fit(TwoNets(), datamodule=digits)


def test_the_teacher_is_the_model_at_a_later_one_shot_step(tmp_path, digits):
    module = WithTeacher()
    pruning = OneShotPruning("magnitude", sparsity=0.5, at_step=3, verbose=False)
    distill = Distillation(student_module="net")
    make_trainer(tmp_path, [distill, pruning], max_steps=6).fit(module, datamodule=digits)
    assert distill.teacher_step == 3  # was 0: the model before 3 steps of training
    assert int((distill.teacher.layers[0].weight == 0).sum()) == 0  # dense: copied before the one-shot pruning


def test_embeddings_distil_with_no_labels_and_no_task_loss(tmp_path):
    """An encoder's mean-pooled embeddings matched by cosine, training_step only calls the student."""
    from transformers import BertConfig, BertModel

    class Encoder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = BertConfig(
                vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
            )
            self.encoder = BertModel(config)

        def training_step(self, batch, batch_idx):
            self.encoder(input_ids=batch)  # no labels, no loss: Distillation(task_loss=False) supplies it

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    tokens = torch.randint(0, 32, (16, 6), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(tokens, batch_size=4)
    module = Encoder()
    pruning = GradualPruning(  # the encoder's matrices by role (the pooler, unused by mean pooling, stays dense)
        sparsity=0.5, start_step=1, end_step=2, update_every=1, include="encoder.encoder.*", verbose=False
    )
    distill = Distillation(alpha=1.0, loss="cosine", output=mean_pooled, task_loss=False, teacher_step=0)
    make_trainer(tmp_path, [pruning, distill], max_steps=8).fit(module, loader)
    assert float(module.trainer.callback_metrics["distill/loss"]) > 0
    assert round(pruning.store.sparsity(), 2) == 0.5
    with pytest.raises(ValueError, match="task_loss"):
        Distillation(task_loss="no")
