"""Cutting transformer structure for real: remove pruned attention heads and FFN neurons from a model, in place.

:func:`shrink_transformer` removes pruned heads and neurons (the groups :mod:`~pat_callbacks.structured.roles` finds):
the Linear / Conv1D layers are sliced in place (their modules keep their identity and names, so a shrunk model's
``state_dict`` reloads into an equally shrunk one), the attention modules' head counts are updated, and an
``nn.MultiheadAttention`` (which cannot hold fewer heads than its width allows) is replaced by an equivalent
:class:`~pat_callbacks.structured.pruned_attention.PrunedMultiheadAttention`.

Example:
    >>> import torch
    >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    >>> heads, ffn = transformer_groups(layer)
    >>> x = torch.randn(2, 5, 16)
    >>> with torch.no_grad():
    ...     for name, dim, index in heads[0].slices[1] + ffn[0].slices[3] + ffn[0].slices[7]:
    ...         _ = layer.get_parameter(name).index_fill_(dim, index, 0.0)
    ...     expected = layer(x)
    >>> shrunk = shrink_transformer(layer, {"self_attn.in_proj_weight": [1], "linear1.weight": [3, 7]})
    >>> shrunk.self_attn.num_heads, shrunk.linear1.out_features, torch.allclose(shrunk(x), expected, atol=1e-5)
    (3, 30, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.structured.channels import ChannelGroup
from pat_callbacks.structured.pruned_attention import PrunedMultiheadAttention
from pat_callbacks.structured.roles import _is_conv1d, _rows, transformer_groups

__all__ = ["shrink_transformer"]


def _keep(n: int, pruned: Sequence[int]) -> list[int]:
    drop = {int(c) for c in pruned}
    return [i for i in range(n) if i not in drop]


def _cut(module: nn.Module, weight_dim: int, index: Tensor, with_bias: bool) -> None:
    """Keep ``index`` along ``weight_dim`` of ``module.weight`` (and of its bias if ``with_bias``), in place, and
    update the layer's size attributes (Linear ``in/out_features``, Conv1D ``nx/nf``)."""
    with torch.no_grad():
        index = index.to(module.weight.device)
        module.weight = nn.Parameter(module.weight.index_select(weight_dim, index).clone(), module.weight.requires_grad)
        if with_bias and module.bias is not None:
            module.bias = nn.Parameter(module.bias.index_select(0, index).clone(), module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif _is_conv1d(module):
        module.nx, module.nf = module.weight.shape


def _head_plan(group: ChannelGroup, keep: list[int]) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) a q/k/v/o attention keeps when its group keeps ``keep``; refused (naming the
    projection and the counts) when the key/value groups would keep different numbers of query heads."""
    layout = group.layout
    heads, kv_heads = int(layout["num_heads"]), int(layout["num_kv_heads"])
    per = heads // kv_heads
    if layout["unit"] != "query_heads":
        return [kv * per + i for kv in keep for i in range(per)], keep
    counts = {sum(1 for h in keep if h // per == kv) for kv in range(kv_heads)}
    if len(counts) != 1:
        raise ValueError(
            f"shrink of {layout['q']!r}: every key/value group must keep the same number of query heads, but "
            f"the kept heads {keep} leave {sorted(counts)} per group"
        )
    return keep, list(range(kv_heads))


def _shrink_heads(model: nn.Module, group: ChannelGroup, keep: list[int]) -> None:
    layout = group.layout
    kind = layout["type"]
    if kind == "mha":
        name = layout["module"]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PrunedMultiheadAttention.from_heads(model.get_submodule(name), keep))
        return
    if kind == "gpt2":
        module = model.get_submodule(layout["module"])
        width, inner = int(module.head_dim), int(module.num_heads) * int(module.head_dim)
        block = torch.cat([torch.arange(h * width, (h + 1) * width) for h in keep])
        _cut(module.c_attn, 1, torch.cat([block + k * inner for k in range(3)]), with_bias=True)
        _cut(module.c_proj, 0, block, with_bias=False)
        module.num_heads, module.split_size = len(keep), len(keep) * width
        return
    head_dim = int(layout["head_dim"])
    q_heads, kv_keep = _head_plan(group, keep)
    q_rows, kv_rows = _rows(q_heads, head_dim), _rows(kv_keep, head_dim)
    _cut(model.get_submodule(layout["q"]), 0, q_rows, with_bias=True)
    for key in ("k", "v"):
        _cut(model.get_submodule(layout[key]), 0, kv_rows, with_bias=True)
    _cut(model.get_submodule(layout["out"]), 1, q_rows, with_bias=False)
    if kind == "bert":
        attention = model.get_submodule(layout["q"].rpartition(".")[0])
        attention.num_attention_heads, attention.all_head_size = len(keep), len(keep) * head_dim
    else:  # found by role or a layout by hand: the module holding the projections keeps the counts
        owner = layout["q"].rpartition(".")[0]
        _set_head_counts(model.get_submodule(owner) if owner else model, len(q_heads), len(kv_keep))
    if layout.get("heads_attr"):
        owner, _, attr = str(layout["heads_attr"]).rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, len(q_heads))


def _set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Update the head counts a Llama-style attention module keeps (its config is shared by every layer: it is
    updated by :func:`~pat_callbacks.structured.hf.update_config`)."""
    values = {
        "num_key_value_groups": heads // kv_heads,
        "num_heads": heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_kv_heads": kv_heads,
    }
    for attr, value in values.items():
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)


