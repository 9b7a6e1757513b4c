"""StructuredPruner: whole channels (neurons, filters, heads) masked with their coupled slices."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core._validation import check_choice, check_fraction, renamed
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.patterns import lowest_k, prune_count
from pat_callbacks.core.targets import DEFAULT_MODULE_TYPES
from pat_callbacks.structured.attention import HEAD_UNITS, HeadUnit, moe_blocks, transformer_groups
from pat_callbacks.structured.channels import ChannelGroup
from pat_callbacks.structured.groups import TRACE_SECONDS, _canonical_names, channel_groups
from pat_callbacks.structured.hf import check_uniform
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


class StructuredPruner(MaskStore):
    """The Trainer-free core of structured pruning: the lowest-scoring ``sparsity`` of every group's channels,
    each with its coupled slices.

    In a model with attention (``nn.MultiheadAttention``, Hugging Face GPT-2 / BERT attention, or ``attention``
    layouts), the groups are its attention heads and the hidden neurons of its MLPs; the residual stream (model
    width, coupled to embeddings, positions, every norm and projection) is left whole. In other models they are the
    output channels of every Conv / Linear layer, with couplings (bias, BatchNorm, next layers' inputs through
    flatten / residual / concat) traced once by Torch-Pruning on ``example_inputs`` (in eval mode: BatchNorm
    statistics stay untouched). At least one channel of every group is always kept.

    It shares mask enforcement and checkpoints with :class:`~pat_callbacks.core.pruner.Pruner` through
    :class:`~pat_callbacks.core.masks.MaskStore`, and the protocol the callbacks drive,
    :class:`~pat_callbacks.core.protocol.MaskingPruner` (it keeps no criterion history: ``criterion_state`` is
    empty, ``sensitivities`` ``None``), but not ``regrow``: regrowing single weights would leave channels partly
    zero, so it has none.

    Args:
        model: the network.
        example_inputs: a batch of inputs for tracing (unused for transformers).
        criterion: a name in :data:`STRUCTURED_IMPORTANCES` or a :class:`StructuredImportance`, kept as
            :attr:`criterion` (``importance``: its former name, still accepted); default ``"l2"``.
        exclude: (formerly ``ignore``, still accepted) glob patterns of weight names (or module names) whose
            channels are never removed, in addition to the last Conv / Linear layer (the model's outputs, e.g. the
            classes). A pattern matching nothing is an error.
        attention: separate q/k/v/out projection layouts (see
            :func:`~pat_callbacks.structured.attention.projection_head_groups`), checked against the weights.
        heads: the unit of grouped-query attention (fewer key/value heads than query heads): ``"kv_groups"`` (a
            key/value head with all the query heads sharing it), ``"query_heads"`` (query heads, the same number from
            every key/value group; key/value heads stay) or ``"auto"`` (default: key/value groups, but query heads
            for multi-query attention, whose one key/value head cannot go). See
            :func:`~pat_callbacks.structured.attention.gqa_group`.
        round_to: keep a multiple of ``round_to`` channels in every group of MLP neurons or conv / linear channels
            (rounded up, as Torch-Pruning's ``round_to``; at most all of them), so shrunk layers keep sizes tensor
            cores like (8, 16, 64). Heads are not rounded (each is ``head_dim`` wide).
        uniform_per_layer: require every attention block to have the same heads and every MLP the same neurons (so
            the shrunk Hugging Face model has one config for all layers); a layer kept whole by ``ignore`` or of
            another size is an error.
        trace_timeout: seconds allowed for tracing a model without attention found by role (``None``: unbounded).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> pruner = StructuredPruner(model, torch.zeros(1, 4), criterion="l1")
        >>> pruner.prune_to(0.5)
        True
        >>> {root: len(channels) for root, channels in pruner.pruned_channels().items()}
        {'0.weight': 3}
        >>> StructuredPruner(model, torch.zeros(1, 4), criterion="l3")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `criterion` 'l3'; expected one of: 'gate', 'group_taylor', 'l1', 'l2'
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        criterion: str | StructuredImportance | None = None,
        exclude: Sequence[str] = (),
        importance: str | StructuredImportance | None = None,
        ignore: Sequence[str] | None = None,
        attention: Sequence[Mapping[str, Any]] = (),
        heads: HeadUnit = "auto",
        round_to: int | None = None,
        uniform_per_layer: bool = False,
        trace_timeout: float | None = TRACE_SECONDS,
    ) -> None:
        criterion, _ = renamed("importance", importance, "criterion", criterion, None)
        ignore, ignore_key = renamed("ignore", ignore, "exclude", tuple(exclude), ())
        self.criterion = get_structured_importance("l2" if criterion is None else criterion)
        self.sensitivities: dict[str, float] | None = None  # no sensitivity allocation here
        self.heads = check_choice("heads", heads, HEAD_UNITS)
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"Expected `round_to` to be a positive int (e.g. 8, 16, 64) or None, but got {round_to!r}")
        self.round_to = round_to
        if trace_timeout is not None and not trace_timeout > 0:
            raise ValueError(
                f"Expected `trace_timeout` to be a positive number of seconds or None, but got {trace_timeout!r}"
            )
        names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_modules() if name]
        for pattern in ignore:
            if not any(fnmatchcase(name, pattern) for name in names):
                sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"`{ignore_key}` pattern {pattern!r} matches no parameter or module; names are: {sample}"
                )
        layers = [name for name, m in model.named_modules() if isinstance(m, DEFAULT_MODULE_TYPES)]
        self.ignore = ((f"{layers[-1]}.weight",) if layers else ()) + tuple(ignore)
        self.notes: list[str] = []
        head_groups, ffn = transformer_groups(model, attention, self.heads)
        if head_groups:
            groups = head_groups + ffn
            units = {g.layout.get("unit", "heads") for g in head_groups}
            unit = "key/value groups" if units == {"kv_groups"} and self._grouped(head_groups) else "heads"
            self.notes.append(
                f"{len(head_groups)} attention blocks ({sum(g.n_channels for g in head_groups)} {unit}) and "
                f"{len(ffn)} MLPs ({sum(g.n_channels for g in ffn)} neurons) are pruned; the residual stream (model "
                "width) is left whole: it couples embeddings, positions, every norm and every projection"
            )
            moe = moe_blocks(model)
            if moe:
                self.notes.append(
                    f"the experts of {len(moe)} mixture-of-experts blocks ({', '.join(moe[:3])}"
                    f"{', ...' if len(moe) > 3 else ''}) are left whole: their fused expert weights have no "
                    "per-expert neuron groups here; prune them with GradualPruning"
                )
        else:
            _require_forward(model)
            if example_inputs is None:
                raise ValueError(
                    f"StructuredPruning needs `example_inputs` to trace {type(model).__name__}'s channel couplings "
                    "(or pl_module.example_input_array, or a datamodule whose first batch it can read)"
                )
            was_training = model.training
            model.eval()
            try:
                groups = channel_groups(model, example_inputs, self.ignore, trace_timeout) + rnn_groups(model)
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
        if self.round_to:
            _check_round_to(self.groups, self.round_to)
        if uniform_per_layer:
            _check_uniform(groups, self.groups)
            check_uniform(model)  # a config that cannot size every layer alike (a Qwen2-MoE shared expert)
        named = dict(model.named_parameters())
        _canonicalize(self.groups, model)
        super().__init__({name: named[name] for name in sorted({n for g in self.groups for n in g.params()})})
        self.model = model

    @staticmethod
    def _grouped(groups: Sequence[ChannelGroup]) -> bool:
        return any(g.layout.get("num_kv_heads", 0) < g.layout.get("num_heads", 0) for g in groups)

    def _ignored(self, group: ChannelGroup) -> bool:
        owner = group.root.rpartition(".")[0]
        names = [group.root, owner, group.layout.get("module", owner)]
        return any(fnmatchcase(name, pattern) for name in names for pattern in self.ignore)

    @property
    def needs_grad(self) -> bool:
        """Whether the criterion reads this step's dense gradients."""
        return self.criterion.needs_grad

    @property
    def scorer_name(self) -> str:
        """The criterion's name, for messages and reports."""
        return self.criterion.name or type(self.criterion).__name__

    @property
    def criterion_state(self) -> dict[str, dict[str, Tensor]]:
        """Always empty: structured criteria keep no history between steps."""
        return {}

    def accumulate(self, step: int | None = None, next_update: int | None = None) -> None:
        """Nothing to accumulate: structured importances read this step's weights and gradients."""

    def accumulates_at(self, step: int, next_update: int | None) -> bool:
        """Never: no history (the callbacks skip :meth:`accumulate` altogether)."""
        return False

    def after_update(self) -> None:
        """Nothing to restart after an update (no history)."""

    def channel_scores(self) -> dict[str, Tensor]:
        """Per group root, one score per channel (this step's gradients where the importance needs them)."""
        grads = {name: p.grad for name, p in self.params.items()} if self.criterion.needs_grad else None
        return {group.root: self.criterion(group, self.params, grads) for group in self.groups}

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
        channel) replace the criterion's. Returns ``False`` (masks untouched) on NaN/Inf scores.

        Every group is pruned to ``sparsity`` now: there are no per-layer final targets to follow, so
        ``final_sparsity`` (accepted by :meth:`Pruner.prune_to <pat_callbacks.core.pruner.Pruner.prune_to>`) is
        refused by name rather than ignored.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
            >>> StructuredPruner(model, torch.zeros(1, 4)).prune_to(0.5, final_sparsity=0.8)
            Traceback (most recent call last):
            ...
            TypeError: StructuredPruner.prune_to takes no `final_sparsity` (got 0.8): every channel group is pruned \
