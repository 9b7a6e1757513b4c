"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"): prune by
``|W_ij| * ||X_j||_2``, the weight's magnitude times the norm of the input feature it multiplies.

Two ways to use the scores:

- as ``scores=`` of :meth:`Pruner.prune_to <pat_callbacks.core.pruner.Pruner.prune_to>`: every allocation
  (uniform, global, ERK, ``layer_sparsity``) and every pattern (unstructured, N:M) of the Pruner then applies;
- with the paper's comparison group, the output row (:func:`row_masks`): the output rows of a layer lose the same
  number of weights to one, and the layer exactly its count (the paper measured per-row comparison better than a
  per-layer one for LLMs).

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    >>> wanda_score(w, torch.tensor([4.0, 1.0])).tolist()      # |W| * ||X||: column j scaled by norm j
    [[4.0, 2.0], [12.0, 0.5]]
    >>> row_masks({"w": wanda_score(w, torch.tensor([4.0, 1.0]))}, {"w": 0.5})["w"].tolist()
    [[True, False], [True, False]]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from pat_callbacks.core.patterns import prune_count
from pat_callbacks.core.radix import signed_keys
from pat_callbacks.core.selection import select_lowest
from pat_callbacks.core.sharding import is_sharded, local

__all__ = ["row_mask", "row_masks", "wanda_score", "wanda_scores"]


def wanda_score(weight: Tensor, norms: Tensor, *, transposed: bool = False) -> Tensor:
    """``|W_ij| * ||X_j||_2`` in ``weight``'s shape (float32; this rank's rows when sharded).

    Args:
        weight: ``out x in...`` (a conv's ``in`` is ``in_channels x kernel``, flattened), or ``in x out`` when
            ``transposed`` (Hugging Face ``Conv1D``).
        norms: ``||X_j||_2`` per input column (see :meth:`Calibration.norms
            <pat_callbacks.oneshot.calibration.Calibration.norms>`).
        transposed: the weight is stored ``in x out``.

    Example:
        >>> import torch
        >>> wanda_score(torch.tensor([[1.0, -2.0], [3.0, 0.5]]).t(), torch.tensor([4.0, 1.0]), transposed=True).t()
        tensor([[ 4.0000,  2.0000],
                [12.0000,  0.5000]])
    """
    w = local(weight).detach().float()
    n = norms.detach().to(device=w.device, dtype=torch.float32)
    if transposed:
        if is_sharded(weight):
            raise ValueError("Wanda scores of a sharded (FSDP2) in x out matrix are not supported: its rows are inputs")
        if w.dim() != 2 or w.shape[0] != n.numel():
            raise ValueError(f"Expected {n.numel()} input rows in an in x out weight, but got shape {tuple(w.shape)}")
        return w.abs() * n.view(-1, 1)
    rows = w.reshape(w.shape[0], -1)
    if rows.shape[1] != n.numel():
        raise ValueError(f"Expected {n.numel()} input columns, but the weight has shape {tuple(w.shape)}")
    return (rows.abs() * n.view(1, -1)).view(w.shape)


