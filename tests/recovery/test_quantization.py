"""Fake quantization: zeros exact, the int8 / int4 grids, idempotence, transposed (Conv1D) weights, the swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.core.patterns import nm_mask
from pat_callbacks.recovery.quantization import (
    FakeQuantizer,
    QuantSpec,
    fake_quantize,
    layer_specs,
    quantize_tensor,
    quantized_parameters,
)

SPECS = [QuantSpec(8), QuantSpec(4), QuantSpec(8, group_size=16), QuantSpec(4, group_size=32)]


def _pruned(seed: int, shape: tuple[int, int] = (16, 64)) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(shape)
    return w * nm_mask(w.abs(), 2, 4)  # 2:4 along each row


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_zeros_stay_exact_and_2_4_stays_2_4(spec: QuantSpec) -> None:
    w = _pruned(0)
    fq = fake_quantize(w, spec)
    assert bool(((w == 0) <= (fq == 0)).all())
    assert int((fq.reshape(-1, 4) != 0).sum(1).max()) <= 2


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_values_are_on_the_grid_of_at_most_2_qmax_plus_1_levels(spec: QuantSpec) -> None:
    w = _pruned(1)
    q, scales = quantize_tensor(w, spec)
    assert int(q.abs().max()) == spec.qmax  # the largest weight of each group reaches qmax (scales round down)
    size = spec.group_size or w.shape[1]
    groups = fake_quantize(w, spec).reshape(w.shape[0], -1, size) / scales.float().unsqueeze(-1)
    assert torch.equal(groups, groups.round()) and int(groups.abs().max()) <= spec.qmax


def test_per_channel_int8_matches_a_hand_computation() -> None:
    w = torch.tensor([[0.5, -0.25, 0.0, 1.0]])
    scale = 1.0 / 127
    bits = torch.tensor([scale]).view(torch.int32) & -65536  # round down to bf16
    s = float(bits.view(torch.float32))
    expected = [max(-127, min(127, round(v / s))) * s for v in w[0].tolist()]
    assert fake_quantize(w, QuantSpec(8))[0].tolist() == pytest.approx(expected, abs=0)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantization_is_idempotent_bit_for_bit(spec: QuantSpec, seed: int) -> None:
    once = fake_quantize(_pruned(seed) * 3.7, spec)
    assert torch.equal(fake_quantize(once, spec), once)


def test_transposed_weights_get_one_scale_per_output_column() -> None:
    w = torch.randn(8, 4)  # (inputs, outputs) as Hugging Face Conv1D stores it
    _, scales = quantize_tensor(w, QuantSpec(8), transposed=True)
    assert scales.shape == (4, 1)
    assert torch.equal(fake_quantize(w, QuantSpec(8), transposed=True), fake_quantize(w.t(), QuantSpec(8)).t())


def test_group_size_that_does_not_divide_is_refused_by_quantize_tensor() -> None:
    """The low-level function stays strict; its error names the shape, the group size and the ways out."""
    with pytest.raises(ValueError, match="does not divide") as error:
        quantize_tensor(torch.randn(4, 24), QuantSpec(4, group_size=32))
    for part in ("group_size=32", "the 24 inputs of a weight of shape (4, 24)", "per channel ('int4'", "exclude"):
        assert part in str(error.value), part
    with pytest.raises(ValueError, match="int4:g32"):
        QuantSpec.parse("int3")


@pytest.mark.parametrize("shape", [(8, 1, 5), (4, 24), (8, 15, 5)], ids=str)
def test_a_weight_the_group_does_not_divide_is_quantized_per_channel(shape) -> None:
    """A first convolution with a kernel of 5 (5 inputs), 24 or 75 inputs under int4:g32: one scale per channel."""
    conv, fc = nn.Parameter(torch.randn(shape)), nn.Parameter(torch.randn(4, 64))
    quantizer = FakeQuantizer({"conv": conv, "fc": fc}, "int4:g32")
    assert quantizer.specs == {"conv": QuantSpec(4), "fc": QuantSpec(4, 32)} and quantizer.per_channel == ["conv"]
    assert torch.equal(quantizer.fake_quantized()["conv"], fake_quantize(conv, QuantSpec(4)))
    assert torch.equal(quantizer.fake_quantized()["fc"], fake_quantize(fc, QuantSpec(4, 32)))
    assert layer_specs({"w": torch.zeros(3, 32)}, "int8:g32") == {"w": QuantSpec(8, 32)}


def test_frozen_weights_are_quantized_by_the_one_rule() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    params, transposed = quantized_parameters(model)
    assert list(params) == ["0.weight", "2.weight"] and transposed == []
    assert list(FakeQuantizer.from_model(model).params) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_half_precision_finalized_weights_export_and_load_back_bit_for_bit(dtype, spec) -> None:
    """bf16 / fp16 weights hold q·s rounded to their dtype; the export recovers q and s all the same."""
    from pat_callbacks.export.quantized import dequantize_state_dict, quantize_state_dict

    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=False).to(dtype)
    with torch.no_grad():  # groups of every magnitude fp16 keeps normal (largest weight >= 2**-14)
        layer.weight.mul_(torch.logspace(0, -2.5, 96).to(dtype).unsqueeze(1))
    fresh = layer.weight.detach().clone()
    quantizer = FakeQuantizer.from_model(layer, spec)
    _, fresh_scales = quantize_tensor(fresh.float(), spec)
    assert torch.equal(quantize_tensor(fresh, spec)[1], fresh_scales)  # a fresh weight: the float32 scales
    quantizer.finalize_()
    assert torch.equal(layer.weight, fake_quantize(fresh, spec).to(dtype))
    loaded = dequantize_state_dict(quantize_state_dict(layer, spec))["weight"]
    assert loaded.dtype == dtype
    assert int((loaded != layer.weight).sum()) == 0
    once = fake_quantize(layer.weight, spec).to(dtype)  # idempotent in the dtype too
    assert torch.equal(once, layer.weight)


def test_swap_gives_gradients_at_the_quantized_weights_and_restores_the_master() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(4, 16) > 0.5)
    master = layer.weight.detach().clone()
    quantizer = FakeQuantizer.from_model(layer, "int4")
    x = torch.randn(8, 16)
    with quantizer.swapped():
        assert torch.equal(layer.weight, fake_quantize(master, QuantSpec(4)))
        layer(x).pow(2).sum().backward()
    reference = nn.Linear(16, 4)
    with torch.no_grad():
        reference.weight.copy_(fake_quantize(master, QuantSpec(4)))
        reference.bias.copy_(layer.bias)
    reference(x).pow(2).sum().backward()
    assert torch.equal(layer.weight, master)  # master back
    assert torch.allclose(layer.weight.grad, reference.weight.grad)  # straight-through: the quantized gradient


def test_masks_are_enforced_even_where_the_weight_is_not_zero() -> None:
    layer = nn.Linear(8, 2)
    mask = torch.rand(2, 8) > 0.5
    quantizer = FakeQuantizer.from_model(layer, "int8")
    with quantizer.swapped({"weight": mask}):
        assert bool((layer.weight[~mask] == 0).all())
