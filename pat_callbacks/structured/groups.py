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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.structured.channels import ChannelGroup


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
