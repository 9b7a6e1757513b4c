"""Channel groups for structured pruning, from Torch-Pruning's dependency graph.

A *channel* of a Conv/Linear layer is one output filter or neuron. Removing it also removes whatever is coupled
to it: its bias, the matching BatchNorm scale and shift, and the next layers' input columns (through flatten,
residual adds and concatenations). Torch-Pruning (``torch-pruning`` on PyPI) traces those couplings; this module
turns each coupled set into index slices of named parameters, so masks can zero whole channels during training
and :func:`shrink` can remove them afterwards.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> groups = channel_groups(model, torch.zeros(1, 3, 8, 8), ignore=["3.weight"])
    >>> [(g.root, g.n_channels) for g in groups]
    [('0.weight', 4)]
    >>> sorted({name for name, dim, idx in groups[0].slices[0]})
    ['0.bias', '0.weight', '1.bias', '1.weight', '3.weight']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ChannelGroup",
    "channel_groups",
    "channel_masks",
    "channel_scores",
    "head_groups",
    "projection_head_groups",
    "shrink",
]


@dataclass
class ChannelGroup:
    """One prunable layer (``root``, its weight's name) and, per output channel, the coupled parameter slices
    ``(parameter name, dim, indices)`` that go with it.

    Example:
        >>> group = ChannelGroup("fc.weight", 2)
        >>> group.root, group.n_channels, group.slices
        ('fc.weight', 2, [])"""

    root: str
    n_channels: int
    slices: list[list[tuple[str, int, Tensor]]] = field(default_factory=list)
    # Slices whose joint scaling scales the channel's output (its "gate"); default: the root layer's out slices.
    gate_slices: list[list[tuple[str, int, Tensor]]] = field(default_factory=list)

    def gates(self) -> list[list[tuple[str, int, Tensor]]]:
        """Per channel, the slices that scale its output (for the ``gate`` importance).

        Example:
            >>> channel = [("fc.weight", 0, torch.tensor([0])), ("next.weight", 1, torch.tensor([0]))]
            >>> g = ChannelGroup("fc.weight", 1, [channel])
            >>> [name for name, _, _ in g.gates()[0]]
            ['fc.weight']
        """
        if self.gate_slices:
            return self.gate_slices
        root_bias = self.root.removesuffix("weight") + "bias"
        return [[sl for sl in channel if sl[1] == 0 and sl[0] in (self.root, root_bias)] for channel in self.slices]

    def params(self) -> set[str]:
        """Names of every parameter this group touches.

        Example:
            >>> ChannelGroup("fc.weight", 1, [[("fc.weight", 0, torch.tensor([0]))]]).params()
            {'fc.weight'}
        """
        return {name for channel in self.slices for name, _, _ in channel}


def _graph(model: nn.Module, example_inputs: Any) -> Any:
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def channel_groups(model: nn.Module, example_inputs: Any, ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """Every Conv/Linear output-channel group of ``model`` (roots whose weight is named in ``ignore`` are kept
    whole: typically the classifier, whose outputs are the classes).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [(g.root, g.n_channels) for g in channel_groups(model, torch.zeros(1, 4), ignore=["2.weight"])]
        [('0.weight', 3)]"""
    graph = _graph(model, example_inputs)
    module_names = {module: name for name, module in model.named_modules()}
    ignored = [m for m in model.modules() if f"{module_names[m]}.weight".lstrip(".") in set(ignore)]
    groups = []
    for group in graph.get_all_groups(root_module_types=[nn.Conv1d, nn.Conv2d, nn.Linear], ignored_layers=ignored):
        root_dep, root_idxs = group[0].dep, list(group[0].idxs)
        root = root_dep.target.module
        result = ChannelGroup(root=f"{module_names[root]}.weight".lstrip("."), n_channels=len(root_idxs))
        for index in root_idxs:
            channel_group = graph.get_pruning_group(root, root_dep.handler, idxs=[index])
            result.slices.append(_slices(channel_group, module_names))
        groups.append(result)
    return groups


def head_groups(model: nn.Module) -> list[ChannelGroup]:
    """One group per ``nn.MultiheadAttention`` (packed q/k/v projection): per head, its q, k and v rows of
    ``in_proj_weight`` / ``in_proj_bias`` and its columns of ``out_proj.weight``; the gate is the head's v rows
    (scaling them scales the head's output, so ``gate`` importance is Michel et al. 2019's head importance).

    Example:
        >>> attention = nn.MultiheadAttention(8, 2)
        >>> [(g.root, g.n_channels) for g in head_groups(nn.ModuleDict({"attn": attention}))]
        [('attn.in_proj_weight', 2)]
    """
    groups = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        if not module._qkv_same_embed_dim:
            raise ValueError(f"{name!r}: only MultiheadAttention with a packed in_proj_weight is supported")
        prefix = f"{name}." if name else ""
        embed, heads = module.embed_dim, module.num_heads
        width = embed // heads
        group = ChannelGroup(root=f"{prefix}in_proj_weight", n_channels=heads)
        for head in range(heads):
            block = torch.arange(head * width, (head + 1) * width)
            rows = torch.cat([block + k * embed for k in range(3)])
            slices = [(f"{prefix}in_proj_weight", 0, rows), (f"{prefix}out_proj.weight", 1, block)]
            gate = [(f"{prefix}in_proj_weight", 0, block + 2 * embed)]
            if module.in_proj_bias is not None:
                slices.append((f"{prefix}in_proj_bias", 0, rows))
                gate.append((f"{prefix}in_proj_bias", 0, block + 2 * embed))
            group.slices.append(slices)
            group.gate_slices.append(gate)
        groups.append(group)
    return groups


def projection_head_groups(model: nn.Module, layouts: Sequence[Mapping[str, Any]]) -> list[ChannelGroup]:
    """Head groups for attention written as separate projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
    Linear layers, as in most transformer code). Each layout names the four modules and ``num_heads``; per head,
    its rows of q/k/v (and their biases) and its columns of the output projection; the gate is its v rows.

    Example:
        >>> attn = nn.ModuleDict({n: nn.Linear(8, 8) for n in ("q", "k", "v", "o")})
        >>> layout = {"q": "q", "k": "k", "v": "v", "out": "o", "num_heads": 2}
        >>> [(g.root, g.n_channels) for g in projection_head_groups(attn, [layout])]
        [('q.weight', 2)]
    """
    modules = dict(model.named_modules())
    groups = []
    for layout in layouts:
        missing = [key for key in ("q", "k", "v", "out", "num_heads") if key not in layout]
        if missing:
            raise ValueError(f"Attention layout {dict(layout)!r} lacks {missing}; it needs q, k, v, out, num_heads")
        for key in ("q", "k", "v", "out"):
            if not isinstance(modules.get(layout[key]), nn.Linear):
                raise ValueError(f"Attention layout `{key}`={layout[key]!r} is not a Linear module of the model")
        heads = int(layout["num_heads"])
        width, remainder = divmod(modules[layout["q"]].out_features, heads)
        if remainder or heads < 1:
            raise ValueError(f"num_heads={heads} does not divide {layout['q']!r}'s {width * heads + remainder} outputs")
        group = ChannelGroup(root=f"{layout['q']}.weight", n_channels=heads)
        for head in range(heads):
            block = torch.arange(head * width, (head + 1) * width)
            slices, gate = [], []
            for key in ("q", "k", "v"):
                module = modules[layout[key]]
                part = [(f"{layout[key]}.weight", 0, block)]
                if module.bias is not None:
                    part.append((f"{layout[key]}.bias", 0, block))
                slices += part
                if key == "v":
                    gate = part
            slices.append((f"{layout['out']}.weight", 1, block))
            group.slices.append(slices)
            group.gate_slices.append(gate)
        groups.append(group)
    return groups


def _slices(group: Any, module_names: dict[nn.Module, str]) -> list[tuple[str, int, Tensor]]:
    slices = []
    for dep, idxs in group:
        module, handler = dep.target.module, dep.handler.__name__
        name = module_names.get(module, "")
        index = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
        prefix = f"{name}." if name else ""
        if handler == "prune_out_channels" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            slices.append((f"{prefix}weight", 0, index))
            if module.bias is not None:
                slices.append((f"{prefix}bias", 0, index))
        elif handler == "prune_out_channels" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                slices += [(f"{prefix}weight", 0, index), (f"{prefix}bias", 0, index)]
        elif (
            handler == "prune_in_channels"
            and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))
            and getattr(module, "groups", 1) == 1
        ):
            slices.append((f"{prefix}weight", 1, index))
    return slices


def channel_scores(
    group: ChannelGroup, params: dict[str, Tensor], criterion: str = "l2", grads: dict[str, Tensor] | None = None
) -> Tensor:
    """One score per channel over all its coupled slices: ``l1`` / ``l2`` norm (Li et al. 2016), ``taylor``
    ``(sum g * w)^2`` (Molchanov et al. 2019), or ``gate``: ``|sum g * w|`` over the slices that scale the
    channel's output, which is ``|dL/d gate|`` for a gate multiplying it (Michel et al. 2019 for heads).

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> channel_scores(g, {"w": w})
        tensor([5., 1.])
    """
    scores = []
    per_channel = group.gates() if criterion == "gate" else group.slices
    for channel in per_channel:
        total = torch.zeros((), dtype=torch.float32)
        for name, dim, index in channel:
            values = params[name].detach().index_select(dim, index.to(params[name].device)).float().cpu()
            if criterion == "l1":
                total = total + values.abs().sum()
            elif criterion == "l2":
                total = total + values.square().sum()
            elif criterion in ("taylor", "gate"):
                if grads is None or grads.get(name) is None:
                    raise ValueError(f"structured criterion {criterion!r} needs gradients, but got none")
                grad = grads[name].detach().index_select(dim, index.to(grads[name].device)).float().cpu()
                total = total + (values * grad).sum()
            else:
                raise ValueError(
                    f"Unknown structured `criterion` {criterion!r}; expected one of: 'gate', 'l1', 'l2', 'taylor'"
                )
        scores.append(total)
    stacked = torch.stack(scores)
    if criterion == "l2":
        return stacked.sqrt()
    if criterion == "taylor":
        return stacked.square()
    return stacked.abs() if criterion == "gate" else stacked


def channel_masks(
    groups: Sequence[ChannelGroup], pruned: dict[str, Tensor], params: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Bool masks for every coupled parameter, ``False`` on the slices of each pruned channel.

    ``pruned`` maps a group's root to a bool tensor over its channels (``True`` = pruned).

    Example:
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> channel_masks([g], {"w": torch.tensor([False, True])}, {"w": torch.ones(2, 3)})["w"].tolist()
        [[True, True, True], [False, False, False]]
    """
    masks = {name: torch.ones_like(params[name], dtype=torch.bool) for g in groups for name in g.params()}
    for group in groups:
        for channel in torch.nonzero(pruned[group.root]).flatten().tolist():
            for name, dim, index in group.slices[channel]:
                masks[name].index_fill_(dim, index.to(masks[name].device), False)
    return masks


def shrink(model: nn.Module, example_inputs: Any, pruned: dict[str, Sequence[int]]) -> nn.Module:
    """Physically remove the pruned channels (and everything coupled to them) from ``model``, in place, with
    Torch-Pruning; the smaller model computes what the masked one did.

    ``pruned`` maps a root weight name to the channel indices to remove (see
    :meth:`~pat_callbacks.callbacks.structured.StructuredPruning.pruned_channels`). To rebuild the shrunk model
    later, keep ``pruned`` (plain ints) with its ``state_dict``: build the original architecture, ``shrink`` it
    with the same ``pruned``, then ``load_state_dict`` (``torch.load(weights_only=True)`` works for both).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> shrink(model, torch.zeros(1, 4), {"0.weight": [1, 4]})[0].out_features
        4
    """
    graph = _graph(model, example_inputs)
    modules = dict(model.named_modules())
    for root, channels in pruned.items():
        if not channels:
            continue
        module = modules[root.rsplit(".", 1)[0] if "." in root else ""]
        import torch_pruning as tp

        handler = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, handler, idxs=sorted(int(c) for c in channels))
        if graph.check_pruning_group(group):
            group.prune()
    return model