def wanda_scores(
    params: Mapping[str, Tensor], norms: Mapping[str, Tensor], transposed: Iterable[str] = ()
) -> dict[str, Tensor]:
    """:func:`wanda_score` of every parameter (``transposed``: the names stored ``in x out``, e.g. a Pruner's
    ``transposed``); the ``scores=`` of :meth:`Pruner.prune_to <pat_callbacks.core.pruner.Pruner.prune_to>`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pat_callbacks.core.pruner import Pruner
        >>> from pat_callbacks.oneshot.calibration import Calibration
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> pruner = Pruner(model, pattern="2:4")
        >>> calib = Calibration(model, pruner.params).collect([torch.randn(16, 8)])
        >>> scores = wanda_scores(pruner.params, {n: calib.norms(n) for n in pruner.params}, pruner.transposed)
        >>> pruner.prune_to(0.5, scores=scores), pruner.sparsity()
        (True, 0.5)
    """
    flipped = set(transposed)
    return {name: wanda_score(p, norms[name], transposed=name in flipped) for name, p in params.items()}


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask comparing scores within every output row (the first dimension; the rest flattened), Wanda's
    comparison group, with the layer's exact count: ``prune_count(numel, sparsity)`` pruned in all, each row its
    ``total // rows`` lowest scores, and the rows where one more costs least (the lowest next score; ties to the
    lower row: the one selection's index order) one more. Scores rank by the package's one key
    (:func:`~pat_callbacks.core.radix.signed_keys`), ties in index order: a stable sort of each row, since a
    row-wise count does not batch into one selection. (Pruning ``round(sparsity * row size)`` in every row would
    miss the target whenever it rounds: 0.7 of 128 inputs is 89.6.) Above ``(width - 1) / width`` some rows lose
    every weight, but the layer keeps at least one (the highest score of the row whose best is highest), as the
    Pruner's layers do. The sort costs about 3x the layer's bytes, one layer at a time; on FSDP2 row shards the count is
    exact per shard.

    Example:
        >>> import torch
        >>> row_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0], [8.0, 7.0, 6.0, 5.0]]), 0.5).int().tolist()
        [[0, 0, 1, 1], [1, 1, 0, 0]]
        >>> row_mask(torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 6.0]]), 0.5).int().tolist()  # 3 of 6: row 0 +1
        [[0, 0, 1], [1, 0, 1]]
    """
    rows = scores.detach().reshape(scores.shape[0], -1)
    n_rows, width = rows.shape
    total = min(prune_count(rows.numel(), sparsity), rows.numel() - 1)  # every layer keeps a weight
    if total <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    base, extra = divmod(total, n_rows)
    order = torch.sort(signed_keys(rows.to(torch.float32)), dim=1, stable=True).indices  # ties to the lower input
    counts = torch.full((n_rows,), base, dtype=torch.long, device=rows.device)
    if extra:
        next_cost = rows.gather(1, order[:, base : base + 1]).reshape(-1)  # what one more costs (base < width here)
        counts += select_lowest([next_cost], extra)[0]
    pruned_sorted = torch.arange(width, device=rows.device).expand(n_rows, width) < counts[:, None]
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask.scatter_(1, order, ~pruned_sorted)
    return mask.view(scores.shape)


def row_masks(
    scores: Mapping[str, Tensor], sparsities: Mapping[str, float], transposed: Iterable[str] = ()
) -> dict[str, Tensor]:
    """:func:`row_mask` of every layer at its own sparsity; ``in x out`` matrices compare along their columns
    (their output rows). Every layer keeps at least one weight (per row only if its sparsity leaves one), and a
    layer pruned past 0.99 is warned about, as the Pruner does.

    Example:
        >>> import torch
        >>> row_masks({"t": torch.tensor([[1.0, 9.0], [2.0, 8.0]])}, {"t": 0.5}, transposed=["t"])["t"].int().tolist()
        [[0, 1], [1, 0]]
    """
    flipped = set(transposed)
    masks = {}
    for name, layer in scores.items():
        if name in flipped:
            masks[name] = row_mask(layer.t(), sparsities[name]).t()
        else:
            masks[name] = row_mask(layer, sparsities[name])
        _warn_nearly_empty(name, masks[name])
    return masks


def _warn_nearly_empty(name: str, mask: Tensor) -> None:
    """The Pruner's warning about a layer pruned past 0.99, in its words."""
    kept, numel = int(mask.sum()), mask.numel()
    value = 1.0 - kept / numel
    if value > 0.99:
        warnings.warn(
            f"Wanda: {name!r} is pruned to {value:.4g} (over 0.99), keeping {kept} of {numel} weights: the layer "
            "nearly cuts the network off; pin it lower with `layer_sparsity` or leave it out with `exclude`",
            UserWarning,
            stacklevel=3,
        )
