"""Sharded parameters (FSDP2 ``fully_shard``: DTensors placed ``Shard(0)`` on a 1-D mesh): local views, the process
group that counts and thresholds are reduced over, and full <-> local conversions for checkpoints.

Masks of a sharded parameter are bool tensors with its *local* shard's shape, on its device; every rank holds only
its own rows. Nothing here gathers a whole layer except :func:`gather_full` (used for checkpoint state only, as
Lightning writes callback state from rank 0).

Example:
    >>> import torch
    >>> local(torch.ones(2)).shape, shard_group({"w": torch.nn.Parameter(torch.ones(2))})
    (torch.Size([2]), None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["gather_full", "is_sharded", "local", "local_rows", "shard_group"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (e.g. a parameter after FSDP2's ``fully_shard``).

    Example:
        >>> import torch
        >>> is_sharded(torch.zeros(1))
        False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself.

    Example:
        >>> import torch
        >>> t = torch.zeros(3)
        >>> local(t) is t
        True
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_group(params: Mapping[str, Tensor]) -> Any:
    """The process group of sharded ``params`` (``None`` when none is sharded); refuses layouts other than FSDP2's
    ``Shard(0)`` on a one-dimensional mesh, naming the parameter.

    Example:
        >>> import torch
        >>> shard_group({"w": torch.zeros(2)}) is None
        True
    """
    group, mesh = None, None
    for name, param in params.items():
        if not is_sharded(param):
            continue
        from torch.distributed.tensor import Shard

        placements = tuple(param.placements)
        if param.device_mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(
                f"{name!r} is a DTensor placed {placements} on a {param.device_mesh.ndim}-D mesh; pat-callbacks "
                "supports FSDP2's Shard(0) on a 1-D mesh (fully_shard over data parallel ranks)"
            )
        if mesh is None:
            mesh, group = param.device_mesh, param.device_mesh.get_group()
        elif param.device_mesh != mesh:
            raise ValueError(f"{name!r} lives on another device mesh than the other pruned parameters")
    if group is not None and len(params) != sum(is_sharded(p) for p in params.values()):
        plain = sorted(n for n, p in params.items() if not is_sharded(p))
        raise ValueError(f"Some pruned parameters are sharded and some are not ({plain}); shard the whole model")
    return group


def gather_full(local_tensor: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose ``Shard(0)`` pieces are each rank's ``local_tensor`` (a collective: every rank calls it);
    ``like`` is the sharded parameter it follows.

    Example:
        >>> import torch
        >>> gather_full(torch.ones(2), torch.zeros(2)).tolist()  # not sharded: unchanged
        [1.0, 1.0]
    """
    if not is_sharded(like):
        return local_tensor
    from torch.distributed.tensor import DTensor

    shape = (like.shape[0], *local_tensor.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    full = DTensor.from_local(local_tensor, like.device_mesh, like.placements, shape=shape, stride=stride)
    return full.full_tensor()


def local_rows(full: Tensor, like: Tensor) -> Tensor:
    """This rank's ``Shard(0)`` piece of ``full`` (as FSDP2 cuts it: ``torch.chunk`` over the ranks, empty past the
    last chunk); ``full`` itself when ``like`` is not sharded.

    Example:
        >>> import torch
        >>> local_rows(torch.arange(4), torch.zeros(4)).tolist()
        [0, 1, 2, 3]
    """
    if not is_sharded(like):
        return full
    mesh = like.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunks = torch.chunk(full, world, dim=0)
    piece = chunks[rank] if rank < len(chunks) else full[:0]
    expected = tuple(local(like).shape)
    if tuple(piece.shape) != expected:
        raise ValueError(f"A saved shard has shape {tuple(piece.shape)} but this rank holds {expected}")
    return piece.contiguous()
