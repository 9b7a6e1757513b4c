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
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pat_callbacks._validation import check_choice, check_fraction
from pat_callbacks.attention import head_groups, projection_head_groups, shrink_transformer, transformer_groups
from pat_callbacks.channels import ChannelGroup
from pat_callbacks.patterns import lowest_k, prune_count
from pat_callbacks.pruner import Pruner
from pat_callbacks.recurrent import rnn_groups, shrink_recurrent
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


def shrink(
    model: nn.Module,
    example_inputs: Any,
    pruned: Mapping[str, Sequence[int]],
    attention: Sequence[Mapping[str, Any]] = (),
) -> nn.Module:
    """Physically remove the pruned channels (and everything coupled to them) from ``model``, in place; the smaller
    model computes what the masked one did. Attention heads and FFN neurons are cut by
    :func:`~pat_callbacks.attention.shrink_transformer`; conv filters and linear neurons by Torch-Pruning.

    ``pruned`` maps a group's root weight name to the channel indices to remove (see
    :meth:`~pat_callbacks.callbacks.structured.StructuredPruning.pruned_channels`); ``attention`` repeats the
    q/k/v/o layouts given to ``StructuredPruning``, if any. To rebuild the shrunk model later, keep ``pruned``
    (plain ints) with its ``state_dict``: build the original architecture, ``shrink`` it with the same ``pruned``,
    then ``load_state_dict`` (``torch.load(weights_only=True)`` works for both).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> shrink(model, torch.zeros(1, 4), {"0.weight": [1, 4]})[0].out_features
        4
    """
    heads, ffn = transformer_groups(model, attention)
    transformer_roots = {group.root for group in heads + ffn}
    recurrent_roots = {group.root for group in rnn_groups(model)}
    shrink_transformer(model, {root: c for root, c in pruned.items() if root in transformer_roots}, attention)
    shrink_recurrent(model, {root: c for root, c in pruned.items() if root in recurrent_roots})
    done = transformer_roots | recurrent_roots
    rest = {root: channels for root, channels in pruned.items() if root not in done and channels}
    if not rest:
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
    return model


class StructuredPruner(Pruner):
    """The Trainer-free core of structured pruning: the lowest-scoring ``sparsity`` of every group's channels,
    each with its coupled slices.

    In a model with attention (``nn.MultiheadAttention``, Hugging Face GPT-2 / BERT attention, or ``attention``
    layouts), the groups are its attention heads and the hidden neurons of its MLPs; the residual stream (model
    width, coupled to embeddings, positions, every norm and projection) is left whole. In other models they are the
    output channels of every Conv / Linear layer, with couplings (bias, BatchNorm, next layers' inputs through
    flatten / residual / concat) traced once by Torch-Pruning on ``example_inputs`` (in eval mode: BatchNorm
    statistics stay untouched). At least one channel of every group is always kept.

    Args:
        model: the network.
        example_inputs: a batch of inputs for tracing (unused for transformers).
        importance: a name in :data:`STRUCTURED_IMPORTANCES` or a :class:`StructuredImportance`.
        ignore: glob patterns of weight names (or module names) whose channels are never removed, in addition to
            the last Conv / Linear layer (the model's outputs, e.g. the classes). A pattern matching nothing is an
            error.
        attention: separate q/k/v/out projection layouts (see :func:`~pat_callbacks.attention.projection_head_groups`).

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
        names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_modules() if name]
        for pattern in ignore:
            if not any(fnmatchcase(name, pattern) for name in names):
                sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(f"`ignore` pattern {pattern!r} matches no parameter or module; names are: {sample}")
        layers = [name for name, m in model.named_modules() if isinstance(m, DEFAULT_MODULE_TYPES)]
        self.ignore = ((f"{layers[-1]}.weight",) if layers else ()) + tuple(ignore)
        self.notes: list[str] = []
        heads, ffn = transformer_groups(model, attention)
        if heads:
            groups = heads + ffn
            self.notes.append(
                f"{len(heads)} attention blocks ({sum(g.n_channels for g in heads)} heads) and {len(ffn)} MLPs "
                f"({sum(g.n_channels for g in ffn)} neurons) are pruned; the residual stream (model width) is left "
                "whole: it couples embeddings, positions, every norm and every projection"
            )
        else:
            if example_inputs is None:
                raise ValueError(
                    f"StructuredPruning needs `example_inputs` to trace {type(model).__name__}'s channel couplings "
                    "(or pl_module.example_input_array, or a datamodule whose first batch it can read)"
                )
            was_training = model.training
            model.eval()
            try:
                groups = channel_groups(model, example_inputs) + rnn_groups(model)
            finally:
                model.train(was_training)
        self.groups = [g for g in groups if not self._ignored(g)]
        if not self.groups:
            recurrent = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
            hint = (
                f"; recurrent layers ({', '.join(recurrent)}) have hidden units to remove only between stacked layers "
                "(num_layers >= 2, unidirectional, no proj_size): prune their weights with GradualPruning or "
                "DynamicSparseTraining"
                if recurrent
                else ""
            )
            raise ValueError(
                f"No prunable channel group in {type(model).__name__} (ignored: {list(self.ignore)}){hint}"
            )
        named = dict(model.named_parameters())
        super().__init__({name: named[name] for name in sorted({n for g in self.groups for n in g.params()})})
        self.model = model

    def _ignored(self, group: ChannelGroup) -> bool:
        owner = group.root.rpartition(".")[0]
        names = [group.root, owner, group.layout.get("module", owner)]
        return any(fnmatchcase(name, pattern) for name in names for pattern in self.ignore)

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
        counts = {g.root: min(prune_count(g.n_channels, sparsity), g.n_channels - 1) for g in self.groups}
        full = sorted(g.root for g in self.groups if prune_count(g.n_channels, sparsity) >= g.n_channels)
        if full:
            warnings.warn(
                f"StructuredPruner: sparsity {sparsity} would remove every channel of {full}; one is kept in each",
                UserWarning,
                stacklevel=2,
            )
        pruned = {g.root: lowest_k(scores[g.root], counts[g.root]) for g in self.groups}
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
            dim = group.root_dim
            index, owner = group.flat_slices(device=mask.device)[(group.root, dim)]
            kept = mask.index_select(dim, index).movedim(dim, 0).reshape(len(index), -1).any(1).to(torch.float32)
            alive = torch.zeros(group.n_channels, device=mask.device).index_add_(0, owner, kept)
            result[group.root] = torch.nonzero(alive == 0).flatten().tolist()
        return result
