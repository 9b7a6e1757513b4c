"""The quantized export agrees with QAT at the edges: group sizes that do not divide, frozen layers, half precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_callbacks.export.quantized import dequantize_state_dict, quantize_state_dict
from pat_callbacks.recovery.quantization import FakeQuantizer, QuantSpec


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 15, 5), nn.ReLU(), nn.Conv1d(15, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32, 10)
    )


def test_the_file_records_per_channel_where_the_group_does_not_divide() -> None:
    """ConvBase-like: 5 and 75 inputs under int4:g32 are stored per channel ('int4'), the 256-input layer g32."""
    model = _convnet()
    tensors = quantize_state_dict(model, "int4:g32")["tensors"]
    assert {name: tensors[name]["quant"] for name in ("0.weight", "2.weight", "5.weight")} == {
        "0.weight": "int4",
        "2.weight": "int4",
        "5.weight": "int4:g32",
    }
    quantizer = FakeQuantizer.from_model(model, "int4:g32")
    assert quantizer.per_channel == ["0.weight", "2.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_model_finalized_by_the_quantizer_loads_back_bit_for_bit(dtype) -> None:
    """Frozen layer included, per-channel fallbacks included, in the model's own dtype."""
    model = _convnet().to(dtype)
    model[0].requires_grad_(False)
    FakeQuantizer.from_model(model, "int4:g32").finalize_()
    state = model.state_dict()
    loaded = dequantize_state_dict(quantize_state_dict(model, "int4:g32"))
    assert {k: int((loaded[k] != v).sum()) for k, v in state.items()} == dict.fromkeys(state, 0)
    assert all(loaded[k].dtype == v.dtype for k, v in state.items())
    assert QuantSpec.parse("int4:g32").for_inputs(75) == QuantSpec(4)
