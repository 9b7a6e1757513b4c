"""Physically remove pruned channels: attention heads, MLP neurons, recurrent units, conv filters."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from pat_callbacks.structured.attention import (
    shrink_transformer,
    transformer_groups,
)
from pat_callbacks.structured.groups import _graph
from pat_callbacks.structured.hf import update_config
from pat_callbacks.structured.recurrent import rnn_groups, shrink_recurrent


def shrink(
    model: nn.Module,
    example_inputs: Any,
    pruned: Mapping[str, Sequence[int]],
    attention: Sequence[Mapping[str, Any]] = (),
    *,
    uniform_per_layer: bool = False,
) -> nn.Module:
    """Physically remove the pruned channels (and everything coupled to them) from ``model``, in place; the smaller
    model computes what the masked one did. Attention heads and FFN neurons are cut by
    :func:`~pat_callbacks.structured.attention.shrink_transformer`; conv filters and linear neurons by Torch-Pruning.

    ``pruned`` maps a group's root weight name to the channel indices to remove (see
    :meth:`~pat_callbacks.callbacks.structured.StructuredPruning.pruned_channels`); ``attention`` repeats the
    q/k/v/o layouts given to ``StructuredPruning``, if any. To rebuild the shrunk model later, keep ``pruned``
    (plain ints) with its ``state_dict``: build the original architecture, ``shrink`` it with the same ``pruned``,
    then ``load_state_dict`` (``torch.load(weights_only=True)`` works for both).

    Hugging Face models inside ``model`` get their config updated to the new sizes (see
    :func:`~pat_callbacks.structured.hf.update_config`): with the same heads and intermediate size in every layer,
    ``save_pretrained`` + ``from_pretrained`` reload the shrunk model; ``uniform_per_layer=True`` makes layers that
    differ an error (otherwise they are recorded in the config for
    :func:`~pat_callbacks.structured.hf.from_pretrained_shrunk`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> shrink(model, torch.zeros(1, 4), {"0.weight": [1, 4]})[0].out_features
        4
    """
    heads, ffn = transformer_groups(model, attention, heads="kv_groups")
    query_heads, _ = transformer_groups(model, attention, heads="query_heads")
    transformer_roots = {group.root for group in heads + query_heads + ffn}
    recurrent_roots = {group.root for group in rnn_groups(model)}
    shrink_transformer(model, {root: c for root, c in pruned.items() if root in transformer_roots}, attention)
    shrink_recurrent(model, {root: c for root, c in pruned.items() if root in recurrent_roots})
    done = transformer_roots | recurrent_roots
    rest = {root: channels for root, channels in pruned.items() if root not in done and channels}
    if not rest:
        _update_configs(model, uniform_per_layer)
        return model
    import torch_pruning as tp

    graph = _graph(model, example_inputs)
    modules = dict(model.named_modules())
    for root, channels in rest.items():
        module = modules[root.rsplit(".", 1)[0] if "." in root else ""]
        handler = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, handler, idxs=sorted(int(c) for c in channels))
        if graph.check_pruning_group(group):
            group.prune()
    _update_configs(model, uniform_per_layer)
    return model


def _update_configs(model: nn.Module, uniform_per_layer: bool) -> None:
    for note in update_config(model, uniform_per_layer):
        warnings.warn(f"shrink: {note}", UserWarning, stacklevel=3)
