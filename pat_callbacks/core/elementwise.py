"""Elementwise passes over many tensors at once, in pieces that stay in a CPU core's cache.

On a CPU a multi-tensor kernel over a whole model writes its temporaries to main memory (a 5.8M-entry MLP:
23 MB per temporary, freshly paged in each step) and multiplies a float tensor by a ``uint8`` mask through a
per-entry cast; done piece by piece (at most :data:`CPU_PIECE` entries at a time), the temporaries stay in cache
and the mask is converted to the tensor's dtype first, then multiplied by a vectorised same-dtype kernel.
``python bench/overhead.py`` measures what that saves per training step. The numbers are the same as one whole
pass (every operation is elementwise). On other devices the passes run on whole tensors, as one launch each.

Example:
    >>> import torch
    >>> grad, mask = torch.arange(6.0).reshape(2, 3), torch.tensor([[True, False, True], [False, True, True]])
    >>> multiply_by_masks_([grad], [mask], piece=4)
    >>> grad
    tensor([[0., 0., 2.],
            [0., 4., 5.]])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["CPU_PIECE", "aligned_pieces", "multiply_by_masks_"]

CPU_PIECE = 1 << 18
"""Entries per piece on a CPU: a 1 MiB float32 temporary, within one core's L2 cache (measured in
``bench/overhead.py``: 2**16 pays Python's per-call cost, 2**20 and more gains nothing)."""


def piece_size(device: torch.device) -> int | None:
    """Entries per piece on ``device``: :data:`CPU_PIECE` on a CPU, ``None`` (whole tensors) elsewhere.

    Example:
        >>> piece_size(torch.device("cpu")), piece_size(torch.device("meta"))
        (262144, None)
    """
    return CPU_PIECE if device.type == "cpu" else None


def aligned_pieces(rows: Sequence[Sequence[Tensor]], piece: int | None) -> Iterator[list[list[Tensor]]]:
    """Group ``rows`` (each a few tensors of one shape and layout: a weight, its gradient, its history) into
    batches of columns holding at most ``piece`` entries each: contiguous rows are cut into flat slices that
    correspond entry by entry, other rows stay whole (a batch of their own when larger than ``piece``).
    ``piece=None``: one batch of whole tensors. Each batch is a list of columns: ``[[w1, w2], [g1, g2], ...]``.

    Example:
        >>> a, b, c = torch.zeros(5), torch.ones(2, 2), torch.ones(3, 4)[:, :2]  # c is not contiguous
        >>> for weights, grads in aligned_pieces([(a, a), (b, b), (c, c)], piece=4):
        ...     print([tuple(t.shape) for t in weights])
        [(4,)]
        [(1,)]
        [(4,)]
        [(3, 2)]
    """
    if not rows:
        return
    width = len(rows[0])
    if piece is None:
        yield [[row[c] for row in rows] for c in range(width)]
        return
    batch: list[list[Tensor]] = [[] for _ in range(width)]
    filled = 0
    for row in rows:
        numel = row[0].numel()
        if not all(t.is_contiguous() for t in row):
            slices: list[tuple[Tensor, ...]] = [tuple(row)]
        else:
            flat = [t.view(-1) for t in row]
            slices = [tuple(t[start : start + piece] for t in flat) for start in range(0, numel, piece)]
        for part in slices:
            size = part[0].numel()
            if filled and filled + size > piece:
                yield batch
                batch, filled = [[] for _ in range(width)], 0
            for column, tensor in zip(batch, part, strict=True):
                column.append(tensor)
            filled += size
    if filled or batch[0]:
        yield batch


def multiply_by_masks_(tensors: Sequence[Tensor], masks: Sequence[Tensor], piece: int | None = None) -> None:
    """``t *= mask`` for each pair (``mask`` bool, ``uint8`` or the tensor's dtype, on the tensor's device), in
    place; the same numbers as ``t.mul_(mask)``. ``piece``: entries per piece on a CPU (default :data:`CPU_PIECE`).

    Example:
        >>> weights = [torch.tensor([1.5, -2.0]), torch.tensor([3.0])]
        >>> multiply_by_masks_(weights, [torch.tensor([False, True]), torch.tensor([False])])
        >>> weights
        [tensor([ 0., -2.]), tensor([0.])]
    """
    ints = [m.view(torch.uint8) if m.dtype == torch.bool else m for m in masks]
    on_cpu = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    elsewhere = [i for i, t in enumerate(tensors) if t.device.type != "cpu"]
    if elsewhere:
        torch._foreach_mul_([tensors[i] for i in elsewhere], [ints[i] for i in elsewhere])
    rows = [(tensors[i], ints[i]) for i in on_cpu]
    for values, factors in aligned_pieces(rows, piece or CPU_PIECE):
        torch._foreach_mul_(values, [f.to(v.dtype) for v, f in zip(values, factors, strict=True)])
