"""StructuredPruner: whole channels (neurons, filters, heads) masked with their coupled slices."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core._validation import check_fraction
from pat_callbacks.core.masked import MaskedParameters
from pat_callbacks.core.patterns import lowest_k, prune_count
from pat_callbacks.core.targets import DEFAULT_MODULE_TYPES
from pat_callbacks.structured.attention import (
    transformer_groups,
)
from pat_callbacks.structured.channels import ChannelGroup
from pat_callbacks.structured.groups import channel_groups
from pat_callbacks.structured.importance import StructuredImportance, get_structured_importance
from pat_callbacks.structured.recurrent import rnn_groups


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


class StructuredPruner(MaskedParameters):
    """The Trainer-free core of structured pruning: the lowest-scoring ``sparsity`` of every group's channels,
    each with its coupled slices.

    In a model with attention (``nn.MultiheadAttention``, Hugging Face GPT-2 / BERT attention, or ``attention``
    layouts), the groups are its attention heads and the hidden neurons of its MLPs; the residual stream (model
    width, coupled to embeddings, positions, every norm and projection) is left whole. In other models they are the
    output channels of every Conv / Linear layer, with couplings (bias, BatchNorm, next layers' inputs through
    flatten / residual / concat) traced once by Torch-Pruning on ``example_inputs`` (in eval mode: BatchNorm
    statistics stay untouched). At least one channel of every group is always kept.

    It shares mask enforcement and checkpoints with :class:`~pat_callbacks.core.pruner.Pruner` through
    :class:`~pat_callbacks.core.masked.MaskedParameters`, but not ``regrow``: regrowing single weights would leave
    channels partly zero, so it has none.

    Args:
        model: the network.
        example_inputs: a batch of inputs for tracing (unused for transformers).
        importance: a name in :data:`STRUCTURED_IMPORTANCES` or a :class:`StructuredImportance`.
        ignore: glob patterns of weight names (or module names) whose channels are never removed, in addition to
            the last Conv / Linear layer (the model's outputs, e.g. the classes). A pattern matching nothing is an
            error.
        attention: separate q/k/v/out projection layouts (see
            :func:`~pat_callbacks.structured.attention.projection_head_groups`).

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

    def accumulate(self) -> None:
        """Nothing to accumulate: structured importances read this step's weights and gradients."""

    def after_update(self) -> None:
        """Nothing to restart after an update (no history)."""

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
        if not self.all_finite(scores, step):
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
