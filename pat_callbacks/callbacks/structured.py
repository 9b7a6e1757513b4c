"""StructuredPruning: remove whole output channels (conv filters, linear neurons) along a sparsity schedule.

Example:
    >>> pruning = StructuredPruning(sparsity=0.5, criterion="l2", start_step=0, end_step=100)
    >>> pruning.method_name
    'cubic/structured-l2'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import Unpack, override

from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback
from pat_callbacks.core._validation import check_choice, renamed
from pat_callbacks.core.schedules import Schedule
from pat_callbacks.core.targets import normalize_patterns
from pat_callbacks.core.windows import WindowArguments
from pat_callbacks.structured import StructuredImportance, StructuredPruner, get_structured_importance, shrink
from pat_callbacks.structured.attention import HEAD_UNITS, HeadUnit
from pat_callbacks.structured.groups import TRACE_SECONDS

__all__ = ["StructuredPruning"]


class StructuredPruning(ScheduledPruningCallback):
    """Prune ``sparsity`` of the channels of every group (uniformly per group), following a schedule, and
    then remove them for real with :func:`pat_callbacks.structured.shrink`.

    In a transformer (``nn.MultiheadAttention``, Hugging Face GPT-2 / BERT attention, or ``attention`` layouts) the
    groups are attention heads (their q/k/v rows and output-projection columns) and MLP hidden neurons; the residual
    stream is left whole. In other models they are the output channels of every Conv/Linear layer with their coupled
    parameters (bias, BatchNorm scale/shift, the next layers' input columns), from Torch-Pruning's dependency graph
    traced once in ``setup`` on ``example_inputs`` (default: ``pl_module.example_input_array``, else the first
    training batch's inputs). At least one channel of every group is kept.

    Args:
        sparsity: fraction of each layer's channels removed at the end of the window.
        final_sparsity: the former name of ``sparsity``, still accepted (giving both is an error).
        criterion: channel score over all coupled slices (formerly ``importance``, still accepted), a name in
            :data:`~pat_callbacks.structured.STRUCTURED_IMPORTANCES` or a
            :class:`~pat_callbacks.structured.StructuredImportance`: ``"l2"`` / ``"l1"`` norm (Li et al. 2016),
            ``"group_taylor"`` ``(sum g * w)^2`` with this step's dense gradients (Molchanov et al. 2019; formerly
            ``"taylor"``), or ``"gate"``: ``|dL/d gate|`` of a gate scaling the channel's (or attention head's)
            output (Michel et al. 2019).
        exclude: (formerly ``ignore``, still accepted) glob patterns of weight or module names whose channels are
            never removed, in addition to the last Conv/Linear layer (its outputs are the model's outputs, e.g. the
            classes), which is always kept whole.
        attention: attention blocks written as separate projections, each
            ``{"q": name, "k": name, "v": name, "out": name, "num_heads": H}`` (module names): pruned by head.
            ``nn.MultiheadAttention`` modules are found without it.
            A layout may give ``num_kv_heads`` (grouped-query attention) and ``head_dim``; every layout is checked
            against the weights' shapes in ``setup``. Hugging Face Llama / Qwen2 / Mistral / Gemma attention
            (``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query or multi-query) is found without it.
        heads: the unit of grouped-query attention: ``"kv_groups"`` (a key/value head with every query head sharing
            it, so the query-per-key/value ratio stays), ``"query_heads"`` (query heads, the same number from every
            key/value group; the key/value heads stay) or ``"auto"`` (default: key/value groups, but query heads
            for multi-query attention, whose single key/value head cannot go).
        round_to: keep a multiple of ``round_to`` MLP neurons / channels in every group (rounded up, e.g. 8, 16, 64
            for tensor cores); heads are not rounded.
        uniform_per_layer: require the same heads and MLP width in every layer (checked in ``setup``), so a shrunk
            Hugging Face model reloads with its own ``from_pretrained``; :meth:`shrink` then also refuses layers
            that differ.
        trace_timeout: seconds allowed for tracing a model whose attention is not found by role (``None``:
            unbounded); past it, setup stops with what to give instead (``attention=``, ``exclude=``).
        example_inputs: a batch of inputs for tracing the dependency graph.
        schedule, start_step, end_step, start_epoch, end_epoch, start_fraction, end_fraction, update_every,
            initial_sparsity, power, remask_weights, log_per_layer, prog_bar, verbose: as for
            :class:`~pat_callbacks.GradualPruning`.

    Example:
        >>> StructuredPruning(sparsity=0.5, criterion="group_taylor", start_step=0, end_step=10).criterion
        GroupTaylorImportance()
        >>> StructuredPruning(sparsity=0.5, criterion="l3", start_step=0, end_step=10)
        Traceback (most recent call last):
        ...
        ValueError: Unknown `criterion` 'l3'; expected one of: 'gate', 'group_taylor', 'l1', 'l2'
    """

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: str | Schedule | Callable[[int], float] = "cubic",
        *,
        final_sparsity: float | None = None,
        criterion: str | StructuredImportance | None = None,
        exclude: str | Sequence[str] | None = None,
        importance: str | StructuredImportance | None = None,
        ignore: str | Sequence[str] | None = None,
        attention: Sequence[Mapping[str, Any]] | None = None,
        heads: HeadUnit = "auto",
        round_to: int | None = None,
        uniform_per_layer: bool = False,
        trace_timeout: float | None = TRACE_SECONDS,
        example_inputs: Any = None,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
        **window: Unpack[WindowArguments],
    ) -> None:
        super().__init__(
            sparsity,
            schedule,
            final_sparsity=final_sparsity,
            remask_weights=remask_weights,
            log_per_layer=log_per_layer,
            prog_bar=prog_bar,
            verbose=verbose,
            **window,
        )
        criterion, _ = renamed("importance", importance, "criterion", criterion, None)
        exclude, exclude_key = renamed("ignore", ignore, "exclude", exclude, None)
        self.criterion = get_structured_importance("l2" if criterion is None else criterion)
        self.ignore = normalize_patterns(exclude_key, exclude)
        self.example_inputs = example_inputs
        if attention is not None and not all(isinstance(layout, Mapping) for layout in attention):
            raise ValueError(
                f"Expected `attention` to be a list of q/k/v/out/num_heads mappings, but got {attention!r}"
            )
        self.attention = [dict(layout) for layout in attention or []]
        self.heads = check_choice("heads", heads, HEAD_UNITS)
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"Expected `round_to` to be a positive int (e.g. 8, 16, 64) or None, but got {round_to!r}")
        self.round_to = round_to
        self.uniform_per_layer = bool(uniform_per_layer)
        if trace_timeout is not None and not trace_timeout > 0:
            raise ValueError(
                f"Expected `trace_timeout` to be a positive number of seconds or None, but got {trace_timeout!r}"
            )
        self.trace_timeout = trace_timeout

    @property
    def method_name(self) -> str:
        """``schedule/structured-criterion``."""
        return f"{self.schedule_name}/structured-{self.criterion.name}"

    @property
    def groups(self) -> list:
        """The channel groups traced in ``setup`` (empty before)."""
        return self.pruner.groups if isinstance(self.pruner, StructuredPruner) else []

    @override
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StructuredPruner:
        pruner = StructuredPruner(
            pl_module,
            self._example_inputs(trainer, pl_module),
            criterion=self.criterion,
            exclude=self.ignore,
            attention=self.attention,
            heads=self.heads,
            round_to=self.round_to,
            uniform_per_layer=self.uniform_per_layer,
            trace_timeout=self.trace_timeout,
        )
        if self.verbose:
            for note in pruner.notes:
                rank_zero_info(f"StructuredPruning: {note}")
        return pruner

    @override
    def _update_masks(self, trainer: pl.Trainer, target: float) -> bool:
        pruner = self._require_pruner()
        return pruner.prune_to(target, optimizers=trainer.optimizers, step=trainer.global_step)

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        datamodule = trainer.datamodule
        if datamodule is None:
            return None  # transformers need none; other models get a clear error from StructuredPruner
        batch = next(iter(datamodule.train_dataloader()))
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def pruned_channels(self) -> dict[str, list[int]]:
        """Per root weight, the indices of the channels currently pruned (input to
        :func:`~pat_callbacks.structured.shrink`).

        Example:
            >>> StructuredPruning(sparsity=0.5, start_step=0, end_step=10).pruned_channels()
            {}
        """
        return self.pruner.pruned_channels() if isinstance(self.pruner, StructuredPruner) else {}

    def shrink(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        """Remove the pruned channels from ``model`` (the module this callback pruned), in place, with this
        callback's ``attention`` layouts and ``uniform_per_layer``; Hugging Face configs inside are updated (see
        :func:`~pat_callbacks.structured.shrink`).

        Example:
            >>> from torch import nn
            >>> StructuredPruning(sparsity=0.5, start_step=0, end_step=10).shrink(nn.Linear(2, 2)).out_features
            2
        """
        inputs = example_inputs if example_inputs is not None else self.example_inputs
        return shrink(model, inputs, self.pruned_channels(), self.attention, uniform_per_layer=self.uniform_per_layer)
