"""What the Lightning callbacks call on a pruner: :class:`MaskingPruner`, one protocol that the unstructured
:class:`~pat_callbacks.core.pruner.Pruner` and the :class:`~pat_callbacks.structured.pruner.StructuredPruner` both
implement (masks and their enforcement come from :class:`~pat_callbacks.core.masks.MaskStore`; each pruner adds how
it chooses them), so the callbacks read every member directly, without probing with ``getattr``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pat_callbacks.core.pruner import Pruner
    >>> from pat_callbacks.structured.pruner import StructuredPruner
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> pruners = [Pruner(model), StructuredPruner(model, torch.zeros(1, 4))]
    >>> [isinstance(p, MaskingPruner) for p in pruners], [p.criterion_state for p in pruners]
    ([True, True], [{}, {}])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["MaskingPruner"]


@runtime_checkable
class MaskingPruner(Protocol):
    """A pruner as the callbacks drive it: masks over named parameters, updated by :meth:`prune_to` and enforced
    by :meth:`mask_grads` / :meth:`apply`, with checkpoint state.

    Attributes:
        params: ``{name: parameter}`` of the pruned parameters (local shards when sharded by FSDP2).
        masks: ``{name: bool mask}`` of the masked parameters (``True`` = kept).
        group: the process group of sharded parameters, ``None`` when none is sharded.
        target_sparsity: the overall target of the last mask update.
        sensitivities: measured per-layer sensitivities (``allocation="sensitivity"``), ``None`` if none.

    Example:
        >>> from torch import nn
        >>> from pat_callbacks.core.pruner import Pruner
        >>> def drive(pruner: MaskingPruner, sparsity: float) -> float:  # what a callback does at an update
        ...     pruner.accumulate()
        ...     if pruner.prune_to(sparsity):
        ...         pruner.after_update()
        ...     pruner.mask_grads()
        ...     return pruner.sparsity()
        >>> drive(Pruner(nn.Linear(8, 8)), 0.75)
        0.75
    """

    params: dict[str, nn.Parameter]
    masks: dict[str, Tensor]
    group: Any
    target_sparsity: float
    sensitivities: dict[str, float] | None

    @property
    def needs_grad(self) -> bool:
        """Whether scoring reads this step's dense gradients."""
        ...

    @property
    def scorer_name(self) -> str:
        """The criterion's name, for messages and reports."""
        ...

    @property
    def criterion_state(self) -> dict[str, dict[str, Tensor]]:
        """The criterion's history per parameter (empty for criteria without history)."""
        ...

    def accumulate(self, step: int | None = None, next_update: int | None = None) -> None:
        """Add this step's weights and gradients to the criterion's history (after ``backward``); given ``step``
        and the ``next_update`` step, only where :meth:`accumulates_at` says so."""
        ...

    def accumulates_at(self, step: int, next_update: int | None) -> bool:
        """Whether :meth:`accumulate` at ``step`` adds anything, the next update being at ``next_update``
        (``None``: unknown); a caller skips the call (and its per-step work) where it does not."""
        ...

    def after_update(self) -> None:
        """Restart what the criterion keeps between updates, if anything."""
        ...

    def prune_to(
        self,
        sparsity: float,
        *,
        scores: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        step: int | None = None,
    ) -> bool:
        """Mask to ``sparsity`` (``0.0`` lifts every mask); ``False`` (masks untouched) on NaN/Inf scores."""
        ...

    def set_masks(
        self,
        masks: Mapping[str, Tensor],
        *,
        reset: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> dict[str, Tensor]:
        """Commit ``masks`` as given (the same on every rank); returns the newly pruned entries."""
        ...

    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (before ``optimizer.step()``)."""
        ...

    def apply(self) -> None:
        """Zero the pruned weights in place."""
        ...

    def to_devices(self) -> None:
        """Move masks (and any history) to their parameters' devices."""
        ...

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the pruned parameters' values, for :meth:`rewind`."""
        ...

    def rewind(self, snapshot: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Surviving weights back to ``snapshot``, pruned ones kept at zero."""
        ...

    def sparsity(self) -> float:
        """Fraction of pruned entries over the pruned parameters."""
        ...

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per parameter."""
        ...

    def zeros_over(self, tensors: Mapping[str, Tensor], layer_sparsity: Mapping[str, float] | None = None) -> float:
        """Fraction of exact zeros over ``tensors``, masked ones counted from their masks."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: plain tensors and numbers."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...
