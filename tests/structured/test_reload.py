"""``from_pretrained_shrunk`` on what a hostile-use pass found: Llama attention with as many key/value heads as query
heads, layers whose heads differ in both counts, another class on top of the saved model, ``.bin`` folders, its
keyword arguments and messages. Every reload computes what the shrunk model computed (to 1e-6 on a fixed input)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pat_callbacks.structured import StructuredPruner, from_pretrained_shrunk, shrink  # noqa: E402
from pat_callbacks.structured.hf import LAYER_SIZES_KEY  # noqa: E402

VOCAB = 32


def _tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def _output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(_tokens())
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _llama(config_class: Any = None, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = (config_class or transformers.LlamaConfig)(**(sizes | kwargs))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _quiet_shrink(model: nn.Module, pruned: dict[str, list[int]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shrink(model, None, pruned)


@pytest.mark.parametrize(
    ("config_class", "head_dim"), [(transformers.LlamaConfig, None), (transformers.GemmaConfig, 8)]
)
def test_multi_head_attention_one_layer_excluded_reloads(tmp_path, config_class, head_dim):
    # num_key_value_heads == num_attention_heads (Llama-2-7B, Gemma-7B): the key/value groups' root is q_proj
    model = _llama(config_class, num_key_value_heads=4, **({"head_dim": head_dim} if head_dim else {}))
    pruner = StructuredPruner(model, None, exclude=["model.layers.1.*"])
    pruner.prune_to(0.5)
    _quiet_shrink(model, pruner.pruned_channels())
    assert getattr(model.config, LAYER_SIZES_KEY)["model.layers.0.self_attn"] == {
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    expected = _output(model)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)
    assert [layer.self_attn.k_proj.out_features for layer in reloaded.model.layers] == [16, 32]
    assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)


def test_layers_with_other_head_and_key_value_counts_reload(tmp_path):
    # 16 heads over 4 key/value heads; layer 0 keeps 8 over 2 (whole groups), layer 1 8 over 4 (2 per group)
    model = _llama(hidden_size=64, num_attention_heads=16, num_key_value_heads=4)
    _quiet_shrink(
        model,
        {
            "model.layers.0.self_attn.k_proj.weight": [2, 3],
            "model.layers.1.self_attn.q_proj.weight": [g * 4 + i for g in range(4) for i in (2, 3)],
        },
    )
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (16, 4)  # both layers are cut from it
    assert getattr(config, LAYER_SIZES_KEY) == {
        "model.layers.0.self_attn": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 4},
        "model.layers.1.self_attn": {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4},
    }
    expected = _output(model)
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained_shrunk(tmp_path)
    assert [(a.q_proj.out_features, a.k_proj.out_features) for a in (x.self_attn for x in reloaded.model.layers)] == [
        (32, 8),
        (32, 16),
    ]
    assert torch.allclose(_output(reloaded), expected, atol=1e-6, rtol=0)
