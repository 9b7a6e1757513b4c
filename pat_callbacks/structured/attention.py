"""Transformer structure for structured pruning, in one import: attention heads and FFN neurons found by role
(:mod:`~pat_callbacks.structured.roles`), and cut for real (:mod:`~pat_callbacks.structured.cutting`, with
:class:`~pat_callbacks.structured.pruned_attention.PrunedMultiheadAttention` for a ``nn.MultiheadAttention`` that
lost heads). This module only re-exports their public names, so ``pat_callbacks.structured.attention`` keeps
naming what it named before the split.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    >>> heads, ffn = transformer_groups(layer)
    >>> [(g.root, g.kind, g.n_channels) for g in heads + ffn]
    [('self_attn.in_proj_weight', 'heads', 4), ('linear1.weight', 'ffn', 32)]
    >>> shrunk = shrink_transformer(layer, {"self_attn.in_proj_weight": [1], "linear1.weight": [3, 7]})
    >>> type(shrunk.self_attn).__name__, shrunk.self_attn.num_heads, shrunk.linear1.out_features
    ('PrunedMultiheadAttention', 3, 30)
"""

from __future__ import annotations

from pat_callbacks.structured.cutting import shrink_transformer
from pat_callbacks.structured.pruned_attention import PrunedMultiheadAttention
from pat_callbacks.structured.roles import (
    HEAD_UNITS,
    HeadUnit,
    ffn_groups,
    gqa_group,
    head_groups,
    moe_blocks,
    projection_head_groups,
    transformer_groups,
)

__all__ = [
    "HEAD_UNITS",
    "HeadUnit",
    "PrunedMultiheadAttention",
    "ffn_groups",
    "gqa_group",
    "head_groups",
    "moe_blocks",
    "projection_head_groups",
    "shrink_transformer",
    "transformer_groups",
]
