"""Llama / Qwen2 / Mistral / Gemma-style decoders (and Mixtral) through StructuredPruning with its defaults: heads
and neurons counted on the weights reach the target, the model shrinks to what the masked one computed, and
Hugging Face's own ``save_pretrained`` / ``from_pretrained`` reload it."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from pat_callbacks import StructuredPruning
from pat_callbacks.core.patterns import prune_count
from pat_callbacks.structured import StructuredPruner
from tests.conftest import make_trainer
from tests.zoo.models import CONTEXT, DECODERS, VOCAB_SIZE, text_data

NAMES = sorted(DECODERS)


def _alive_blocks(weight: torch.Tensor, width: int) -> int:
    """Row blocks of ``width`` (heads) or rows (``width=1``, neurons) with any nonzero entry."""
    return int((weight.detach().reshape(-1, width * weight.shape[1]) != 0).any(1).sum())


def _counts(net: torch.nn.Module) -> list[tuple[int, int, int | None]]:
    """Per layer, (query heads, key/value heads, MLP neurons) alive in the weights."""
    counts = []
    for layer in net.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = attention.head_dim
        neurons = _alive_blocks(mlp.up_proj.weight, 1) if hasattr(mlp, "up_proj") else None
        counts.append(
            (
                _alive_blocks(attention.q_proj.weight, head_dim),
                _alive_blocks(attention.k_proj.weight, head_dim),
                neurons,
            )
        )
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_defaults_reach_the_target_shrink_and_reload_with_from_pretrained(tmp_path, name):
    case = DECODERS[name]
    pl.seed_everything(0, verbose=False)
    module = case.build()
    start = time.perf_counter()
    probe = StructuredPruner(module, None)  # what setup does: groups found by role, no tracing
    setup_seconds = time.perf_counter() - start
    assert setup_seconds < 5, setup_seconds
    if case.moe:
        assert any("mixture-of-experts" in note for note in probe.notes)

    pruning = StructuredPruning(sparsity=0.5)
    trainer = make_trainer(tmp_path, [pruning], max_steps=8, limit_val_batches=0)
    trainer.fit(module, datamodule=text_data())

    heads = case.heads - prune_count(case.heads, 0.5)
    kv_heads = case.kv_heads if case.kv_heads == 1 else case.kv_heads - prune_count(case.kv_heads, 0.5)
    neurons = None if case.moe else 128 - prune_count(128, 0.5)
    assert _counts(module.net) == [(heads, kv_heads, neurons)] * 2
    masked = set(pruning.pruner.masks)  # the residual stream (embeddings, norms, output head) is left whole
    assert masked and not any(word in n for n in masked for word in ("embed", "norm", "lm_head"))

    module.eval()
    tokens = torch.randint(0, VOCAB_SIZE, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(tokens)
    before = sum(p.numel() for p in module.parameters())
    pruning.shrink(module)
    assert sum(p.numel() for p in module.parameters()) < before
    for layer in module.net.model.layers:  # the weights now hold only what was kept
        attention = layer.self_attn
        assert attention.q_proj.out_features == heads * attention.head_dim
        assert attention.k_proj.out_features == attention.v_proj.out_features == kv_heads * attention.head_dim
        assert neurons is None or layer.mlp.up_proj.out_features == layer.mlp.gate_proj.out_features == neurons
    with torch.no_grad():
        got = module(tokens)
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())

    module.net.save_pretrained(tmp_path / "shrunk")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk").eval()
    assert reloaded.config.num_attention_heads == heads and reloaded.config.num_key_value_heads == kv_heads
    with torch.no_grad():
        again = reloaded(tokens).logits
    assert torch.allclose(again, expected, atol=1e-4), float((again - expected).abs().max())
    if case.tied:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
