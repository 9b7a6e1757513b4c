"""Structured pruning: whole channels (neurons, conv filters, attention heads, recurrent units) and shrinking.

- :mod:`~pat_callbacks.structured.channels`: :class:`ChannelGroup`, a channel with all its coupled slices;
- :mod:`~pat_callbacks.structured.groups`: groups of Conv/Linear models from Torch-Pruning's dependency graph;
- :mod:`~pat_callbacks.structured.attention`, :mod:`~pat_callbacks.structured.recurrent`: groups found by role in
  transformers (heads, MLP neurons) and stacked RNNs, and how to cut them;
- :mod:`~pat_callbacks.structured.importance`: one score per channel;
- :mod:`~pat_callbacks.structured.pruner`: :class:`StructuredPruner`, the Trainer-free core;
- :mod:`~pat_callbacks.structured.shrink`: :func:`shrink`, the physically smaller model;
- :mod:`~pat_callbacks.structured.hf`: Hugging Face configs of shrunk models;
  :mod:`~pat_callbacks.structured.reload`: :func:`from_pretrained_shrunk`, reloading them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pat_callbacks.structured import StructuredPruner, shrink
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> pruner = StructuredPruner(model, torch.zeros(1, 4))
    >>> pruner.prune_to(0.5)
    True
    >>> shrink(model, torch.zeros(1, 4), pruner.pruned_channels())[0].out_features
    3
"""

from pat_callbacks.structured.attention import gqa_group, head_groups, projection_head_groups
from pat_callbacks.structured.channels import ChannelGroup
from pat_callbacks.structured.groups import channel_groups
from pat_callbacks.structured.hf import from_pretrained_shrunk
from pat_callbacks.structured.importance import (
    STRUCTURED_IMPORTANCES,
    GateImportance,
    GroupTaylorImportance,
    L1Importance,
    L2Importance,
    StructuredImportance,
    channel_scores,
    get_structured_importance,
    register_importance,
)
from pat_callbacks.structured.pruner import StructuredPruner, channel_masks
from pat_callbacks.structured.shrink import shrink

__all__ = [
    "STRUCTURED_IMPORTANCES",
    "ChannelGroup",
    "GateImportance",
    "GroupTaylorImportance",
    "L1Importance",
    "L2Importance",
    "StructuredImportance",
    "StructuredPruner",
    "channel_groups",
    "channel_masks",
    "channel_scores",
    "from_pretrained_shrunk",
    "get_structured_importance",
    "gqa_group",
    "head_groups",
    "projection_head_groups",
    "register_importance",
    "shrink",
]
