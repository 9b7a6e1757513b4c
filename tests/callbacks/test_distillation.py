"""Distillation through Lightning: with every pruning callback, AMP, gradient accumulation, resume, Hydra."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from pat_callbacks import (
    Distillation,
    DynamicSparseTraining,
    GradualPruning,
    KeepSparsity,
    StructuredPruning,
)
from pat_callbacks.app.models import CharGPT, LanguageModel
from tests.conftest import make_module, make_trainer


def _exact_zeros(pruning) -> None:
    for name, mask in pruning.store.masks.items():
        assert bool((pruning.store.params[name].detach()[~mask] == 0).all()), name


class LossRecorder(Callback):
    """The loss Lightning backpropagates at each step (what training_step returned, distillation included)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _gradual() -> GradualPruning:
    return GradualPruning(sparsity=0.8, start_step=5, end_step=20, update_every=1, verbose=False)


def test_distillation_with_gradual_pruning_keeps_zeros_and_changes_training(fit) -> None:
    pruning, distill, recorder = _gradual(), Distillation(temperature=2.0, alpha=1.0), LossRecorder()
    trainer, model = fit([pruning, distill, recorder], max_steps=30)
    _exact_zeros(pruning)
    assert round(pruning.store.sparsity(), 2) == 0.8
    assert distill.teacher_step == 5  # the dense model at pruning start
    teacher_weight = distill.distiller.teacher.net.layers[0].weight
    assert int((teacher_weight == 0).sum()) == 0 and not teacher_weight.requires_grad
    assert float(trainer.callback_metrics["distill/loss"]) > 0
    assert "training_step" not in model.__dict__  # the wrapper is gone after fit

    plain_pruning, plain_recorder = _gradual(), LossRecorder()
    _, plain = fit([plain_pruning, plain_recorder], module=make_module(), max_steps=30)
    assert plain_recorder.losses[:5] == recorder.losses[:5]  # identical until the teacher exists
    assert recorder.losses[5] == plain_recorder.losses[5]  # at pruning start the teacher is the student: KL 0
    assert recorder.losses[6] > plain_recorder.losses[6]  # pruned at step 5: now the KD term is in the loss
    assert not torch.equal(model.net.layers[0].weight, plain.net.layers[0].weight)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16_grad_scaler"])
def test_accumulation_and_mixed_precision(fit, precision) -> None:
    pruning, distill = _gradual(), Distillation(teacher_step=0, teacher_dtype="bfloat16")
    kwargs = {"precision": "bf16-mixed"}
    if precision == "fp16_grad_scaler":  # Lightning maps '16-mixed' to bf16 on CPU: build the fp16 path
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    trainer, _ = fit([pruning, distill], max_steps=24, accumulate_grad_batches=2, **kwargs)
    assert trainer.global_step == 24
    _exact_zeros(pruning)
    assert round(pruning.store.sparsity(), 2) == 0.8
    assert distill.distiller.teacher.net.layers[0].weight.dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["distill/loss"])


@pytest.mark.parametrize(
    "make_pruning",
    [
        lambda: DynamicSparseTraining(sparsity=0.8, update_every=5, verbose=False),
        lambda: StructuredPruning(sparsity=0.5, start_step=5, end_step=15, update_every=1, verbose=False),
        lambda: KeepSparsity(verbose=False),
    ],
    ids=["dst", "structured", "keep"],
)
def test_composes_with_the_other_pruning_callbacks(fit, make_pruning) -> None:
    module = make_module()
    pruning = make_pruning()
    if isinstance(pruning, KeepSparsity):
        with torch.no_grad():
            module.net.layers[0].weight.mul_(torch.rand_like(module.net.layers[0].weight) > 0.7)
    distill = Distillation()
    trainer, _ = fit([pruning, distill], module=module, max_steps=20)
    _exact_zeros(pruning)
    assert pruning.store.sparsity() > 0.1
    assert float(trainer.callback_metrics["distill/loss"]) > 0
    # Neither DST nor KeepSparsity has a schedule: the teacher is the model as fit started (before any mask).
    expected = 5 if isinstance(pruning, StructuredPruning) else 0
    assert distill.teacher_step == expected


def test_a_given_teacher_and_a_language_model(tmp_path) -> None:
    from pat_callbacks.app.data import CharDataModule

    torch.manual_seed(0)
    text = "".join(chr(32 + (i * 7) % 60) for i in range(4000))
    data = CharDataModule({"a": text, "b": text[::-1]}, context=16, batch_size=8, val_docs=["b"], max_eval_windows=8)
    teacher = CharGPT(vocab_size=96, context=16, dim=16, layers=1, heads=2)
    student = LanguageModel(CharGPT(vocab_size=96, context=16, dim=16, layers=1, heads=2), warmup_steps=1)
    distill = Distillation(teacher, student_module="net", hidden_layers=["blocks.0"], temperature=1.0)
    pruning = GradualPruning(sparsity=0.5, start_step=0, end_step=4, update_every=1, verbose=False)
    trainer = make_trainer(tmp_path, [pruning, distill], max_steps=8)
    trainer.fit(student, datamodule=data)
    _exact_zeros(pruning)
    assert distill.distiller.teacher is teacher and distill.state_dict() == {"teacher_step": 0}  # not checkpointed
    assert float(trainer.callback_metrics["distill/loss"]) > 0


def test_resume_restores_the_teacher_from_the_checkpoint(tmp_path, digits) -> None:
    pruning, distill = _gradual(), Distillation()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=10, save_top_k=0)
    trainer = make_trainer(tmp_path, [pruning, distill, checkpoint], max_steps=10, enable_checkpointing=True)
    trainer.fit(make_module(), datamodule=digits)
    saved_teacher = {k: v.clone() for k, v in distill.distiller.teacher.state_dict().items()}

    resumed_pruning, resumed = _gradual(), Distillation()
    trainer = make_trainer(tmp_path, [resumed_pruning, resumed], max_steps=15)
    trainer.fit(make_module(seed=1), datamodule=digits, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.teacher_step == 5
    state = resumed.distiller.teacher.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved_teacher.items())  # not the resumed (pruned) model


def test_bad_student_module_fails_before_training(fit) -> None:
    with pytest.raises(ValueError, match="not a submodule"):
        fit([Distillation(student_module="encoder")], max_steps=2)
    with pytest.raises(ValueError, match="teacher_dtype"):
        Distillation(teacher_dtype="int8")


def test_hydra_composes_distillation_with_pruning_and_the_lm_recipes(tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from pat_callbacks.app.config import register_configs
    from pat_callbacks.app.run import CONF_DIR, run_training

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        lm = compose(
            "train", overrides=["+recipe=lm_two_four", "+recovery=[distill,qat_int8]", "~callbacks.checkpoint"]
        )
        cfg = compose(
            "train",
            overrides=[
                "trainer=tiny",
                "trainer.max_steps=12",
                "+pruning=cubic",
                "pruning.update_every=1",
                "+recovery=distill",
                "callbacks.distill.temperature=4",
                "~callbacks.checkpoint",
                "~logger",
            ],
        )
    assert [type(instantiate(c)).__name__ for c in lm.callbacks.values()] == [
        "StepProgressBar",
        "Distillation",
        "QuantizationAwareTraining",
    ]
    metrics = run_training(cfg, output_dir=tmp_path)
    assert metrics["global_step"] == 12 and round(metrics["sparsity"], 2) == 0.9
