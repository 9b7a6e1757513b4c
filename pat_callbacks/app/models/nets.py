"""Plain ``nn.Module`` networks (no pruning code in them: the callbacks do all of it).

Example:
    >>> sum(p.numel() for p in ConvBase().parameters())
    5210
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP", "ConvBase"]


class ConvBase(nn.Module):
    """The MNIST-1D paper's 1-D CNN (Greydanus 2020): three strided convs with ReLU, then one linear layer.

    Conv1d 1->C k5 s2 p1, C->C k3 s2 p1 twice, Linear (C * 5)->classes; 5,210 parameters with C=25 on
    length-40 inputs. ``channels=100`` gives the 4x-wider, more redundant variant.

    Example:
        >>> import torch
        >>> ConvBase()(torch.zeros(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: int = 25, num_classes: int = 10, input_length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        length = input_length
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(x.shape[0], 1, -1)
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network; flattens its input.

    Example:
        >>> import torch
        >>> MLP(64, (32, 32), 10)(torch.zeros(3, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(self, in_features: int = 40, hidden_sizes: Sequence[int] = (256, 256), num_classes: int = 10) -> None:
        super().__init__()
        sizes = [in_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))
