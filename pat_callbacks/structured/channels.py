"""A channel group: one prunable unit type of a layer (output channels, attention heads, FFN neurons) and, per
channel, the coupled parameter slices that go with it.

Example:
    >>> rows = [[("fc.weight", 0, torch.tensor([0]))], [("fc.weight", 0, torch.tensor([1]))]]
    >>> group = ChannelGroup("fc.weight", 2, rows)
    >>> group.params(), group.n_channels
    ({'fc.weight'}, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChannelGroup", "Slice"]

Slice = tuple[str, int, Tensor]  # (parameter name, dim, indices)


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
    # What the channels are ("channels": conv filters / neurons traced by Torch-Pruning; "heads"; "ffn": the hidden
    # neurons of a transformer MLP), the dim of ``root`` that indexes them, and what `shrink` needs to cut them.
    kind: str = "channels"
    root_dim: int = 0
    layout: dict[str, Any] = field(default_factory=dict)
    # Slices whose joint scaling scales the channel's output (its "gate"); default: the root layer's out slices.
    gate_slices: list[list[tuple[str, int, Tensor]]] = field(default_factory=list)
    # The channels split into ``blocks`` equal contiguous runs, each pruned by the same count (the query heads of each
    # key/value group of grouped-query attention keep one ratio); ``1``: one run.
    blocks: int = 1
    _flat: dict[tuple[str, str], dict[tuple[str, int], Any]] = field(default_factory=dict, repr=False, compare=False)

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

    def flat_slices(self, gates: bool = False, device: torch.device | str = "cpu") -> dict[tuple[str, int], Any]:
        """Per ``(parameter, dim)``, all channels' indices concatenated and the channel each index belongs to:
        what vectorised reductions over channels need (cached per device).

        Example:
            >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0, 1]))], [("w", 0, torch.tensor([2]))]])
            >>> g.flat_slices()[("w", 0)]
            (tensor([0, 1, 2]), tensor([0, 0, 1]))
        """
        key = ("gates" if gates else "slices", str(device))
        if key not in self._flat:
            parts: dict[tuple[str, int], tuple[list[Tensor], list[Tensor]]] = {}
            for channel, slices in enumerate(self.gates() if gates else self.slices):
                for name, dim, index in slices:
                    indices, owners = parts.setdefault((name, dim), ([], []))
                    indices.append(index)
                    owners.append(torch.full((len(index),), channel, dtype=torch.long))
            self._flat[key] = {k: (torch.cat(i).to(device), torch.cat(o).to(device)) for k, (i, o) in parts.items()}
        return self._flat[key]

    def channel_sums(
        self, values: Callable[[str, int, Tensor], Tensor], gates: bool = False, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Per channel, the sum of ``values(name, dim, index)`` (a tensor selected along ``dim``, on ``device``)
        over its slices: one selection and one ``index_add_`` per coupled parameter.

        Example:
            >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 1, torch.tensor([1]))]])
            >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
            >>> g.channel_sums(lambda name, dim, index: w.index_select(dim, index))
            tensor([3., 6.])
        """
        total = torch.zeros(self.n_channels, device=device)
        for (name, dim), (index, owner) in self.flat_slices(gates, device).items():
            selected = values(name, dim, index)
            total.index_add_(0, owner, selected.movedim(dim, 0).reshape(len(index), -1).sum(1, dtype=torch.float32))
        return total

    def channel_sizes(self, params: Mapping[str, Tensor]) -> Tensor:
        """Per channel, the number of parameter entries in its slices.

        Example:
            >>> g = ChannelGroup("w", 1, [[("w", 0, torch.tensor([0]))]])
            >>> g.channel_sizes({"w": torch.zeros(2, 3)})
            tensor([3.])
        """
        ones = {name: torch.ones_like(params[name]) for name in self.params()}
        device = params[self.root].device
        return self.channel_sums(lambda name, dim, index: ones[name].index_select(dim, index), device=device)

    def params(self) -> set[str]:
        """Names of every parameter this group touches.

        Example:
            >>> ChannelGroup("fc.weight", 1, [[("fc.weight", 0, torch.tensor([0]))]]).params()
            {'fc.weight'}
        """
        return {name for channel in self.slices for name, _, _ in channel}
