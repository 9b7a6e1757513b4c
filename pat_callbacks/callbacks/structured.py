"""StructuredPruning: remove whole output channels (conv filters, linear neurons) along a sparsity schedule.

Example:
    >>> pruning = StructuredPruning(final_sparsity=0.5, importance="l2", start_step=0, end_step=100)
    >>> pruning.method_name
    'cubic/structured-l2'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from pat_callbacks._validation import check_choice
from pat_callbacks.callbacks.gradual import GradualPruning
from pat_callbacks.patterns import prune_count
from pat_callbacks.schedules import Schedule
from pat_callbacks.structured import (
    ChannelGroup,
    channel_groups,
    channel_masks,
    channel_scores,
    head_groups,
    projection_head_groups,
)
from pat_callbacks.targets import DEFAULT_MODULE_TYPES, normalize_patterns

__all__ = ["StructuredPruning"]

IMPORTANCES = ("l1", "l2", "taylor", "gate")


class StructuredPruning(GradualPruning):
    """Prune ``final_sparsity`` of the output channels of every Conv/Linear layer and of the heads of every
    ``nn.MultiheadAttention`` (uniformly per layer), following a schedule. Each pruned channel's coupled
    parameters (bias, BatchNorm scale/shift, the next layers' input columns) are masked with it, so
    :func:`pat_callbacks.structured.shrink` can later remove conv/linear channels for real; a pruned head's q/k/v
    rows and output-projection columns are masked (heads are not physically removed yet).

    Couplings come from Torch-Pruning's dependency graph, traced once in ``setup`` on ``example_inputs`` (default:
    ``pl_module.example_input_array``, else the first training batch's inputs).

    Args:
        final_sparsity: fraction of each layer's channels removed at the end of the window.
        importance: channel score over all coupled slices: ``"l2"`` / ``"l1"`` norm (Li et al. 2016),
            ``"taylor"`` ``(sum g * w)^2`` with this step's dense gradients (Molchanov et al. 2019), or ``"gate"``:
            ``|dL/d gate|`` of a gate scaling the channel's (or attention head's) output (Michel et al. 2019).
        ignore: weight names of layers whose channels are never removed; default: the last Conv/Linear layer
            (its outputs are the model's outputs, e.g. the classes).
        attention: attention blocks written as separate projections, each
            ``{"q": name, "k": name, "v": name, "out": name, "num_heads": H}`` (module names): pruned by head.
            ``nn.MultiheadAttention`` modules are found without it.
        example_inputs: a batch of inputs for tracing the dependency graph.
        schedule, start_step, end_step, start_epoch, end_epoch, start_fraction, end_fraction, update_every,
            initial_sparsity, power, remask_weights, log_per_layer, prog_bar: as for
            :class:`~pat_callbacks.GradualPruning`.

    Example:
        >>> StructuredPruning(final_sparsity=0.5, importance="taylor", start_step=0, end_step=10).importance
        'taylor'
        >>> StructuredPruning(final_sparsity=0.5, importance="l3", start_step=0, end_step=10)
        Traceback (most recent call last):
        ...
        ValueError: Unknown `importance` 'l3'; expected one of: 'gate', 'l1', 'l2', 'taylor'
    """

    def __init__(
        self,
        final_sparsity: float | None = None,
        schedule: str | Schedule = "cubic",
        *,
        importance: str = "l2",
        ignore: str | Sequence[str] | None = None,
        attention: Sequence[Mapping[str, Any]] | None = None,
        example_inputs: Any = None,
        initial_sparsity: float | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        start_epoch: float | None = None,
        end_epoch: float | None = None,
        start_fraction: float | None = None,
        end_fraction: float | None = None,
        update_every: int | None = None,
        power: float | None = None,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
    ) -> None:
        super().__init__(
            final_sparsity,
            schedule,
            initial_sparsity=initial_sparsity,
            start_step=start_step,
            end_step=end_step,
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            start_fraction=start_fraction,
            end_fraction=end_fraction,
            update_every=update_every,
            power=power,
            remask_weights=remask_weights,
            log_per_layer=log_per_layer,
            prog_bar=prog_bar,
        )
        self.importance = check_choice("importance", importance, IMPORTANCES)
        self.ignore = normalize_patterns("ignore", ignore)
        self.example_inputs = example_inputs
        if attention is not None and not all(isinstance(layout, Mapping) for layout in attention):
            raise ValueError(
                f"Expected `attention` to be a list of q/k/v/out/num_heads mappings, but got {attention!r}"
            )
        self.attention = [dict(layout) for layout in attention or []]
        self.groups: list[ChannelGroup] = []

    @property
    def method_name(self) -> str:
        """``schedule/structured-importance``."""
        return f"{self.schedule_name}/structured-{self.importance}"

    @override
    def _select_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        example = self._example_inputs(trainer, pl_module)
        ignore = self.ignore
        if not ignore:
            layers = [name for name, m in pl_module.named_modules() if isinstance(m, DEFAULT_MODULE_TYPES)]
            ignore = (f"{layers[-1]}.weight",) if layers else ()
        was_training = pl_module.training
        pl_module.eval()  # tracing runs a forward pass: keep BatchNorm statistics untouched
        heads = head_groups(pl_module) + projection_head_groups(pl_module, self.attention)
        # Attention internals are pruned by head, never by embedding dimension.
        internal = [f"{g.root.removesuffix('in_proj_weight')}out_proj.weight" for g in heads if "in_proj" in g.root]
        internal += [f"{layout[key]}.weight" for layout in self.attention for key in ("q", "k", "v", "out")]
        try:
            self.groups = channel_groups(pl_module, example, ignore=[*ignore, *internal]) + heads
        finally:
            pl_module.train(was_training)
        if not self.groups:
            raise ValueError(f"No prunable channel group in {type(pl_module).__name__} (ignored: {list(ignore)})")
        named = dict(pl_module.named_parameters())
        return {name: named[name] for name in sorted({n for g in self.groups for n in g.params()})}

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("StructuredPruning needs `example_inputs` (or pl_module.example_input_array) to trace")
        batch = next(iter(datamodule.train_dataloader()))
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    @override
    def _prune_to(self, trainer: pl.Trainer, target: float) -> bool:
        if target == 0.0:
            return self._lift_masks()
        params = dict(self._require_store().params)
        grads = {name: p.grad for name, p in params.items()} if self.importance in ("taylor", "gate") else None
        scores = {g.root: channel_scores(g, params, self.importance, grads) for g in self.groups}
        if not self._all_finite(trainer, scores):
            return False
        self.target_sparsity = target
        pruned = {}
        for group in self.groups:
            lowest = torch.topk(scores[group.root], prune_count(group.n_channels, target), largest=False).indices
            pruned[group.root] = torch.zeros(group.n_channels, dtype=torch.bool).index_fill_(0, lowest, True)
        self._commit_masks(trainer, channel_masks(self.groups, pruned, params))
        return True

    def pruned_channels(self) -> dict[str, list[int]]:
        """Per root weight, the indices of the channels currently pruned (input to :func:`shrink`).

        Example:
            >>> StructuredPruning(final_sparsity=0.5, start_step=0, end_step=10).pruned_channels()
            {}
        """
        if self.store is None or not self.store.masks:
            return {}
        result = {}
        for group in self.groups:
            mask = self.store.masks[group.root]
            result[group.root] = [
                channel
                for channel, slices in enumerate(group.slices)
                if not any(
                    bool(mask.index_select(dim, index.to(mask.device)).any())
                    for name, dim, index in slices
                    if name == group.root
                )
            ]
        return result
