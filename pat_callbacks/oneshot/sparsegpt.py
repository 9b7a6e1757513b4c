"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
prune a layer and update its remaining weights to compensate, from the input Hessian ``H = X^T X``.

For each layer, with ``H + lambda I`` (``lambda = damping * mean(diag H)``, 1% by default) and the upper Cholesky
factor ``U`` of its inverse, columns are visited left to right in blocks of ``block_size`` (128): at the start of a
block, the block's mask is chosen (unstructured: the lowest ``w^2 / U_jj^2`` over the whole block, an exact count;
N:M: per group of M columns as the group is reached), then each column's pruning error ``(w - q) / U_jj`` is pushed
onto the block's later columns (the OBS update), and the block's accumulated errors onto every later column at once.

Input columns that never fire (``H_jj = 0``, "dead") have zero saliency, as in the reference code (which zeroes
them, ``H[dead, dead] = 1; W[:, dead] = 0``, before the damping): their weights are pruned before any live one, ties
in index order. (With a small ``H`` the damped diagonal would otherwise make them outrank live weights: on a 64 x 16
layer with 4 of 16 inputs dead and the others of scale 0.01, at 0.5, 205 of the 256 dead-input weights were kept and
the output error was 8.4x a plain OBS's; now none is, the error 0.91x: ``tests/oneshot/test_sparsegpt_edges.py``.)
Their column of ``H^-1`` is decoupled from the others, so pruning them moves no other weight.

Deviations from the reference code, on purpose: the unstructured count is exact (the layer's ``prune_count``, spread
over blocks by cumulative rounding; the reference's ``<=`` threshold can take a few more); dead-input weights the
count leaves kept keep their values instead of being zeroed, so the zeros of the layer are exactly its mask; every
layer keeps at least one weight (``sparsity`` near 1 prunes all but one, as the Pruner does); and a previous
keep-mask (``keep``) is honoured: its pruned entries are pruned again whatever the OBS updates made of them, so a
second call at a higher sparsity nests its mask in the first.

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


def _saliency(w: Tensor, d: Tensor, dead: Tensor, forced: Tensor | None) -> Tensor:
    """OBS saliency ``w^2 / d^2`` of a block's (or group's) weights; ``-1`` in dead-input columns and ``-2`` where
    a previous mask pruned, so those are pruned first (dead before live, earlier-pruned before both)."""
    saliency = w.square() / d.square().view(1, -1)
    saliency[:, dead] = -1.0
    if forced is not None:
        saliency[forced] = -2.0
    return saliency


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
    keep: Tensor | None = None,
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
        damping: ``lambda`` as a fraction of the mean diagonal of ``H`` (0.01 in the paper).
        keep: a previous ``out x in`` keep-mask (e.g. the Pruner's): its ``False`` entries are pruned again (they
            count towards ``sparsity``; a count below theirs prunes just them), so masks nest.

    Which weights a block prunes is the package's one selection on ``w^2 / [H^-1]_jj^2``: the block's share of the
    count by :func:`~pat_callbacks.core.patterns.lowest_k`, or each group's by
    :func:`~pat_callbacks.core.patterns.nm_mask`; ties in index order in both.

    Unstructured, every layer keeps at least one weight: a count that would take all of them takes all but one.
    Dead inputs (``H_jj = 0``) score below every live weight, and entries ``keep`` pruned below those.

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
    if keep is not None and keep.shape != weight.shape:
        raise ValueError(f"Expected `keep` of shape {tuple(weight.shape)}, but got {tuple(keep.shape)}")
    w = weight.detach().float().clone()
    hessian = hessian.to(w.device)
    dead = torch.diag(hessian) == 0  # inputs that never fire: zero saliency, pruned first
    hinv = _inverse_factor(hessian, damping)
    forced = None if keep is None else ~keep.to(device=w.device, dtype=torch.bool)
    mask = torch.ones_like(w, dtype=torch.bool)
    total = 0
    if nm is None:  # every layer keeps a weight; entries pruned before count towards the target
        total = min(prune_count(w.numel(), sparsity), w.numel() - 1)
        total = max(total, int(forced.sum())) if forced is not None else total
    free = total - (int(forced.sum()) if forced is not None else 0)  # the count left to the saliency
    carry = 0  # what a block full of earlier-pruned entries could not take, passed on
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1)
        forced1 = forced[:, i1:i2] if forced is not None else None
        pruned1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # this block's share of the exact count, by cumulative rounding
            n_forced = int(forced1.sum()) if forced1 is not None else 0
            k = round(free * i2 / columns) - round(free * i1 / columns) + carry
            carry = max(0, k - (w1.numel() - n_forced))
            saliency = _saliency(w1, d1, dead[i1:i2], forced1)
            pruned1 = lowest_k(saliency.reshape(-1), k - carry + n_forced).view_as(w1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = _saliency(
                    w1[:, group], d1[group], dead[i1:i2][group], forced1[:, group] if forced1 is not None else None
                )
                pruned1[:, group] = ~nm_mask(saliency, *nm)
                if forced1 is not None:
                    pruned1[:, group] |= forced1[:, group]
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
