"""QuantizationAwareTraining through Lightning: zeros exact during and after training, 2:4 kept, on the grid."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pat_callbacks import DynamicSparseTraining, GradualPruning, QuantizationAwareTraining
from pat_callbacks.export.quantized import dequantize_state_dict, quantize_state_dict
from pat_callbacks.recovery.quantization import QuantSpec, fake_quantize
from tests.conftest import make_module


class QuantizedForwardChecker(Callback):
    """Inside every training step: the weights the forward sees are fake-quantized, pruned ones exactly zero."""

    def __init__(self, pruning, qat) -> None:
        self.pruning, self.qat = pruning, qat
        self.checked = 0
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1

    def on_before_backward(self, trainer, pl_module, loss):
        quantizer = self.qat.quantizer
        if not quantizer.swapped_in:
            return
        for name, param in quantizer.params.items():
            master = quantizer._masters[name]
            assert torch.equal(param.detach(), fake_quantize(master, quantizer.spec)), name
            mask = self.pruning.store.masks.get(name)
            if mask is not None:
                assert bool((param.detach()[~mask] == 0).all()), name
        self.checked += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert not self.qat.quantizer.swapped_in  # the optimizer and the pruning callbacks see full precision


def _two_four() -> GradualPruning:
    return GradualPruning(
        pattern="2:4", start_step=0, end_step=10, update_every=1, criterion="magnitude", verbose=False
    )


@pytest.mark.parametrize("spec", ["int8", "int4:g16"])
def test_qat_with_2_4_keeps_zeros_during_and_after_training(fit, spec) -> None:
    pruning = _two_four()
    qat = QuantizationAwareTraining(spec, start_step=4)
    checker = QuantizedForwardChecker(pruning, qat)
    _, model = fit([pruning, qat, checker], max_steps=20)
    assert checker.checked == 16  # steps 4..19
    for name, mask in pruning.store.masks.items():
        weight = pruning.store.params[name].detach()
        assert torch.equal(weight != 0, mask) or bool((weight[~mask] == 0).all()), name
        assert int((weight.reshape(-1, 4) != 0).sum(1).max()) <= 2, name  # 2:4 on the final weights
        assert torch.equal(fake_quantize(weight, qat.spec), weight), name  # finalized: on the grid
    loaded = dequantize_state_dict(quantize_state_dict(model, qat.spec))  # the export is exact
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_qat_changes_training_and_resumes_full_precision_masters(fit) -> None:
    pruning, qat = _two_four(), QuantizationAwareTraining("int4", start_step=0, finalize=False)
    _, quantized = fit([pruning, qat], max_steps=15)
    _, plain = fit([_two_four()], module=make_module(), max_steps=15)
    weight = quantized.net.layers[0].weight
    assert not torch.equal(weight, plain.net.layers[0].weight)
    assert not torch.equal(fake_quantize(weight, qat.spec), weight)  # finalize=False: the masters stay


def test_accumulation_bf16_and_dynamic_sparse_training(fit) -> None:
    pruning = DynamicSparseTraining(sparsity=0.8, update_every=4, verbose=False)
    qat = QuantizationAwareTraining("int8")
    checker = QuantizedForwardChecker(pruning, qat)
    trainer, _ = fit([pruning, qat, checker], max_steps=12, accumulate_grad_batches=2, precision="bf16-mixed")
    # Every micro-batch saw the quantized weights (23 of them: an epoch of 23 batches ends with a step of one).
    assert trainer.global_step == 12 and checker.checked == checker.batches == 23
    for name, mask in pruning.store.masks.items():
        assert bool((pruning.store.params[name].detach()[~mask] == 0).all()), name
    assert round(pruning.store.sparsity(), 2) == 0.8


def test_validation_sees_the_quantized_model(tmp_path) -> None:
    from pat_callbacks.app.data import DigitsDataModule
    from tests.conftest import make_trainer

    seen = {}

    class Peek(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["swapped"] = qat.quantizer.swapped_in

    qat = QuantizationAwareTraining("int8", finalize=False)
    trainer = make_trainer(tmp_path, [qat, Peek()], max_steps=3, limit_val_batches=1, val_check_interval=3)
    trainer.fit(make_module(), datamodule=DigitsDataModule(batch_size=64, val_size=64))
    assert seen == {"swapped": True} and not qat.quantizer.swapped_in


@pytest.mark.parametrize(
    ("old", "spec"),
    [({"bits": 8}, "int8"), ({"bits": 4, "group_size": 32}, "int4:g32"), ({"group_size": 64}, "int8:g64"), (4, "int4")],
)
def test_bits_and_group_size_still_work_with_a_warning_naming_the_spec(old, spec) -> None:
    with pytest.warns(DeprecationWarning, match=f"is now called `spec='{spec}'`"):
        qat = QuantizationAwareTraining(**old) if isinstance(old, dict) else QuantizationAwareTraining(old)
    assert qat.spec == QuantizationAwareTraining(spec).spec == QuantSpec.parse(spec)
    with pytest.raises(ValueError, match=r"Give `spec='int4'` \(the new name of `bits, group_size`\), not both"):
        QuantizationAwareTraining("int8:g16", bits=4)


def test_one_spelling_for_every_entry_point(tmp_path) -> None:
    """The callback, FakeQuantizer, save_quantized and the Hydra presets all take "int4:g32"."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from pat_callbacks.app.config import register_configs
    from pat_callbacks.app.run import CONF_DIR
    from pat_callbacks.export.quantized import load_quantized, save_quantized
    from pat_callbacks.recovery.quantization import FakeQuantizer

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        specs = [
            str(instantiate(compose("train", [f"+recovery={name}", *extra]).callbacks.qat).spec)
            for name, extra in [("qat_int8", []), ("qat_int4", []), ("qat_int8", ["callbacks.qat.spec=int4:g16"])]
        ]
    assert specs == ["int8", "int4:g32", "int4:g16"]
    module = make_module()
    layer = module.net.layers[0]
    assert FakeQuantizer.from_model(layer, "int4:g32").spec == QuantizationAwareTraining("int4:g32").spec
    save_quantized(layer, tmp_path / "layer.pt", "int4:g32")
    assert torch.equal(load_quantized(tmp_path / "layer.pt")["weight"], fake_quantize(layer.weight, QuantSpec(4, 32)))


