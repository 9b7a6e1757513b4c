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

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pat_callbacks._validation import check_choice, check_fraction
from pat_callbacks.patterns import lowest_k, prune_count
from pat_callbacks.pruner import Pruner
from pat_callbacks.targets import DEFAULT_MODULE_TYPES

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
    "get_structured_importance",
    "head_groups",
    "projection_head_groups",
    "register_importance",
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


class StructuredImportance(ABC):
    """One score per channel of a :class:`ChannelGroup` (higher = keep), over all its coupled slices.

    Subclasses reduce over the group with :meth:`ChannelGroup.channel_sums` (one ``index_select`` and one
    ``index_add_`` per coupled parameter: no per-channel loop, no host copy). A new importance is one class plus
    one :func:`register_importance` line.

    Example:
        >>> class MaxAbs(StructuredImportance):
        ...     name = "l1_mean"
        ...     def __call__(self, group, params, grads=None):
        ...         sums = group.channel_sums(lambda name, dim, idx: params[name].index_select(dim, idx).abs())
        ...         return sums / group.channel_sizes(params)
        >>> _ = register_importance(MaxAbs)
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> channel_scores(g, {"w": torch.tensor([[3.0, -1.0], [0.0, 1.0]])}, "l1_mean")
        tensor([2.0000, 0.5000])
        >>> del STRUCTURED_IMPORTANCES["l1_mean"]

    Attributes:
        name: the name used in configs (``importance=l2``).
        needs_grad: whether scores read this step's dense gradients.
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False

    @abstractmethod
    def __call__(
        self, group: ChannelGroup, params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None] | None = None
    ) -> Tensor:
        """A float tensor of ``group.n_channels`` scores."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _selected(tensors: Mapping[str, Tensor | None], what: str) -> Callable[[str, int, Tensor], Tensor]:
    def select(name: str, dim: int, index: Tensor) -> Tensor:
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"structured importance needs the {what} of {name!r}, but got none")
        return tensor.detach().index_select(dim, index).float()

    return select


def _products(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None] | None
) -> Callable[[str, int, Tensor], Tensor]:
    weights, gradients = _selected(params, "weights"), _selected(grads or {}, "gradient")
    return lambda name, dim, index: weights(name, dim, index) * gradients(name, dim, index)


class L1Importance(StructuredImportance):
    """Sum of ``|w|`` over the channel's coupled slices (Li et al. 2016).

    Example:
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> L1Importance()(g, {"w": torch.tensor([[3.0, -4.0], [0.0, 1.0]])})
        tensor([7., 1.])
    """

    name: ClassVar[str] = "l1"

    def __call__(self, group, params, grads=None):
        select = _selected(params, "weights")
        return group.channel_sums(lambda n, d, i: select(n, d, i).abs(), device=params[group.root].device)


class L2Importance(StructuredImportance):
    """Euclidean norm of the channel's coupled slices.

    Example:
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> L2Importance()(g, {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]])})
        tensor([5., 1.])
    """

    name: ClassVar[str] = "l2"

    def __call__(self, group, params, grads=None):
        select = _selected(params, "weights")
        return group.channel_sums(lambda n, d, i: select(n, d, i).square(), device=params[group.root].device).sqrt()


class GroupTaylorImportance(StructuredImportance):
    """``(sum g * w)^2`` over the channel's coupled slices with this step's dense gradients (Molchanov et al.
    2019): the squared first-order change in loss if the whole channel were removed. (Unstructured
    ``criterion="taylor"`` is another quantity: the mean of ``|w * g|`` per weight since the last update.)

    Example:
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> w, grad = torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, -1.0], [0.5, 0.5]])
        >>> GroupTaylorImportance()(g, {"w": w}, {"w": grad})
        tensor([1., 1.])
    """

    name: ClassVar[str] = "group_taylor"
    needs_grad: ClassVar[bool] = True

    def __call__(self, group, params, grads=None):
        return group.channel_sums(_products(params, grads), device=params[group.root].device).square()


class GateImportance(StructuredImportance):
    """``|sum g * w|`` over the slices that scale the channel's output: ``|dL/d gate|`` for a gate multiplying it
    (Michel et al. 2019's head importance).

    Example:
        >>> channel = [("w", 0, torch.tensor([0])), ("next", 1, torch.tensor([0]))]
        >>> g = ChannelGroup("w", 1, [channel])
        >>> GateImportance()(g, {"w": torch.ones(1, 2)}, {"w": -torch.ones(1, 2)})
        tensor([2.])
    """

    name: ClassVar[str] = "gate"
    needs_grad: ClassVar[bool] = True

    def __call__(self, group, params, grads=None):
        return group.channel_sums(_products(params, grads), gates=True, device=params[group.root].device).abs()


STRUCTURED_IMPORTANCES: dict[str, type[StructuredImportance]] = {}
_RENAMED = {"taylor": "group_taylor"}


