"""What every pruner shares: named parameters, their masks, and the enforcement of those masks.

:class:`MaskedParameters` knows nothing of scores or of how masks are chosen: it commits masks (the same on every
DDP rank), zeroes pruned weights and the optimizer state of changed entries, counts sparsity, and checkpoints. The
unstructured :class:`~pat_callbacks.core.pruner.Pruner` and the
:class:`~pat_callbacks.structured.pruner.StructuredPruner` each add their own way of choosing masks on top.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(2, 2)
    >>> masked = MaskedParameters({"weight": layer.weight})
    >>> _ = masked.set_masks({"weight": torch.tensor([[True, False], [True, True]])})
    >>> masked.sparsity(), layer.weight[0, 1].item() == 0
    (0.25, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.distributed import broadcast_masks
from pat_callbacks.core.masks import MaskStore
from pat_callbacks.core.selection import all_finite, sum_over_ranks
from pat_callbacks.core.sharding import local

__all__ = ["MaskedParameters"]


class MaskedParameters:
    """Masks over a fixed set of named parameters, enforced on weights, gradients and optimizer state.

    Args:
        params: ``{name: parameter}`` that may be masked (local shards when sharded by FSDP2).

    Example:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.ones(2, 2))
        >>> masked = MaskedParameters({"w": weight})
        >>> masked.prune_entries({"w": torch.tensor([[True, False], [False, False]])})
        >>> masked.sparsity(), masked.state_dict()["target_sparsity"]
        (0.25, 0.0)
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.store = MaskStore(params)
        self.group = self.store.group  # set when the parameters are sharded (FSDP2): masks are local shards
        self.target_sparsity = 0.0
        self.last_changed: dict[str, Tensor] = {}  # entries pruned or regrown at the last update

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.params)} parameters, sparsity={self.sparsity():.4f})"

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the pruned parameters."""
        return self.store.params

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{name: bool mask}`` of the currently masked parameters (``True`` = kept)."""
        return self.store.masks

    # ------------------------------------------------------------------ commits
    def set_masks(
        self,
        masks: Mapping[str, Tensor],
        *,
        reset: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> dict[str, Tensor]:
        """Make ``masks`` the same on every rank, store them, zero the pruned weights and the optimizer state of
        newly pruned entries (and of ``reset``, e.g. regrown ones). Returns the newly pruned entries."""
        agreed = dict(masks) if self.group is not None else broadcast_masks(dict(masks))  # shards are per rank
        newly_pruned = self.store.set_masks(agreed)
        self.store.apply()
        changed = dict(newly_pruned)
        for name, entries in (reset or {}).items():
            changed[name] = changed[name] | entries if name in changed else entries
        self.last_changed = changed
        self.reset_optimizer_state(optimizers)
        return newly_pruned

    def prune_entries(self, entries: Mapping[str, Tensor], *, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Prune ``entries`` (bool per parameter, among the kept ones) in place, the same on every rank: masks
        shrink where they lie, weights are zeroed and the optimizer state of the entries is reset.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(2, 2)
            >>> masked = MaskedParameters({"weight": layer.weight})
            >>> masked.prune_entries({"weight": torch.tensor([[True, False], [False, False]])})
            >>> masked.sparsity(), layer.weight[0, 0].item() == 0
            (0.25, True)
        """
        self.change_in_place(entries, self.store.prune, optimizers)

    def change_in_place(
        self,
        entries: Mapping[str, Tensor],
        change: Callable[[Mapping[str, Tensor]], None],
        optimizers: Iterable[torch.optim.Optimizer],
    ) -> dict[str, Tensor]:
        """Apply ``change`` (the store's ``prune`` or ``flip``) to ``entries`` agreed over DDP ranks (a sharded
        rank keeps its own), zero the pruned weights and reset the optimizer state of the entries; returns them."""
        agreed = broadcast_masks(dict(entries)) if self.group is None else dict(entries)
        self.last_changed = {}  # the previous update's entries are not held through this one
        change(agreed)
        self.store.apply()
        self.last_changed = agreed
        self.reset_optimizer_state(optimizers)
        return agreed

    def clear(self) -> None:
        """Lift every mask: all parameters train densely again (pruned weights restart from zero)."""
        self.target_sparsity = 0.0
        self.last_changed = {}
        self.store.clear()

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the pruned parameters' current values (this rank's rows when sharded), for :meth:`rewind`."""
        return {name: local(p).detach().clone() for name, p in self.params.items()}

    def rewind(self, snapshot: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Lottery-ticket rewinding (Frankle & Carbin 2019): surviving weights back to their ``snapshot`` values,
        pruned ones kept at zero, and the optimizer state of every masked parameter zeroed.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(4, 4)
            >>> masked = MaskedParameters({"weight": layer.weight})
            >>> start = masked.snapshot()
            >>> _ = masked.set_masks({"weight": torch.rand(4, 4) > 0.5})
            >>> _ = layer.weight.data.add_(1.0)
            >>> masked.rewind(start)
            >>> bool(((layer.weight == start["weight"]) | (layer.weight == 0)).all())
            True
        """
        with torch.no_grad():
            for name, param in self.params.items():
                local(param).copy_(snapshot[name])
        self.apply()
        self.reset_optimizer_state(optimizers, {name: torch.ones_like(mask) for name, mask in self.masks.items()})

    # -------------------------------------------------------------- enforcement
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (call before ``optimizer.step()``)."""
        self.store.mask_grads()

    def apply(self) -> None:
        """Zero the pruned weights in place."""
        self.store.apply()

    def reset_optimizer_state(
        self, optimizers: Iterable[torch.optim.Optimizer], entries: Mapping[str, Tensor] | None = None
    ) -> int:
        """Zero the optimizer state of ``entries`` (default: those pruned or regrown at the last update)."""
        optimizers = list(optimizers)
        if not optimizers:
            return 0
        return self.store.reset_optimizer_state(optimizers, self.last_changed if entries is None else entries)

    def to_devices(self) -> None:
        """Move masks to their parameters' devices (after the model moved)."""
        self.store.sync_devices()

    # ----------------------------------------------------------------- reading
    def sparsity(self) -> float:
        """Fraction of pruned entries over all pruned parameters, from the masks."""
        return self.store.sparsity()

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per parameter, from the masks."""
        return self.store.layer_sparsity()

    def zeros_over(self, tensors: Mapping[str, Tensor], layer_sparsity: Mapping[str, float] | None = None) -> float:
        """Fraction of exact zeros over ``tensors`` (e.g. every weight matrix of the model, embeddings included):
        pruned parameters counted from their masks (``layer_sparsity`` if already known; the weights match them
        exactly), the others on their values, over every rank when sharded.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
            >>> masked = MaskedParameters({"1.weight": model[1].weight})
            >>> _ = masked.set_masks({"1.weight": torch.arange(16).view(4, 4) % 2 == 0})
            >>> masked.zeros_over({"0.weight": model[0].weight, "1.weight": model[1].weight})  # 8 of 56
            0.14285714285714285
        """
        layers = layer_sparsity if layer_sparsity is not None else self.layer_sparsity()
        total = sum(t.numel() for t in tensors.values())
        counted = [round(layers[n] * t.numel()) for n, t in tensors.items() if n in self.params]
        measured = [
            local(t).numel() - int(local(t).detach().count_nonzero())
            for n, t in tensors.items()
            if n not in self.params
        ]
        zeros = sum(counted) + (sum(self.sum_over_ranks(measured)) if measured else 0)
        return zeros / total if total else 0.0

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Masks and the current target (plain tensors and numbers)."""
        return {"target_sparsity": self.target_sparsity, **self.store.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.store.load_state_dict(state)
        self.target_sparsity = float(state.get("target_sparsity", self.store.sparsity()))

    # ------------------------------------------------------------------ helpers
    def sum_over_ranks(self, values: list[Any], dtype: torch.dtype = torch.int64) -> list[Any]:
        """Element-wise sums over the ranks of a sharded pruner (``values`` unchanged in one process)."""
        device = local(next(iter(self.params.values()))).device
        return sum_over_ranks(values, self.group, device, dtype)

    def all_finite(self, tensors: Mapping[str, Tensor | None], step: int | None) -> bool:
        """Whether every tensor is finite on every rank; if not, warn (naming them) and return ``False``."""
        names = sorted(tensors)
        flags = [int(tensors[n] is not None and not all_finite(tensors[n])) for n in names]
        bad = [n for n, flag in zip(names, self.sum_over_ranks(flags), strict=True) if flag]  # ranks agree
        if not bad:
            return True
        self.warn_non_finite(bad, step)
        return False

    def warn_non_finite(self, bad: list[str], step: int | None) -> None:
        """Warn that an update is skipped for NaN/Inf scores (subclasses also forget their scoring history)."""
        where = f" at step {step}" if step is not None else ""
        warnings.warn(
            f"{type(self).__name__}: NaN or Inf in the scores of {bad}{where}; the mask update is skipped (masks "
            "unchanged; the callbacks retry at every following step, at the end of training at the latest)",
            UserWarning,
            stacklevel=3,
        )
