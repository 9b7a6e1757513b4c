"""Physically remove pruned channels: attention heads, MLP neurons, recurrent units, conv filters."""

from __future__ import annotations

import operator
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
    :meth:`~pat_callbacks.callbacks.structured.StructuredPruning.pruned_channels`), named in ``model`` or in a module
    that holds it (``net.c2.weight`` from a LightningModule whose ``net`` is ``model``: the common prefix is dropped);
    ``attention`` repeats the
    q/k/v/o layouts given to ``StructuredPruning``, if any. To rebuild the shrunk model later, keep ``pruned``
    (plain ints) with its ``state_dict``: build the original architecture, ``shrink`` it with the same ``pruned``,
    then ``load_state_dict`` (``torch.load(weights_only=True)`` works for both).

    Hugging Face models inside ``model`` get their config updated to the new sizes (see
    :func:`~pat_callbacks.structured.hf.update_config`): with the same heads and intermediate size in every layer,
    ``save_pretrained`` + ``from_pretrained`` reload the shrunk model; ``uniform_per_layer=True`` makes layers that
    differ an error (otherwise they are recorded in the config for
    :func:`~pat_callbacks.structured.hf.from_pretrained_shrunk`). BERT / GPT-2 heads, which their config cannot
    hold, are always recorded (a ``UserWarning`` says so; ``uniform_per_layer=True`` refuses them), and a config
    that would not rebuild the shrunk weights at all is a ``UserWarning`` naming them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> shrink(model, torch.zeros(1, 4), {"0.weight": [1, 4]})[0].out_features
        4
    """
    pruned = relative_names(model, pruned)
    heads, ffn = transformer_groups(model, attention, heads="kv_groups")
    query_heads, _ = transformer_groups(model, attention, heads="query_heads")
    transformer_roots = {group.root for group in heads + query_heads + ffn}
    pruned = _key_roots(pruned, heads)
    recurrent = rnn_groups(model)
    recurrent_roots = {group.root for group in recurrent}
    counts = {group.root: group.n_channels for group in heads + query_heads + ffn + recurrent}
    traced = [root for root, channels in pruned.items() if root not in counts and channels]
    _check_channels(model, pruned, counts)
    if traced and example_inputs is None:
        raise ValueError(
            f"shrink needs `example_inputs` to trace {type(model).__name__}'s channel couplings of "
            f"{', '.join(repr(r) for r in traced[:3])}{' ...' if len(traced) > 3 else ''} (no attention heads, MLP "
            "neurons or recurrent units found by role); give the inputs the pruner traced, e.g. {'input_ids': ...}"
        )
    shrink_transformer(
        model,
        {root: c for root, c in pruned.items() if root in transformer_roots},
        attention,
        uniform_per_layer=uniform_per_layer,
    )
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


def _key_roots(pruned: Mapping[str, Sequence[int]], heads: Sequence[Any]) -> dict[str, Sequence[int]]:
    """``pruned`` with a ``k_proj`` root of attention with as many key/value heads as query heads (Llama-2-7B,
    whose key/value groups have the ``q_proj`` root) named by its group's root: the same heads."""
    alias = {
        f"{g.layout['k']}.weight": g.root
        for g in heads
        if g.layout.get("type") == "gqa" and g.root == f"{g.layout['q']}.weight"
    }
    renamed: dict[str, Sequence[int]] = {}
    for root, channels in pruned.items():
        name = alias.get(root, root)
        if name in renamed:
            raise ValueError(f"shrink got the heads of {name!r} twice (also as {root!r}); give one of them")
        renamed[name] = channels
    return renamed


def _check_channels(model: nn.Module, pruned: Mapping[str, Sequence[int]], counts: Mapping[str, int]) -> None:
    """Refuse (``ValueError`` naming the weight, the index and the valid range) channel indices that are not ints in
    ``range(channels)`` of their group (``counts``, else the weight's output channels): before any cut."""
    for root, channels in pruned.items():
        n = counts.get(root)
        if n is None:
            weight = model.get_parameter(root)
            n = int(weight.shape[0])
        bad = [c for c in channels if not _is_index(c, n)]
        if bad:
            raise ValueError(
                f"shrink: {root!r} has channels 0 to {n - 1}, but `pruned` gives {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}; give ints in that range"
            )


def _is_index(channel: Any, n: int) -> bool:
    """Whether ``channel`` is an int (a Python, NumPy or 0-d integer tensor one; not a bool) in ``range(n)``."""
    if isinstance(channel, bool):
        return False
    try:
        return 0 <= operator.index(channel) < n
    except TypeError:
        return False


def _update_configs(model: nn.Module, uniform_per_layer: bool) -> None:
    for note in update_config(model, uniform_per_layer):
        warnings.warn(f"shrink: {note}", UserWarning, stacklevel=3)


def relative_names(model: nn.Module, pruned: Mapping[str, Sequence[int]]) -> dict[str, Sequence[int]]:
    """``pruned`` with its names as ``model`` knows them: a prefix shared by every name (e.g. ``net.`` from the
    LightningModule around ``model``) is dropped when that makes them ``model``'s parameter names.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> relative_names(model, {"net.0.weight": [1]})
        {'0.weight': [1]}
        >>> relative_names(model, {"net.9.weight": [1]})
        Traceback (most recent call last):
        ...
        ValueError: shrink: 'net.9.weight' is no parameter of Sequential (nor is any of its suffixes); parameters: \
0.weight, 0.bias, 2.weight, 2.bias
    """
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if all(root in names for root in pruned):
        return dict(pruned)
    for root in pruned:
        parts = root.split(".")
        for cut in range(1, len(parts)):
            prefix = ".".join(parts[:cut]) + "."
            if ".".join(parts[cut:]) in names and all(
                r.startswith(prefix) and r[len(prefix) :] in names for r in pruned
            ):
                return {r[len(prefix) :]: channels for r, channels in pruned.items()}
        if root not in names:
            sample = ", ".join(list(dict.fromkeys(n for n, _ in model.named_parameters()))[:8])
            raise ValueError(
                f"shrink: {root!r} is no parameter of {type(model).__name__} (nor is any of its suffixes); "
                f"parameters: {sample}"
            )
    raise ValueError(f"shrink: the names {sorted(pruned)} mix prefixes; give them as {type(model).__name__} names them")
