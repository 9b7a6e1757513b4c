"""Recurrent layers for structured pruning: the hidden units of stacked ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` layers.

A hidden unit ``j`` of layer ``l`` owns row ``j`` of every gate in ``weight_ih_l{l}``, ``weight_hh_l{l}`` and their
biases, and is read through column ``j`` of ``weight_hh_l{l}`` and of the next layer's ``weight_ih_l{l+1}``. With all
of them zero the unit's state stays exactly zero (from a zero initial state), so removing it changes nothing. The
last layer's units feed the rest of the network (whose consumers are not traced) and are left whole; so is a model
with one layer. Bidirectional layers and LSTM projections are left whole too.

:func:`shrink_recurrent` replaces a pruned ``nn.GRU`` (whose layers must share one hidden size) by an equivalent
:class:`PrunedRNN`: one single-layer module per layer, each with its own width.

Example:
    >>> import torch
    >>> gru = nn.GRU(4, 8, num_layers=2, batch_first=True)
    >>> (group,) = rnn_groups(nn.ModuleDict({"rnn": gru}))
    >>> group.root, group.n_channels
    ('rnn.weight_ih_l0', 8)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.structured.channels import ChannelGroup

__all__ = ["PrunedRNN", "rnn_groups", "shrink_recurrent"]


def _gates(module: nn.RNNBase) -> int:
    """Gates stacked in each weight's rows: 4 for LSTM, 3 for GRU, 1 for a plain RNN."""
    return {"LSTM": 4, "GRU": 3}.get(module.mode, 1)


def rnn_groups(model: nn.Module) -> list[ChannelGroup]:
    """One group per inner layer of every stacked, unidirectional RNN / GRU / LSTM (see the module docstring).

    Example:
        >>> rnn_groups(nn.LSTM(4, 8))  # one layer: its units feed the rest of the network
        []
    """
    groups = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.RNNBase) or module.bidirectional or getattr(module, "proj_size", 0):
            continue
        prefix = f"{name}." if name else ""
        hidden, gates = module.hidden_size, _gates(module)
        for layer in range(module.num_layers - 1):
            root = f"{prefix}weight_ih_l{layer}"
            group = ChannelGroup(root=root, n_channels=hidden, kind="rnn", layout={"module": name, "layer": layer})
            for unit in range(hidden):
                rows = torch.tensor([g * hidden + unit for g in range(gates)])
                column = torch.tensor([unit])
                slices = [(root, 0, rows), (f"{prefix}weight_hh_l{layer}", 0, rows)]
                if module.bias:
                    slices += [(f"{prefix}bias_ih_l{layer}", 0, rows), (f"{prefix}bias_hh_l{layer}", 0, rows)]
                readers = [(f"{prefix}weight_hh_l{layer}", 1, column), (f"{prefix}weight_ih_l{layer + 1}", 1, column)]
                group.slices.append(slices + readers)
                group.gate_slices.append(readers)  # scaling the unit's output scales these columns' inputs
            groups.append(group)
    return groups


class PrunedRNN(nn.Module):
    """A stack of single-layer RNN / GRU / LSTM modules whose widths may differ (what pruning hidden units of an
    inner layer leaves). ``forward(x)`` returns ``(output, states)`` with ``states`` the per-layer final states (a
    list, since their widths differ); an initial state is not accepted.

    Example:
        >>> gru = nn.GRU(4, 8, num_layers=2, batch_first=True)
        >>> x = torch.randn(3, 5, 4)
        >>> torch.allclose(PrunedRNN.from_units(gru, [list(range(8))])(x)[0], gru(x)[0], atol=1e-6)
        True
    """

    def __init__(self, layers: Sequence[nn.RNNBase], batch_first: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.batch_first = batch_first

    @classmethod
    def from_units(cls, rnn: nn.RNNBase, keep: Sequence[Sequence[int]]) -> PrunedRNN:
        """``rnn`` with only the hidden units ``keep[l]`` of each inner layer ``l`` (the last layer is kept whole)."""
        kinds = {"GRU": nn.GRU, "LSTM": nn.LSTM}
        cls_ = kinds.get(rnn.mode, nn.RNN)
        hidden, gates = rnn.hidden_size, _gates(rnn)
        widths = [len(units) for units in keep] + [hidden]
        units = [torch.as_tensor(list(u), dtype=torch.long) for u in keep] + [torch.arange(hidden)]
        layers = []
        in_units = None  # the previous layer's kept units (columns of this layer's weight_ih)
        for layer, (width, kept) in enumerate(zip(widths, units, strict=True)):
            options: dict[str, Any] = {"bias": rnn.bias, "batch_first": rnn.batch_first}
            if cls_ is nn.RNN:
                options["nonlinearity"] = "tanh" if rnn.mode == "RNN_TANH" else "relu"
            in_size = rnn.input_size if layer == 0 else widths[layer - 1]
            new = cls_(in_size, width, num_layers=1, **options).to(rnn.weight_ih_l0.device, rnn.weight_ih_l0.dtype)
            rows = torch.cat([g * hidden + kept for g in range(gates)])
            with torch.no_grad():
                w_ih = getattr(rnn, f"weight_ih_l{layer}")[rows]
                new.weight_ih_l0.copy_(w_ih if in_units is None else w_ih[:, in_units])
                new.weight_hh_l0.copy_(getattr(rnn, f"weight_hh_l{layer}")[rows][:, kept])
                if rnn.bias:
                    new.bias_ih_l0.copy_(getattr(rnn, f"bias_ih_l{layer}")[rows])
                    new.bias_hh_l0.copy_(getattr(rnn, f"bias_hh_l{layer}")[rows])
            layers.append(new)
            in_units = kept
        shrunk = cls(layers, rnn.batch_first)
        shrunk.train(rnn.training)
        return shrunk

    def forward(self, x: Tensor, hx: Any = None) -> tuple[Tensor, list[Any]]:
        if hx is not None:
            raise ValueError("PrunedRNN takes no initial state: its layers have different widths")
        states = []
        for layer in self.layers:
            x, state = layer(x)
            states.append(state)
        return x, states


def shrink_recurrent(model: nn.Module, pruned: Mapping[str, Sequence[int]]) -> nn.Module:
    """Remove, in place, the pruned hidden units named in ``pruned`` (``{"<rnn>.weight_ih_l<l>": [units]}``);
    every RNN that loses units becomes a :class:`PrunedRNN`. Returns the model.

    Example:
        >>> model = nn.ModuleDict({"rnn": nn.LSTM(4, 8, num_layers=2)})
        >>> shrink_recurrent(model, {"rnn.weight_ih_l0": [0, 1, 2]}).rnn.layers[0].hidden_size
        5
    """
    by_module: dict[str, dict[int, list[int]]] = {}
    for group in rnn_groups(model):
        channels = pruned.get(group.root)
        if channels:
            by_module.setdefault(group.layout["module"], {})[group.layout["layer"]] = sorted(int(c) for c in channels)
    for name, layers in by_module.items():
        rnn = model.get_submodule(name)
        keep = [
            [u for u in range(rnn.hidden_size) if u not in set(layers.get(layer, []))]
            for layer in range(rnn.num_layers - 1)
        ]
        if any(not units for units in keep):
            raise ValueError(f"shrink would remove every hidden unit of a layer of {name!r}; keep at least one")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not name:
            raise ValueError("shrink cannot replace the model itself; wrap the RNN in a module")
        setattr(parent, attr, PrunedRNN.from_units(rnn, keep))
    return model
