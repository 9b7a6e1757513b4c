"""Sparse + quantized checkpoints: exact round trip to the dequantized weights, sizes against each format alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pat_callbacks.app.models import CharGPT
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.export import compress_state_dict
from pat_callbacks.export.quantized import (
    dequantize_state_dict,
    load_quantized,
    quantize_state_dict,
    save_quantized,
    state_bytes,
)
from pat_callbacks.recovery.quantization import FakeQuantizer, QuantSpec, fake_quantize


def _pruned_chargpt(sparsity: float = 0.75) -> tuple[nn.Module, Pruner]:
    torch.manual_seed(0)
    net = CharGPT(vocab_size=32, context=16, dim=32, layers=2, heads=2)
    pruner = Pruner(net, criterion="magnitude", allocation="uniform")
    pruner.prune_to(sparsity)
    pruner.apply()
    return net, pruner


@pytest.mark.parametrize("spec", ["int8", "int4:g32", "int8:g16", "int4"])
@pytest.mark.parametrize("sparse", [True, False])
def test_round_trip_is_exact_to_the_dequantized_weights(tmp_path: Path, spec: str, sparse: bool) -> None:
    net, pruner = _pruned_chargpt()
    path = tmp_path / "model.pt"
    save_quantized(net, path, spec, sparse=sparse)
    loaded = load_quantized(path)
    state = net.state_dict()
    assert list(loaded) == list(state)
    for name, value in state.items():
        if name in pruner.params:
            assert torch.equal(loaded[name], fake_quantize(value, QuantSpec.parse(spec))), name
            assert bool(((value == 0) <= (loaded[name] == 0)).all())
        else:
            assert torch.equal(loaded[name], value), name
    fresh = CharGPT(vocab_size=32, context=16, dim=32, layers=2, heads=2)
    fresh.load_state_dict(loaded)  # strict: every key, tied head included
    assert fresh.head.weight is fresh.embed.weight


def test_a_model_finalized_by_qat_loads_back_bit_for_bit() -> None:
    net, _ = _pruned_chargpt()
    quantizer = FakeQuantizer.from_model(net, "int4:g32")
    quantizer.finalize_()
    loaded = dequantize_state_dict(quantize_state_dict(net, "int4:g32"))
    assert all(torch.equal(loaded[name], value) for name, value in net.state_dict().items())


def test_gpt2_conv1d_is_quantized_per_output_column_and_round_trips() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    )
    pruner = Pruner(model, criterion="magnitude", allocation="uniform", pattern="2:4")
    pruner.prune_to(0.5)
    pruner.apply()
    packed = quantize_state_dict(model, "int8")
    item = packed["tensors"]["transformer.h.0.attn.c_attn.weight"]
    assert item["transposed"] and item["scales"].shape == (96, 1)  # (in=32, out=96): one scale per output
    loaded = dequantize_state_dict(packed)
    weight = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(
        loaded["transformer.h.0.attn.c_attn.weight"], fake_quantize(weight, QuantSpec(8), transposed=True)
    )


def test_sparse_and_quantized_is_smaller_than_each_alone() -> None:
    net, pruner = _pruned_chargpt(0.75)
    weights = {name: p for name, p in net.state_dict().items() if name in pruner.params}
    dense = state_bytes(weights)
    sparse_only = state_bytes(compress_state_dict(weights))
    quant_only = state_bytes(
        {k: v for k, v in quantize_state_dict(net, "int8", sparse=False)["tensors"].items() if k in weights}
    )
    both = state_bytes({k: v for k, v in quantize_state_dict(net, "int8")["tensors"].items() if k in weights})
    assert both < quant_only < dense and both < sparse_only < dense
