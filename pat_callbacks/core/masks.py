"""The mask store: one boolean mask per pruned parameter, enforced on weights, gradients and optimizer state.

Masks are ``torch.bool`` (1 byte per weight, 0.25x the bytes of fp32 weights); no float copy of the mask and
no ``weight_orig`` duplicate exist, and the model's ``forward`` is untouched (no hooks), so checkpoints keep
their plain keys and ``torch.compile`` sees an ordinary module.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> store = MaskStore({"weight": layer.weight})
    >>> newly_pruned = store.set_masks({"weight": layer.weight.abs() > layer.weight.abs().median()})
    >>> store.apply()
    >>> int((layer.weight == 0).sum()), store.sparsity()
    (4, 0.5)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.sharding import gather_full, local, local_rows, shard_group

__all__ = ["MaskStore"]


class MaskStore:
    """Owns the masks of a fixed set of parameters.

    A parameter without a mask is dense. ``True`` in a mask means the weight is kept.

    Args:
        params: ``{name: parameter}`` of every parameter that may be masked (see :mod:`pat_callbacks.core.targets`).

    Example:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, -4.0]))
        >>> store = MaskStore({"w": weight})
        >>> _ = store.set_masks({"w": torch.tensor([True, False, True, False])})
        >>> store.apply()
        >>> (weight == 0).tolist()
        [False, True, False, True]
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        if not params:
            raise ValueError("MaskStore needs at least one parameter, but got none")
        self.params: dict[str, nn.Parameter] = dict(params)
        self.masks: dict[str, Tensor] = {}
        # Sharded (FSDP2) parameters: masks are local shards, counts are all-reduced over this group.
        self.group = shard_group(self.params)

    def __repr__(self) -> str:
        return f"MaskStore({len(self.params)} parameters, {len(self.masks)} masked, sparsity={self.sparsity():.4f})"

    @property
    def is_active(self) -> bool:
        """Whether any parameter is currently masked."""
        return bool(self.masks)

    def numel(self) -> int:
        """Number of maskable entries."""
        return sum(p.numel() for p in self.params.values())

    # ------------------------------------------------------------------ updates
    def set_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replace the masks of the named parameters; return, per name, the entries that are newly pruned.

        Masks are stored as ``bool`` on each parameter's device. Weights are *not* touched here: call
        :meth:`apply` and :meth:`reset_optimizer_state` after.
        """
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

    def prune(self, entries: Mapping[str, Tensor]) -> None:
        """Prune ``entries`` (bool, the parameter's shape; only currently kept ones) in place: an existing mask is
        updated where it lies, without a new copy; a parameter without a mask gets ``~entries``. Weights are *not*
        touched here: call :meth:`apply` after.

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(3))})
            >>> store.prune({"w": torch.tensor([False, True, False])})
            >>> store.prune({"w": torch.tensor([True, False, False])})
            >>> store.masks["w"].tolist()
            [False, False, True]
        """
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

    def flip(self, entries: Mapping[str, Tensor]) -> None:
        """Swap ``entries`` (bool, the parameter's shape) of existing masks in place: kept ones become pruned and
        pruned ones kept (a drop-and-grow). Weights are *not* touched here: call :meth:`apply` after.

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(3))})
            >>> _ = store.set_masks({"w": torch.tensor([True, False, True])})
            >>> store.flip({"w": torch.tensor([True, True, False])})
            >>> store.masks["w"].tolist()
            [False, True, True]
        """
        for name, swapped in entries.items():
            mask = self.masks.get(name)
            if mask is None or tuple(swapped.shape) != tuple(mask.shape):
                raise ValueError(f"Cannot flip {name!r}: it has no mask of shape {tuple(swapped.shape)}")
            mask.logical_xor_(swapped.to(mask.device))

    def sync_devices(self) -> None:
        """Move each mask to its parameter's current device (call after the model moved, e.g. to a GPU).

        Example:
            >>> import torch
            >>> store = MaskStore({"w": torch.nn.Parameter(torch.ones(2))})
            >>> _ = store.set_masks({"w": torch.tensor([True, False])})
            >>> store.sync_devices(); store.masks["w"].device.type
            'cpu'
        """
        self.masks = {name: mask.to(local(self.params[name]).device) for name, mask in self.masks.items()}

    def clear(self) -> None:
        """Lift every mask: all parameters train densely (pruned weights restart from zero)."""
        self.masks = {}

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
        _foreach_mask_(tensors, [self.masks[n] for n in names])
        torch._foreach_add_(tensors, 0.0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights in place, so no optimizer moves them."""
        if not self.masks:
            return
        grads, masks = [], []
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grads.append(local(grad))
                masks.append(mask)
        if grads:
            _foreach_mask_(grads, masks)

    @torch.no_grad()
    def reset_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer], pruned: Mapping[str, Tensor]) -> int:
        """Zero the optimizer state (momentum, Adam moments, ...) of the given pruned entries.

        Every state tensor with the parameter's shape is reset, so SGD, Adam(W), RMSprop, Adagrad and most other
        optimizers are covered without knowing their key names. Returns the number of tensors touched.
        """
        touched = 0
        by_id = {id(self.params[name]): pruned_entries for name, pruned_entries in pruned.items()}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    entries = by_id.get(id(param))
                    state = optimizer.state.get(param)
                    if entries is None or not state:
                        continue
                    for value in state.values():
                        if isinstance(value, Tensor) and value.shape == param.shape:
                            local(value).masked_fill_(entries.to(value.device), 0)
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
        """Fraction of pruned entries over all parameters of the store."""
        return sum(self.pruned_counts().values()) / self.numel()

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Masks as CPU bool tensors (loadable with ``torch.load(weights_only=True)``); a sharded parameter's mask
        is gathered whole (every rank must call this), so checkpoints do not depend on the number of ranks."""
        return {
            "masks": {
                name: gather_full(mask.detach(), self.params[name]).cpu().clone() for name, mask in self.masks.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict` (unknown names are an error: the model changed); each rank of a
        sharded parameter keeps its own rows."""
        masks = state.get("masks", {})
        unknown = sorted(set(masks) - set(self.params))
        if unknown:
            raise ValueError(f"Checkpoint has masks for {unknown}, which are not pruned parameters of this model")
        self.masks = {}
        self.set_masks({name: local_rows(mask, self.params[name]) for name, mask in masks.items()})

    def _param(self, name: str) -> nn.Parameter:
        try:
            return self.params[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a maskable parameter; known: {sorted(self.params)}") from None


def _foreach_mask_(tensors: list[Tensor], masks: list[Tensor]) -> None:
    """``t *= mask`` for each pair; a bool mask is read as uint8, which multiplies about 2x faster than bool."""
    torch._foreach_mul_(tensors, [m.view(torch.uint8) if m.dtype == torch.bool else m for m in masks])
