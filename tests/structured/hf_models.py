"""Tiny Hugging Face encoders from small random configs (no download), shared by the shrink / reload tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 32


def tiny_bert(model_class: Any = None, **config: Any) -> nn.Module:
    """A 2-layer BERT, hidden 16, 4 heads, MLP 32 (``model_class``: default ``BertModel``; ``config``: more
    ``BertConfig`` fields), seeded and in eval mode."""
    import transformers

    torch.manual_seed(0)
    bert_config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=16,
        pad_token_id=0,
        **config,
    )
    return (model_class or transformers.BertModel)(bert_config).eval()


def tiny_albert(model_class: Any = None) -> nn.Module:
    """A 2-layer ALBERT (one shared layer), embedding 8, hidden 16, 4 heads, MLP 32 (default ``AlbertModel``)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return (model_class or transformers.AlbertModel)(config).eval()