to `sparsity` now; give the target as `sparsity`
        """
        if final_sparsity is not None:
            raise TypeError(
                f"StructuredPruner.prune_to takes no `final_sparsity` (got {final_sparsity!r}): every channel group "
                "is pruned to `sparsity` now; give the target as `sparsity`"
            )
        sparsity = check_fraction("sparsity", sparsity)
        if sparsity == 0.0:
            self.clear()
            return True
        scores = dict(scores) if scores is not None else self.channel_scores()
        if not self.all_finite(scores, step):
            return False
        full = sorted(
            g.root for g in self.groups if prune_count(g.n_channels // g.blocks, sparsity) >= g.n_channels // g.blocks
        )
        if full:
            warnings.warn(
                f"StructuredPruner: sparsity {sparsity} would remove every channel of {full}; one is kept in each",
                UserWarning,
                stacklevel=2,
            )
        pruned = {g.root: self._lowest(g, scores[g.root], sparsity) for g in self.groups}
        self.target_sparsity = sparsity
        self.set_masks(channel_masks(self.groups, pruned, self.params), optimizers=optimizers)
        return True

    def _lowest(self, group: ChannelGroup, scores: Tensor, sparsity: float) -> Tensor:
        """Bool over ``group``'s channels: the lowest-scoring ``sparsity`` of each of its blocks (at least one
        channel kept per block; the kept count rounded up to a multiple of ``round_to`` for neurons / channels)."""
        size = group.n_channels // group.blocks
        count = min(prune_count(size, sparsity), size - 1)
        if self.round_to and group.kind != "heads":
            count = size - min(size, -(-(size - count) // self.round_to) * self.round_to)
        blocks = scores.reshape(group.blocks, size)
        return torch.cat([lowest_k(block, count) for block in blocks])

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


def _require_forward(model: nn.Module) -> None:
    """Tracing runs ``model``'s forward: a module without one (a LightningModule that only defines
    ``training_step``) gets an error saying what is needed, not the tracer's ``NotImplementedError``."""
    owner = next((cls for cls in type(model).__mro__ if "forward" in vars(cls)), nn.Module)
    if owner is nn.Module or owner.__module__.split(".")[0] in ("lightning", "pytorch_lightning"):
        raise ValueError(
            f"StructuredPruning traces {type(model).__name__}'s forward to find which channels are coupled, but "
            f"{type(model).__name__} defines no `forward`: add one that runs the network on a batch's inputs "
            "(e.g. `def forward(self, x): return self.net(x)`), or give attention layouts with `attention=` "
            "(Hugging Face Llama / Qwen2 / Mistral / Gemma / GPT-2 / BERT attention is found without tracing)"
        )