def register_importance(cls: type[StructuredImportance]) -> type[StructuredImportance]:
    """Register a structured importance under its ``name`` (usable as ``importance="NAME"``).

    Example:
        >>> register_importance(L2Importance) is L2Importance
        True
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` class attribute to be registered")
    STRUCTURED_IMPORTANCES[cls.name] = cls
    return cls


for _cls in (L1Importance, L2Importance, GroupTaylorImportance, GateImportance):
    register_importance(_cls)


def get_structured_importance(importance: str | StructuredImportance) -> StructuredImportance:
    """An importance instance from a registered name (``"taylor"`` is the former name of ``"group_taylor"``).

    Example:
        >>> get_structured_importance("gate")
        GateImportance()
        >>> get_structured_importance("l3")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `importance` 'l3'; expected one of: 'gate', 'group_taylor', 'l1', 'l2'
    """
    if isinstance(importance, StructuredImportance):
        return importance
    if importance in _RENAMED:
        warnings.warn(
            f"importance={importance!r} is now called {_RENAMED[importance]!r} (it is (sum g*w)^2 of the whole "
            "channel, not the per-weight criterion 'taylor')",
            DeprecationWarning,
            stacklevel=3,
        )
        importance = _RENAMED[importance]
    return STRUCTURED_IMPORTANCES[check_choice("importance", importance, STRUCTURED_IMPORTANCES)]()


def channel_scores(
    group: ChannelGroup,
    params: Mapping[str, Tensor],
    importance: str | StructuredImportance = "l2",
    grads: Mapping[str, Tensor | None] | None = None,
) -> Tensor:
    """One score per channel of ``group`` by a structured importance (see :data:`STRUCTURED_IMPORTANCES`).

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> channel_scores(g, {"w": w})
        tensor([5., 1.])
    """
    return get_structured_importance(importance)(group, params, grads)


def channel_masks(
    groups: Sequence[ChannelGroup], pruned: Mapping[str, Tensor], params: Mapping[str, Tensor]
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
        for (name, dim), (index, owner) in group.flat_slices(device=masks[next(iter(group.params()))].device).items():
            hit = pruned[group.root].to(owner.device)[owner]
            masks[name].index_fill_(dim, index[hit], False)
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


class StructuredPruner(Pruner):
    """The Trainer-free core of structured pruning: whole channels (conv filters, linear neurons) and attention
    heads, each with its coupled slices, the lowest-scoring ``sparsity`` of every group pruned.

    Couplings are traced once, at construction, on ``example_inputs`` (in eval mode: BatchNorm statistics stay
    untouched).

    Args:
        model: the network.
        example_inputs: a batch of inputs for tracing.
        importance: a name in :data:`STRUCTURED_IMPORTANCES` or a :class:`StructuredImportance`.
        ignore: weight names whose channels are never removed; default: the last Conv/Linear layer (the outputs).
        attention: separate q/k/v/out projection layouts (see :func:`projection_head_groups`).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> pruner = StructuredPruner(model, torch.zeros(1, 4), importance="l1")
        >>> pruner.prune_to(0.5)
        True
        >>> {root: len(channels) for root, channels in pruner.pruned_channels().items()}
        {'0.weight': 3}
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        importance: str | StructuredImportance = "l2",
        ignore: Sequence[str] = (),
        attention: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.importance = get_structured_importance(importance)
        if not ignore:
            layers = [name for name, m in model.named_modules() if isinstance(m, DEFAULT_MODULE_TYPES)]
            ignore = (f"{layers[-1]}.weight",) if layers else ()
        self.ignore = tuple(ignore)
        was_training = model.training
        model.eval()
        try:
            heads = head_groups(model) + projection_head_groups(model, attention)
            # Attention internals are pruned by head, never by embedding dimension.
            internal = [f"{g.root.removesuffix('in_proj_weight')}out_proj.weight" for g in heads if "in_proj" in g.root]
            internal += [f"{layout[key]}.weight" for layout in attention for key in ("q", "k", "v", "out")]
            self.groups = channel_groups(model, example_inputs, ignore=[*self.ignore, *internal]) + heads
        finally:
            model.train(was_training)
        if not self.groups:
            raise ValueError(f"No prunable channel group in {type(model).__name__} (ignored: {list(self.ignore)})")
        named = dict(model.named_parameters())
        super().__init__({name: named[name] for name in sorted({n for g in self.groups for n in g.params()})})
        self.model = model

    @property
    def needs_grad(self) -> bool:
        return self.importance.needs_grad

    @property
    def scorer_name(self) -> str:
        return self.importance.name or type(self.importance).__name__

    def channel_scores(self) -> dict[str, Tensor]:
        """Per group root, one score per channel (this step's gradients where the importance needs them)."""
        grads = {name: p.grad for name, p in self.params.items()} if self.importance.needs_grad else None
        return {group.root: self.importance(group, self.params, grads) for group in self.groups}

    def prune_to(
        self,
        sparsity: float,
        *,
        final_sparsity: float | None = None,
        scores: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        step: int | None = None,
    ) -> bool:
        """Prune ``sparsity`` of every group's channels (``0.0`` lifts every mask); ``scores`` (per root, one per
        channel) replace the importance's. Returns ``False`` (masks untouched) on NaN/Inf scores."""
        sparsity = check_fraction("sparsity", sparsity)
        if sparsity == 0.0:
            self.clear()
            return True
        scores = dict(scores) if scores is not None else self.channel_scores()
        if not self._all_finite(scores, step):
            return False
        pruned = {g.root: lowest_k(scores[g.root], prune_count(g.n_channels, sparsity)) for g in self.groups}
        self.target_sparsity = sparsity
        self.set_masks(channel_masks(self.groups, pruned, self.params), optimizers=optimizers)
        return True

    def pruned_channels(self) -> dict[str, list[int]]:
        """Per root weight, the indices of the channels currently pruned (input to :func:`shrink`)."""
        if not self.masks:
            return {}
        result = {}
        for group in self.groups:
            mask = self.masks[group.root]
            index, owner = group.flat_slices(device=mask.device)[(group.root, 0)]
            kept = mask.index_select(0, index).reshape(len(index), -1).any(1).to(torch.float32)
            alive = torch.zeros(group.n_channels, device=mask.device).index_add_(0, owner, kept)
            result[group.root] = torch.nonzero(alive == 0).flatten().tolist()
        return result
