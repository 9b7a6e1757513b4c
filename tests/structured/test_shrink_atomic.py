"""A refused shrink changes nothing: every cut is planned and checked before the first weight changes, so the model's
weights, module sizes, head counts and config are exactly as they were (issue: Qwen2-MoE with
``uniform_per_layer=True`` was refused after ``k_proj`` had been cut, its config still giving the old head count)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel

from pat_callbacks.structured import StructuredPruner, shrink
from pat_callbacks.structured.cutting import shrink_transformer
from tests.zoo.models import hf_qwen2_moe

_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "intermediate_size")


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a shrink may change: weights (values and shapes), module reprs (sizes), head counts, config."""
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "modules": [(name, repr(module)) for name, module in model.named_modules()],
        "counts": {
            (name, attr): getattr(module, attr)
            for name, module in model.named_modules()
            for attr in _COUNTS
            if isinstance(getattr(module, attr, None), int)
        },
        "config": model.config.to_dict(),
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    assert after["modules"] == before["modules"]
    assert after["counts"] == before["counts"]
    assert after["config"] == before["config"]


def _qwen2_moe_pruned() -> tuple[nn.Module, dict[str, list[int]]]:
    model = hf_qwen2_moe()
    pruner = StructuredPruner(model, None)
    pruner.prune_to(0.5)
    pruned = pruner.pruned_channels()
    assert next(iter(pruned)) == "model.layers.0.self_attn.k_proj.weight"  # the cut that used to happen first
    return model, pruned


def test_a_qwen2_moe_refused_as_not_uniform_is_left_exactly_as_it_was():
    model, pruned = _qwen2_moe_pruned()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"uniform_per_layer=True, but the layers of .* differ .*shared experts"):
        shrink_transformer(model, pruned, uniform_per_layer=True)
    _assert_unchanged(model, before)
    shrink_transformer(model, pruned)  # the same cuts, not asked to be uniform: made
    assert model.model.layers[0].self_attn.k_proj.out_features == 16


def test_shrink_of_a_qwen2_moe_refused_as_not_uniform_cuts_nothing():
    model, pruned = _qwen2_moe_pruned()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="uniform_per_layer=True, but the layers of"):
        shrink(model, None, pruned, uniform_per_layer=True)
    _assert_unchanged(model, before)


def test_a_qwen2_moe_with_uniform_per_layer_is_refused_at_setup():
    with pytest.raises(ValueError, match="uniform_per_layer=True"):
        StructuredPruner(hf_qwen2_moe(), None, uniform_per_layer=True)


def test_query_heads_uneven_over_key_value_groups_are_refused_before_the_mlp_listed_first_is_cut():
    model = _llama()
    before = _snapshot(model)
    pruned = {
        "model.layers.0.mlp.up_proj.weight": list(range(64)),  # valid, and first: the old loop cut it, then refused
        "model.layers.0.self_attn.q_proj.weight": [0, 1],  # both query heads of key/value group 0
    }
    with pytest.raises(ValueError, match=r"every key/value group must keep the same number of query heads"):
        shrink(model, None, pruned)
    _assert_unchanged(model, before)


def test_a_group_left_empty_is_refused_before_any_cut():
    model = _llama()
    before = _snapshot(model)
    pruned = {
        "model.layers.0.self_attn.k_proj.weight": [1],
        "model.layers.1.mlp.up_proj.weight": list(range(128)),
    }
    with pytest.raises(ValueError, match=r"remove every channel of 'model.layers.1.mlp.up_proj.weight'"):
        shrink_transformer(model, pruned)
    _assert_unchanged(model, before)


def test_two_groups_of_one_attention_are_refused_before_any_cut():
    """Key/value groups and query heads of the same attention index the original heads: after one cut the other's
    indices would name other heads (or none)."""
    model = _llama()
    before = _snapshot(model)
    pruned = {"model.layers.0.self_attn.k_proj.weight": [1], "model.layers.0.self_attn.q_proj.weight": [0, 2]}
    with pytest.raises(ValueError, match=r"two groups of the same module 'model.layers.0.self_attn'"):
        shrink_transformer(model, pruned)
    _assert_unchanged(model, before)


def test_uniform_cuts_are_still_made_and_the_model_still_computes_what_the_masked_one_did():
    model = _llama()
    pruner = StructuredPruner(model, None, uniform_per_layer=True)
    pruner.prune_to(0.5)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
    shrink(model, None, pruner.pruned_channels(), uniform_per_layer=True)
    assert (model.config.num_key_value_heads, model.config.intermediate_size) == (1, 64)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("root", "bad", "channels"),
    [
        ("model.layers.0.self_attn.k_proj.weight", [1, 7], "0 to 1"),  # 2 key/value groups: 7 used to be skipped
        ("model.layers.0.self_attn.k_proj.weight", [-1], "0 to 1"),
        ("model.layers.1.mlp.up_proj.weight", [128], "0 to 127"),
        ("model.layers.1.mlp.up_proj.weight", ["3"], "0 to 127"),
        ("model.layers.1.mlp.up_proj.weight", [2.0], "0 to 127"),
        ("model.layers.1.mlp.up_proj.weight", [True], "0 to 127"),
    ],
)
def test_channel_indices_out_of_range_or_not_ints_are_refused_before_any_cut(root, bad, channels):
    model = _llama()
    before = _snapshot(model)
    pruned = {"model.layers.0.mlp.up_proj.weight": [0, 1], root: bad}  # a valid cut listed first
    said = bad[1:] if len(bad) > 1 else bad  # the valid index 1 of [1, 7] is not named
    with pytest.raises(ValueError, match=re.escape(f"'{root}' has channels {channels}, but `pruned` gives {said!r}")):
        shrink(model, None, pruned)
    _assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="pat_layer_sizes"):  # ints of NumPy and 0-d tensors are ints
        shrink(model, None, {root: [1], "model.layers.0.mlp.up_proj.weight": [torch.tensor(0), np.int64(1)]})
    assert model.model.layers[0].mlp.up_proj.out_features == 126


def test_shrink_of_a_traced_mlp_without_example_inputs_says_so_before_any_cut():
    torch.manual_seed(0)
    config = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, pad_token_id=0)
    model = T5EncoderModel(config).eval()
    before = _snapshot(model)
    root = "encoder.block.0.layer.1.DenseReluDense.wi.weight"  # T5's MLP is not found by role: Torch-Pruning traces it
    with pytest.raises(ValueError, match=rf"shrink needs `example_inputs` to trace T5EncoderModel's .* of '{root}'"):
        shrink(model, None, {root: [0]})
    _assert_unchanged(model, before)