def _canonicalize(groups: Sequence[ChannelGroup], model: nn.Module) -> None:
    """Name every slice by its parameter's ``named_parameters()`` name (a tied output head is its embedding)."""
    canonical = _canonical_names(model)
    for group in groups:
        if all(name in canonical and canonical[name] == name for name in group.params()):
            continue
        unknown = sorted(name for name in group.params() if name not in canonical)
        if unknown:
            raise ValueError(f"Channel group {group.root!r} names parameters the model does not have: {unknown}")
        group.slices = [[(canonical[n], d, i) for n, d, i in channel] for channel in group.slices]
        group.gate_slices = [[(canonical[n], d, i) for n, d, i in channel] for channel in group.gate_slices]
        group.root = canonical[group.root]
        group._flat.clear()


def _check_round_to(groups: Sequence[ChannelGroup], round_to: int) -> None:
    """Refuse a ``round_to`` that keeps every channel of every MLP / channel group (rounding up to a multiple of
    ``round_to`` keeps all of a group of at most ``round_to`` channels): nothing but heads could ever be pruned."""
    rounded = {g.root: g.n_channels // g.blocks for g in groups if g.kind != "heads"}
    stuck = {root: size for root, size in rounded.items() if size <= round_to}
    if rounded and len(stuck) == len(rounded):
        raise ValueError(
            f"`round_to`={round_to} keeps every channel of {sorted(stuck.items())}: a group of at most {round_to} "
            f"channels keeps a multiple of {round_to}, all of them, so no neuron or channel would ever be pruned; "
            f"use a round_to below {min(stuck.values())} (e.g. 8 or 16) or None"
        )


def _check_uniform(found: Sequence[ChannelGroup], kept: Sequence[ChannelGroup]) -> None:
    """``uniform_per_layer``: every attention block alike, every MLP alike, none kept whole while others of its kind
    are pruned; no BERT / GPT-2 heads pruned (their config cannot hold fewer heads of the same size)."""
    kept_ids = {id(g) for g in kept}
    pruned_kinds = {g.kind for g in kept}
    whole = sorted(g.root for g in found if id(g) not in kept_ids and g.kind in pruned_kinds)
    if whole:
        raise ValueError(
            f"uniform_per_layer=True, but `exclude` keeps {whole} whole: the shrunk layers would differ in size; "
            "drop them from `exclude` or set uniform_per_layer=False"
        )
    fixed = [g.root for g in kept if g.kind == "heads" and g.layout.get("type") in ("bert", "gpt2")]
    if fixed:
        raise ValueError(
            f"uniform_per_layer=True, but the heads of {fixed[0]!r} (and {len(fixed) - 1} more) would be pruned and "
            "a BERT / GPT-2 config cannot hold fewer heads of the same size (its head size is the width over "
            "num_attention_heads): put the attention in `exclude` (e.g. '*.attention') to prune MLP neurons only, or "
            "set uniform_per_layer=False and reload with pat_callbacks.structured.from_pretrained_shrunk"
        )
    for kind in ("heads", "ffn"):
        sizes = {g.root: g.n_channels for g in kept if g.kind == kind}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"uniform_per_layer=True, but the {kind} groups differ in size: {sizes}")
