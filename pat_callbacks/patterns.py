"""Mask shapes: turn scores and a per-layer sparsity into a boolean keep-mask.

Example:
    >>> import torch
    >>> unstructured_mask(torch.tensor([0.1, 0.9, 0.5, 0.3]), sparsity=0.5)
    tensor([False,  True,  True, False])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prune_count", "unstructured_mask"]


def prune_count(numel: int, sparsity: float) -> int:
    """Number of entries to prune so that ``numel`` entries reach ``sparsity`` (nearest integer).

    Example:
        >>> prune_count(125, 0.9), prune_count(10, 0.7)
        (112, 7)
    """
    return min(numel, max(0, round(numel * sparsity)))


def unstructured_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (``True`` = kept) that prunes the ``prune_count`` lowest-scoring entries of ``scores``.

    Entries are chosen with ``torch.topk`` over the smaller side (pruned or kept), never a full sort.

    Example:
        >>> import torch
        >>> unstructured_mask(torch.tensor([[0.3, 0.1], [0.2, 0.4]]), 0.5)
        tensor([[ True, False],
                [False,  True]])
    """
    flat = scores.detach().reshape(-1)
    numel = flat.numel()
    n_prune = prune_count(numel, sparsity)
    if n_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune <= numel - n_prune:
        mask = torch.ones(numel, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat, n_prune, largest=False, sorted=False).indices] = False
    else:
        mask = torch.zeros(numel, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat, numel - n_prune, largest=True, sorted=False).indices] = True
    return mask.view_as(scores)
