"""The one owner of masks: one boolean mask per pruned parameter, committed the same on every rank and enforced on
weights, gradients and optimizer state.

:class:`MaskStore` knows nothing of scores or of how masks are chosen: it commits masks (the same on every DDP rank;
each FSDP2 rank keeps its own rows), zeroes pruned weights and the optimizer state of changed entries, counts
sparsity, and checkpoints. The unstructured :class:`~pat_callbacks.core.pruner.Pruner` and the
:class:`~pat_callbacks.structured.pruner.StructuredPruner` each add their own way of choosing masks on top.

Masks are ``torch.bool`` (1 byte per weight, 0.25x the bytes of fp32 weights); no float copy of the mask and
no ``weight_orig`` duplicate exist, and the model's ``forward`` is untouched (no hooks), so checkpoints keep
their plain keys and ``torch.compile`` sees an ordinary module.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> store = MaskStore({"weight": layer.weight})
    >>> newly_pruned = store.set_masks({"weight": layer.weight.abs() > layer.weight.abs().median()})
    >>> int((layer.weight == 0).sum()), store.sparsity()
    (4, 0.5)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.distributed import broadcast_masks
from pat_callbacks.core.elementwise import multiply_by_masks_
from pat_callbacks.core.selection import all_finite, sum_over_ranks
from pat_callbacks.core.sharding import gather_full, local, local_rows, shard_group

__all__ = ["MaskStore"]


class MaskStore:
    """Masks over a fixed set of named parameters, enforced on weights, gradients and optimizer state.

    A parameter without a mask is dense. ``True`` in a mask means the weight is kept. Every commit (:meth:`set_masks`,
    :meth:`prune`, :meth:`flip`) agrees over DDP ranks, zeroes the pruned weights and resets the optimizer state of
    the changed entries for the optimizers given.

    Args:
        params: ``{name: parameter}`` of every parameter that may be masked (see :mod:`pat_callbacks.core.targets`;
            local shards when sharded by FSDP2).

    Example:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, -4.0]))
        >>> store = MaskStore({"w": weight})
        >>> _ = store.set_masks({"w": torch.tensor([True, False, True, False])})
        >>> (weight == 0).tolist(), store.state_dict()["target_sparsity"]
        ([False, True, False, True], 0.0)
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        if not params:
            raise ValueError("MaskStore needs at least one parameter, but got none")
        self.params: dict[str, nn.Parameter] = dict(params)
        self.masks: dict[str, Tensor] = {}
        # Sharded (FSDP2) parameters: masks are local shards, counts are all-reduced over this group.
        self.group = shard_group(self.params)
        self.target_sparsity = 0.0
        self.last_changed: dict[str, Tensor] = {}  # entries pruned or regrown at the last update

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.params)} parameters, {len(self.masks)} masked, "
            f"sparsity={self.sparsity():.4f})"
        )

    @property
    def is_active(self) -> bool:
        """Whether any parameter is currently masked."""
        return bool(self.masks)

    def numel(self) -> int:
        """Number of maskable entries."""
        return sum(p.numel() for p in self.params.values())

    # ------------------------------------------------------------------ commits
    def set_masks(
        self,
        masks: Mapping[str, Tensor],
        *,
        reset: Mapping[str, Tensor] | None = None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> dict[str, Tensor]:
        """Replace the masks of the named parameters: make them the same on every rank, store them (as ``bool`` on
        each parameter's device), zero the pruned weights and the optimizer state of newly pruned entries (and of
        ``reset``, e.g. regrown ones). Returns, per name, the entries that are newly pruned.

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(3))})
            >>> store.set_masks({"w": torch.tensor([True, False, True])})["w"].tolist()
            [False, True, False]
            >>> store.set_masks({"w": torch.tensor([False, True, True])})["w"].tolist()  # regrown: not newly pruned
            [True, False, False]
        """
        agreed = dict(masks) if self.group is not None else broadcast_masks(dict(masks))  # shards are per rank
        newly_pruned = self._store(agreed)
        self.apply()
        changed = dict(newly_pruned)
        for name, entries in (reset or {}).items():
            changed[name] = changed[name] | entries if name in changed else entries
        self.last_changed = changed
        self.reset_optimizer_state(optimizers)
        return newly_pruned

    def prune(self, entries: Mapping[str, Tensor], *, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Prune ``entries`` (bool, the parameter's shape; among the kept ones) in place, the same on every rank: an
        existing mask shrinks where it lies, without a new copy; a parameter without a mask gets ``~entries``.
        Pruned weights are zeroed and the optimizer state of the entries is reset.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(2, 2)
            >>> store = MaskStore({"weight": layer.weight})
            >>> store.prune({"weight": torch.tensor([[True, False], [False, False]])})
            >>> store.prune({"weight": torch.tensor([[False, True], [False, False]])})
            >>> store.masks["weight"].tolist(), store.sparsity(), layer.weight[0, 0].item() == 0
            ([[False, False], [True, True]], 0.5, True)
        """
        self._change(entries, self._prune, optimizers)

    def flip(
        self, entries: Mapping[str, Tensor], *, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> dict[str, Tensor]:
        """Swap ``entries`` (bool, the parameter's shape) of existing masks in place, the same on every rank: kept
        ones become pruned and pruned ones kept (a drop-and-grow). Dropped weights are zeroed, regrown ones restart
        from zero, and the optimizer state of every swapped entry is reset. Returns the entries agreed on.

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(3))})
            >>> _ = store.set_masks({"w": torch.tensor([True, False, True])})
            >>> _ = store.flip({"w": torch.tensor([True, True, False])})
            >>> store.masks["w"].tolist()
            [False, True, True]
        """
        return self._change(entries, self._flip, optimizers)

    def clear(self) -> None:
        """Lift every mask: all parameters train densely again (pruned weights restart from zero)."""
        self.target_sparsity = 0.0
        self.last_changed = {}
        self.masks = {}

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
            >>> store = MaskStore({"weight": layer.weight})
            >>> start = store.snapshot()
            >>> _ = store.set_masks({"weight": torch.rand(4, 4) > 0.5})
            >>> _ = layer.weight.data.add_(1.0)
            >>> store.rewind(start)
            >>> bool(((layer.weight == start["weight"]) | (layer.weight == 0)).all())
            True
        """
        with torch.no_grad():
            for name, param in self.params.items():
                local(param).copy_(snapshot[name])
        self.apply()
        self.reset_optimizer_state(optimizers, {name: torch.ones_like(mask) for name, mask in self.masks.items()})

    def to_devices(self) -> None:
        """Move each mask to its parameter's current device (call after the model moved, e.g. to a GPU).

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(2))})
            >>> _ = store.set_masks({"w": torch.tensor([True, False])})
            >>> store.to_devices(); store.masks["w"].device.type
            'cpu'
        """
        self.masks = {name: mask.to(local(self.params[name]).device) for name, mask in self.masks.items()}

    # ---------------------------------------------------------------- enforcement
    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights in place (fused passes over masked parameters). Pruned entries become ``+0.0``: a
        multiply leaves ``-0.0`` where a weight was negative, which a sparse export would have to store a sign for;
        adding ``0.0`` clears it and changes no other value."""
        if not self.masks:
            return
        names = list(self.masks)
        tensors = [local(self.params[n].data) for n in names]
        multiply_by_masks_(tensors, [self.masks[n] for n in names])
        torch._foreach_add_(tensors, 0.0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights in place (call before ``optimizer.step()``), so no optimizer moves
        them."""
        if not self.masks:
            return
        grads, masks = [], []
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grads.append(local(grad))
                masks.append(mask)
        if grads:
            multiply_by_masks_(grads, masks)

    @torch.no_grad()
    def reset_optimizer_state(
        self, optimizers: Iterable[torch.optim.Optimizer], entries: Mapping[str, Tensor] | None = None
    ) -> int:
        """Zero the optimizer state (momentum, Adam moments, ...) of ``entries`` (default: those pruned or regrown
        at the last update).

        Every state tensor with the parameter's shape is reset, so SGD, Adam(W), RMSprop, Adagrad and most other
        optimizers are covered without knowing their key names. Returns the number of tensors touched.
        """
        optimizers = list(optimizers)
        if not optimizers:
            return 0
        touched = 0
        pruned = self.last_changed if entries is None else entries
        by_id = {id(self.params[name]): pruned_entries for name, pruned_entries in pruned.items()}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    selected = by_id.get(id(param))
                    state = optimizer.state.get(param)
                    if selected is None or not state:
                        continue
                    for value in state.values():
                        if isinstance(value, Tensor) and value.shape == param.shape:
                            local(value).masked_fill_(selected.to(value.device), 0)
                            touched += 1
        return touched

    # ------------------------------------------------------------------- reading
    def pruned_counts(self) -> dict[str, int]:
        """Pruned entries per parameter, from the masks (over every rank of a sharded parameter).

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(4))})
            >>> _ = store.set_masks({"w": torch.tensor([True, False, False, True])})
            >>> store.pruned_counts()
            {'w': 2}
        """
        names = list(self.params)
        counts = torch.tensor(
            [self.masks[n].numel() - int(self.masks[n].count_nonzero()) if n in self.masks else 0 for n in names],
            dtype=torch.int64,
        )
        if self.group is not None:
            device = local(next(iter(self.params.values()))).device
            counts = counts.to(device)
            torch.distributed.all_reduce(counts, group=self.group)
        return dict(zip(names, (int(c) for c in counts.cpu()), strict=True))

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries per parameter, from the masks (0.0 for an unmasked parameter)."""
        return {name: count / self.params[name].numel() for name, count in self.pruned_counts().items()}

    def sparsity(self) -> float:
        """Fraction of pruned entries over all parameters of the store, from the masks."""
        return sum(self.pruned_counts().values()) / self.numel()

    def zeros_over(self, tensors: Mapping[str, Tensor], layer_sparsity: Mapping[str, float] | None = None) -> float:
        """Fraction of exact zeros over ``tensors`` (e.g. every weight matrix of the model, embeddings included):
        masked parameters counted from their masks (``layer_sparsity`` if already known; the weights match them
        exactly), the others on their values, over every rank when sharded.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
            >>> store = MaskStore({"1.weight": model[1].weight})
            >>> _ = store.set_masks({"1.weight": torch.arange(16).view(4, 4) % 2 == 0})
            >>> store.zeros_over({"0.weight": model[0].weight, "1.weight": model[1].weight})  # 8 of 56
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

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Masks as CPU bool tensors (loadable with ``torch.load(weights_only=True)``) and the current target; a
        sharded parameter's mask is gathered whole (every rank must call this), so checkpoints do not depend on the
        number of ranks."""
        masks = {name: gather_full(mask.detach(), self.params[name]).cpu().clone() for name, mask in self.masks.items()}
        return {"target_sparsity": self.target_sparsity, "masks": masks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict` (unknown names are an error: the model changed); each rank of a
        sharded parameter keeps its own rows. Weights are zeroed at the next :meth:`apply`."""
        masks = state.get("masks", {})
        unknown = sorted(set(masks) - set(self.params))
        if unknown:
            raise ValueError(f"Checkpoint has masks for {unknown}, which are not pruned parameters of this model")
        self.masks = {}
        self._store({name: local_rows(mask, self.params[name]) for name, mask in masks.items()})
        self.target_sparsity = float(state.get("target_sparsity", self.sparsity()))

    # ------------------------------------------------------------------ helpers
    def sum_over_ranks(self, values: list[Any], dtype: torch.dtype = torch.int64) -> list[Any]:
        """Element-wise sums over the ranks of sharded parameters (``values`` unchanged in one process)."""
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

    def _param(self, name: str) -> nn.Parameter:
        try:
            return self.params[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a maskable parameter; known: {sorted(self.params)}") from None

    def _store(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replace the named masks (validated, copied as bool to each parameter's device); weights untouched.
        Returns the newly pruned entries."""
        newly_pruned: dict[str, Tensor] = {}
        for name, mask in masks.items():
            param = local(self._param(name))
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"Mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(param.shape)}")
            mask = mask.detach().to(device=param.device, dtype=torch.bool, copy=True)  # masks change in place later
            old = self.masks.get(name)
            newly_pruned[name] = ~mask if old is None else old & ~mask
            self.masks[name] = mask
        return newly_pruned

    def _change(
        self,
        entries: Mapping[str, Tensor],
        change: Callable[[Mapping[str, Tensor]], None],
        optimizers: Iterable[torch.optim.Optimizer],
    ) -> dict[str, Tensor]:
        """Apply ``change`` (:meth:`_prune` or :meth:`_flip`) to ``entries`` agreed over DDP ranks (a sharded rank
        keeps its own), zero the pruned weights and reset the optimizer state of the entries; returns them."""
        agreed = broadcast_masks(dict(entries)) if self.group is None else dict(entries)
        self.last_changed = {}  # the previous update's entries are not held through this one
        change(agreed)
        self.apply()
        self.last_changed = agreed
        self.reset_optimizer_state(optimizers)
        return agreed

    def _prune(self, entries: Mapping[str, Tensor]) -> None:
        """Masks shrink in place by ``entries``; weights untouched."""
        for name, pruned in entries.items():
            param = local(self._param(name))
            if tuple(pruned.shape) != tuple(param.shape):
                raise ValueError(
                    f"Entries for {name!r} have shape {tuple(pruned.shape)}, expected {tuple(param.shape)}"
                )
            mask = self.masks.get(name)
            if mask is None:
                self.masks[name] = ~pruned.to(device=param.device, dtype=torch.bool)
            else:
                mask.masked_fill_(pruned.to(mask.device), False)

    def _flip(self, entries: Mapping[str, Tensor]) -> None:
        """``entries`` of existing masks swapped in place; weights untouched."""
        for name, swapped in entries.items():
            mask = self.masks.get(name)
            if mask is None or tuple(swapped.shape) != tuple(mask.shape):
                raise ValueError(f"Cannot flip {name!r}: it has no mask of shape {tuple(swapped.shape)}")
            mask.logical_xor_(swapped.to(mask.device))
