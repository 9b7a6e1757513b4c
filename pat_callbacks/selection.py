"""Exact k-lowest selection over many tensors and many ranks, without concatenating or gathering them.

A radix select on order-preserving 32-bit keys: four passes of 8-bit histograms (all-reduced across the ranks of a
process group, when one is given) find the exact k-th key; entries below it are selected, and ties at it are taken
in a fixed order (rank, then tensor, then flat index), so the count is exact to the entry and every rank agrees on
the threshold. Transient memory is one int32 key tensor of the largest chunk (computed chunk by chunk, pass by
pass); nothing is concatenated, so a global threshold over a billion weights needs no copy of all the scores, and
no rank ever holds another rank's shard.

Example:
    >>> import torch
    >>> chunks = [torch.tensor([0.5, -1.0, 3.0]), torch.tensor([2.0, 0.5, 0.1])]
    >>> [m.tolist() for m in select_lowest(chunks, 3)]  # -1.0, 0.1 and the first 0.5
    [[True, True, False], [False, False, True]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["count_below", "ordered_keys", "select_lowest"]

_SIGN = torch.iinfo(torch.int32).min  # 0x80000000 as a signed int32


def ordered_keys(values: Tensor) -> Tensor:
    """int32 keys whose *unsigned* order is the float order of ``values`` (NaN excluded): flip every bit of
    negatives and the sign bit of the rest.

    Example:
        >>> import torch
        >>> keys = ordered_keys(torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0]))
        >>> (keys ^ _SIGN).tolist() == sorted((keys ^ _SIGN).tolist())  # signed order after un-flipping the top bit
        True
    """
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, ~bits, bits ^ _SIGN)


def _all_reduce(tensor: Tensor, group: Any) -> Tensor:
    if group is not None:
        torch.distributed.all_reduce(tensor, group=group)
    return tensor


def select_lowest(chunks: Sequence[Tensor], k: int, group: Any = None) -> list[Tensor]:
    """Bool masks (one per chunk, same shapes) marking exactly the ``k`` lowest entries over all chunks (and over all
    ranks of ``group``: each rank passes its local chunks, the same number of chunks in the same order, and ``k`` is
    the global count).

    Example:
        >>> import torch
        >>> select_lowest([torch.tensor([1.0, 1.0, 1.0, 0.0])], 2)[0].tolist()  # ties in index order
        [True, False, False, True]
    """
    device = chunks[0].device if chunks else torch.device("cpu")
    total = _all_reduce(torch.tensor([sum(c.numel() for c in chunks)], dtype=torch.int64, device=device), group)
    k = int(k)
    if not 0 <= k <= int(total):
        raise ValueError(f"Expected 0 <= k <= {int(total)} entries, but got k={k}")
    if k == 0:
        return [torch.zeros_like(c, dtype=torch.bool) for c in chunks]
    if k == int(total):
        return [torch.ones_like(c, dtype=torch.bool) for c in chunks]
    prefix, remaining = 0, k  # the threshold key's high bits found so far; entries still to select below it
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(257, dtype=torch.int64, device=device)
        for chunk in chunks:
            keys = ordered_keys(chunk).reshape(-1)
            digit = (keys >> shift) & 0xFF
            if shift < 24:  # only entries whose higher bytes equal the prefix so far
                digit = digit.masked_fill(((keys >> (shift + 8)) & ((1 << (24 - shift)) - 1)) != prefix, 256)
            hist += torch.bincount(digit.long(), minlength=257)
        hist = _all_reduce(hist, group)[:256]
        cumulative = hist.cumsum(0)
        byte = int(torch.searchsorted(cumulative, torch.tensor(remaining, device=device)))  # first bin reaching it
        remaining -= int(cumulative[byte - 1]) if byte > 0 else 0
        prefix = (prefix << 8) | byte
    threshold = prefix  # the exact key of the k-th lowest entry, as an unsigned 32-bit value
    masks, ties = [], []
    for chunk in chunks:
        keys = _unsigned(ordered_keys(chunk))
        masks.append(keys < threshold)
        ties.append(keys == threshold)
    quota = _tie_quota([int(t.sum()) for t in ties], remaining, group, device)
    for mask, tie in zip(masks, ties, strict=True):
        if quota <= 0:
            break
        flat = tie.reshape(-1)
        take = flat & (flat.cumsum(0) <= quota)
        mask.reshape(-1).logical_or_(take)
        quota -= int(take.sum())
    return masks


def _unsigned(keys: Tensor) -> Tensor:
    return keys.to(torch.int64) & 0xFFFFFFFF


def _tie_quota(local_ties: list[int], needed: int, group: Any, device: torch.device) -> int:
    """How many of this rank's ties at the threshold to take: ranks in order take what is still needed."""
    mine = sum(local_ties)
    if group is None:
        return min(needed, mine)
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[rank] = mine
    torch.distributed.all_reduce(counts, group=group)
    before = int(counts[:rank].sum())
    return max(0, min(mine, needed - before))


def count_below(chunks: Sequence[Tensor], value: float, group: Any = None) -> int:
    """Number of entries ``< value`` over all chunks (and ranks).

    Example:
        >>> import torch
        >>> count_below([torch.tensor([1.0, 2.0]), torch.tensor([0.5])], 1.5)
        2
    """
    device = chunks[0].device if chunks else torch.device("cpu")
    total = torch.tensor([sum(int((c < value).sum()) for c in chunks)], dtype=torch.int64, device=device)
    return int(_all_reduce(total, group))
