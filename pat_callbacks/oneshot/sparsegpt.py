"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
prune a layer and update its remaining weights to compensate, from the input Hessian ``H = X^T X``.

For each layer, with ``H + lambda I`` (``lambda = damping * mean(diag H)``, 1% by default) and the upper Cholesky
factor ``U`` of its inverse, columns are visited left to right in blocks of ``block_size`` (128): at the start of a
block, the block's mask is chosen (unstructured: the lowest ``w^2 / U_jj^2`` over the whole block, an exact count;
N:M: per group of M columns as the group is reached), then each column's pruning error ``(w - q) / U_jj`` is pushed
onto the block's later columns (the OBS update), and the block's accumulated errors onto every later column at once.

Deviations from the reference code, on purpose: the unstructured count is exact (the layer's ``prune_count``, spread
over blocks by cumulative rounding; the reference's ``<=`` threshold can take a few more), and input columns that
never fire (``H_jj = 0``) keep their weights instead of being zeroed, so the zeros of the layer are exactly its mask.

Memory: one layer at a time, in float32 on the weight's device: while the inverse is formed, the caller's Hessian,
its damped copy / Cholesky factor and the inverse (``3 * in^2`` floats, ``1 * in^2`` after), a copy of the weight
(``out * in``) and one block's temporaries (about ``4 * out * block_size``); the caller frees the Hessian when the
layer is done. Peak: ``4 * (3 * in^2 + out * in + 4 * out * block_size)`` bytes on top of the model and of the other
statistics still held, e.g. 1.5 GiB for the 4096 x 11008 MLP down-projection of LLaMA-7B (in = 11008).
Under FSDP2 (DTensor parameters) a layer would need its whole weight and Hessian on one rank: refused.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(256, 16)
    >>> w = torch.randn(8, 16)
    >>> new, mask = sparsegpt_prune(w, x.t() @ x, 0.5)
    >>> int((~mask).sum()), bool((new[~mask] == 0).all())
    (64, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

from pat_callbacks.core.patterns import lowest_k, nm_mask, prune_count
from pat_callbacks.core.sharding import is_sharded

__all__ = ["refuse_sharded", "sparsegpt_prune"]


def refuse_sharded(params: dict[str, Tensor] | None) -> None:
    """Raise if any parameter is a DTensor (FSDP2): SparseGPT needs a whole layer and its Hessian on one device.

    Example:
        >>> import torch
        >>> refuse_sharded({"w": torch.zeros(2, 2)})  # plain tensors: fine
    """
    sharded = sorted(name for name, p in (params or {}).items() if is_sharded(p))
    if sharded:
        raise ValueError(
            f"method='sparsegpt' is not supported with sharded (FSDP2) parameters ({sharded[:3]}...): each layer's "
            "update needs its whole weight and in x in Hessian on one device. Prune one-shot before sharding (e.g. "
            "in a single process, then save and train the pruned checkpoint with KeepSparsity), or use "
            "method='wanda', which works on the shards"
        )


def _inverse_factor(hessian: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1`` (dead inputs get ``H_jj = 1``)."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diagonal = torch.arange(h.shape[0], device=h.device)
    h[diagonal, diagonal] += damping * torch.mean(torch.diag(h))
    size = h.shape[0]
    factor, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info) != 0:
        raise RuntimeError(
            f"SparseGPT: the damped input Hessian ({size} x {size}) is not positive definite; use more "
            f"calibration data or a larger `damping` (now {damping})"
        )
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True)


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune an ``out x in`` matrix with SparseGPT; returns ``(updated weight, keep-mask)`` (the weight in float32,
    exactly zero where the mask is ``False``; ``weight`` itself is not modified).

    Args:
        weight: ``out x in`` (a conv weight flattened to ``out x in_channels * kernel``; an ``in x out`` weight
            transposed).
        hessian: ``X^T X`` of the layer's input (``in x in``), e.g. :meth:`Calibration.pop_hessian
            <pat_callbacks.oneshot.calibration.Calibration.pop_hessian>`.
        sparsity: fraction of the layer's entries pruned (unstructured; ignored with ``nm``).
        nm: ``(N, M)``: keep N of every M consecutive weights of each row (``in`` a multiple of M, and
            ``block_size`` too).
        block_size: columns per lazy-update block (128 in the paper).

    Which weights a block prunes is the package's one selection on ``w^2 / [H^-1]_jj^2``: the block's share of the
    count by :func:`~pat_callbacks.core.patterns.lowest_k`, or each group's by
    :func:`~pat_callbacks.core.patterns.nm_mask`; ties in index order in both.
        damping: ``lambda`` as a fraction of the mean diagonal of ``H`` (0.01 in the paper).

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> x, w = torch.randn(64, 8), torch.randn(4, 8)
        >>> new, mask = sparsegpt_prune(w, x.t() @ x, 0.0, nm=(2, 4))
        >>> mask.view(4, 2, 4).sum(-1).unique().tolist()
        [2]
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"Expected an out x in weight and an in x in Hessian, but got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}"
        )
    columns = weight.shape[1]
    if nm is not None:
        n, m = nm
        if columns % m or block_size % m:
            raise ValueError(
                f"N:M={n}:{m} needs `in` ({columns}) and `block_size` ({block_size}) to be multiples of {m}"
            )
    w = weight.detach().float().clone()
    hinv = _inverse_factor(hessian.to(w.device), damping)
    mask = torch.ones_like(w, dtype=torch.bool)
    total = prune_count(w.numel(), sparsity) if nm is None else 0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1)
        pruned1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # this block's share of the exact count, by cumulative rounding
            k = round(total * i2 / columns) - round(total * i1 / columns)
            pruned1 = lowest_k((w1.square() / d1.square().view(1, -1)).reshape(-1), k).view_as(w1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i : i + nm[1]].square() / d1[i : i + nm[1]].square().view(1, -1)
                pruned1[:, i : i + nm[1]] = ~nm_mask(group, *nm)
            col = w1[:, i]
            q = col.masked_fill(pruned1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        mask[:, i1:i2] = ~pruned1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    del hinv
    w.masked_fill_(~mask, 0.0)  # exact zeros (q already is; this guards the dtype round trip)
    return w, mask
