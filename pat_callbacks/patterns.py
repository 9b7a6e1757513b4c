"""Mask shapes: turn scores and a per-layer sparsity into a boolean keep-mask.

Example:
    >>> import torch
    >>> unstructured_mask(torch.tensor([0.1, 0.9, 0.5, 0.3]), sparsity=0.5)
    tensor([False,  True,  True, False])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lowest_k", "prune_count", "unstructured_mask"]


def prune_count(numel: int, sparsity: float) -> int:
    """Number of entries to prune so that ``numel`` entries reach ``sparsity`` (nearest integer).

    Example:
        >>> prune_count(125, 0.9), prune_count(10, 0.7)
        (112, 7)
    """
    return min(numel, max(0, round(numel * sparsity)))


def unstructured_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (``True`` = kept) that prunes the ``prune_count`` lowest-scoring entries of ``scores``.

    Exact count, never a full sort (see :func:`lowest_k`).

    Example:
        >>> import torch
        >>> unstructured_mask(torch.tensor([[0.3, 0.1], [0.2, 0.4]]), 0.5)
        tensor([[ True, False],
                [False,  True]])
    """
    flat = scores.detach().reshape(-1)
    n_prune = prune_count(flat.numel(), sparsity)
    if n_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return (~lowest_k(flat, n_prune)).view_as(scores)


def lowest_k(values: Tensor, k: int) -> Tensor:
    """Bool mask of exactly ``k`` lowest entries of the 1-D ``values``.

    ``torch.topk`` over the smaller side (the ``k`` lowest or the ``n - k`` highest), never a full sort. (A
    sampled-bracket selection was tried and measured 1.5x slower than ``topk`` on 4M entries on CPU.)

    Example:
        >>> import torch
        >>> lowest_k(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2).tolist()
        [False, True, False, True]
    """
    n = values.numel()
    if k <= n - k:
        mask = torch.zeros(n, dtype=torch.bool, device=values.device)
        if k > 0:
            mask[torch.topk(values, k, largest=False, sorted=False).indices] = True
    else:
        mask = torch.ones(n, dtype=torch.bool, device=values.device)
        if k < n:
            mask[torch.topk(values, n - k, largest=True, sorted=False).indices] = False
    return mask