def test_a_start_step_training_never_reaches_is_refused(fit) -> None:
    """start_step=100 with max_steps=4 would never quantize: refused at train start, naming both numbers."""
    with pytest.raises(ValueError, match=r"start_step=100, but training has 4 optimizer steps \(max_steps=4\)"):
        fit([QuantizationAwareTraining("int8", start_step=100)], max_steps=4)


@pytest.mark.parametrize("finalize", [True, False])
def test_a_frozen_layer_is_quantized_in_training_and_in_the_file(fit, tmp_path, finalize) -> None:
    """One rule: what QAT fake-quantized (a frozen layer too) is what save_quantized stores; outputs are equal."""
    from pat_callbacks.export.quantized import load_quantized, save_quantized

    module = make_module()
    module.net.layers[0].requires_grad_(False)
    frozen = module.net.layers[0].weight.detach().clone()
    qat = QuantizationAwareTraining("int4:g16", start_step=0, finalize=finalize)
    fit([qat], module=module, max_steps=4)
    assert "net.layers.0.weight" in qat.quantizer.params
    save_quantized(module, tmp_path / "model.pt", qat.spec)
    reloaded = make_module(seed=1)
    reloaded.load_state_dict(load_quantized(tmp_path / "model.pt"))
    x = torch.randn(32, 64)
    module.eval(), reloaded.eval()
    with torch.no_grad(), qat.quantizer.swapped():  # the model as evaluated (validation swaps the same way)
        evaluated = module(x)
        assert torch.equal(module.net.layers[0].weight, fake_quantize(frozen, qat.spec))
    assert torch.equal(reloaded(x).detach(), evaluated)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_training_exports_bit_for_bit(fit, precision) -> None:
    """Under bf16-true / 16-true the finalized weights are q·s rounded to the dtype; the file gives them back."""
    pruning, qat = _two_four(), QuantizationAwareTraining("int8", start_step=2)
    module = make_module(optimizer="sgd", lr=0.1)  # Adam's eps underflows in float16
    _, model = fit([pruning, qat], module=module, max_steps=6, precision=precision)
    assert pruning.store.sparsity() > 0
    state = model.state_dict()
    assert state["net.layers.0.weight"].dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float16)
    loaded = dequantize_state_dict(quantize_state_dict(model, qat.spec))
    differ = {k: int((loaded[k] != v).sum()) for k, v in state.items() if not torch.equal(loaded[k], v)}
    assert differ == {}


def test_order_of_callbacks_does_not_change_the_result(fit) -> None:
    """[QAT, OneShotPruning('sparsegpt')] and the other order: the same weights, the same zeros (0.5)."""
    from pat_callbacks import OneShotPruning

    results = []
    for qat_first in (True, False):
        pruning = OneShotPruning("sparsegpt", 0.5, calibration_batches=2, verbose=False)
        qat = QuantizationAwareTraining("int8", start_step=0)
        trainer, model = fit([qat, pruning] if qat_first else [pruning, qat], module=make_module(), max_steps=5)
        names = [type(c).__name__ for c in trainer.callbacks]
        assert names.index("OneShotPruning") < names.index("QuantizationAwareTraining")
        assert pruning.store.sparsity() == 0.5
        for name, mask in pruning.store.masks.items():  # pruned weights are zero (a kept one may round to zero)
            weight = pruning.store.params[name].detach()
            assert float((~mask).float().mean()) == 0.5 and bool((weight[~mask] == 0).all()), name
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
