"""Agreement between DDP ranks (no shard group): one process is left unchanged.

Sharded (FSDP2) parameters agree by exact distributed selection instead (:mod:`pat_callbacks.core.selection`).

Example:
    >>> import torch
    >>> all_ranks_agree(True), broadcast_masks({"w": torch.tensor([True, False])})  # one process: unchanged
    (True, {'w': tensor([ True, False])})
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_ranks_agree", "broadcast_masks", "several_processes"]


def several_processes() -> bool:
    """Whether torch.distributed runs with more than one process.

    Example:
        >>> several_processes()
        False
    """
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def all_ranks_agree(flag: bool) -> bool:
    """Under torch.distributed, whether ``flag`` holds on every rank; ``flag`` itself in one process.

    Example:
        >>> all_ranks_agree(False)
        False
    """
    if not several_processes():
        return flag
    value = torch.tensor([int(flag)])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def broadcast_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Under torch.distributed, make every rank hold rank 0's masks (ranks may score differently).

    Example:
        >>> import torch
        >>> broadcast_masks({"w": torch.tensor([True])})
        {'w': tensor([True])}
    """
    if not several_processes():
        return masks
    synced = {}
    for name, mask in masks.items():
        as_bytes = mask.to(torch.uint8)
        torch.distributed.broadcast(as_bytes, src=0)
        synced[name] = as_bytes.bool()
    return synced