def _owner(group: ChannelGroup) -> str:
    """The module a group's cut changes: the attention (its q/k/v/o owner) or the MLP."""
    layout = group.layout
    if group.kind == "heads" and "q" in layout:
        return str(layout["q"]).rpartition(".")[0]
    return str(layout["module"])


def _plan(
    model: nn.Module, pruned: Mapping[str, Sequence[int]], layouts: Sequence[Mapping[str, Any]]
) -> list[tuple[ChannelGroup, list[int]]]:
    """Every cut ``shrink_transformer`` will make, ``(group, kept channels)``, each precondition checked: nothing of
    ``model`` changes here, so a refused shrink leaves it as it was."""
    heads, ffn = transformer_groups(model, layouts, heads="kv_groups")
    query_heads, _ = transformer_groups(model, layouts, heads="query_heads")
    by_root = {group.root: group for group in query_heads + heads + ffn}
    plan: list[tuple[ChannelGroup, list[int]]] = []
    owners: dict[str, str] = {}
    for root, channels in pruned.items():
        group = by_root.get(root)
        if group is None or not channels:
            continue
        keep = _keep(group.n_channels, channels)
        if not keep:
            raise ValueError(f"shrink would remove every channel of {root!r}; keep at least one")
        if group.kind == "heads" and group.layout["type"] == "mha" and group.layout["module"] == "":
            raise ValueError("shrink cannot replace the model itself; wrap the MultiheadAttention in a module")
        if group.kind == "heads" and "q" in group.layout:
            _head_plan(group, keep)
        owner = _owner(group)
        if owner in owners:
            raise ValueError(
                f"shrink got {owners[owner]!r} and {root!r}, two groups of the same module {owner!r}; give one "
                "(key/value groups or query heads, as the pruner was set up)"
            )
        owners[owner] = root
        plan.append((group, keep))
    return plan


def _planned_sizes(plan: Sequence[tuple[ChannelGroup, list[int]]]) -> dict[str, dict[str, int]]:
    """Per module a cut changes, the sizes it will have (keys as :func:`~pat_callbacks.structured.hf.layer_sizes`)."""
    sizes: dict[str, dict[str, int]] = {}
    for group, keep in plan:
        if group.kind != "heads":
            sizes[_owner(group)] = {"intermediate_size": len(keep), "ffn_size": len(keep), "n_inner": len(keep)}
        elif group.layout["type"] in ("bert", "gpt2"):  # heads whose size their config gives as width / heads
            sizes[_owner(group)] = {"attention_heads": len(keep)}
        elif "q" in group.layout:
            q_heads, kv_keep = _head_plan(group, keep)
            sizes[_owner(group)] = {"num_attention_heads": len(q_heads), "num_key_value_heads": len(kv_keep)}
    return sizes


def shrink_transformer(
    model: nn.Module,
    pruned: Mapping[str, Sequence[int]],
    layouts: Sequence[Mapping[str, Any]] = (),
    *,
    uniform_per_layer: bool = False,
) -> nn.Module:
    """Remove, in place, the pruned heads and FFN neurons named in ``pruned`` (``{group root: [indices]}``, as
    :meth:`~pat_callbacks.structured.StructuredPruner.pruned_channels` returns); return the model. Roots that are
    not heads or FFN neurons of ``model`` are left for the caller (see :func:`~pat_callbacks.structured.shrink`).

    All or nothing: every cut is planned and checked before the first weight changes, so a refused shrink (a group
    left empty, query heads uneven over key/value groups, two groups of one module, and with ``uniform_per_layer``
    Hugging Face layers whose sizes one config cannot hold, see
    :func:`~pat_callbacks.structured.hf.update_config`) leaves ``model`` as it was.

    Example:
        >>> mlp = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2),
        ...                      "ffn": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))})
        >>> shrink_transformer(mlp, {"ffn.0.weight": [0, 1, 2]}).ffn[0].out_features
        29
        >>> shrink_transformer(mlp, {"ffn.0.weight": [0], "attn.in_proj_weight": [0, 1]})
        Traceback (most recent call last):
        ...
        ValueError: shrink would remove every channel of 'attn.in_proj_weight'; keep at least one
        >>> mlp.ffn[0].out_features  # refused: nothing was cut
        29
    """
    plan = _plan(model, pruned, layouts)
    if uniform_per_layer:
        from pat_callbacks.structured.hf import check_uniform

        check_uniform(model, _planned_sizes(plan))
    for group, keep in plan:
        if group.kind == "heads":
            _shrink_heads(model, group, keep)
        else:
            _shrink_ffn(model, group, keep)
    return model


def _shrink_ffn(model: nn.Module, group: ChannelGroup, keep: list[int]) -> None:
    index = torch.tensor(keep)
    up, down = model.get_submodule(group.layout["up"]), model.get_submodule(group.layout["down"])
    _cut(up, 1 if _is_conv1d(up) else 0, index, with_bias=True)
    _cut(down, 0 if _is_conv1d(down) else 1, index, with_bias=False)
    if "gate" in group.layout:
        _cut(model.get_submodule(group.layout["gate"]), 0, index, with_bias=True)
    owner = model.get_submodule(group.layout["module"])
    if isinstance(getattr(owner, "intermediate_size", None), int):
        owner.intermediate_size = len(keep)
