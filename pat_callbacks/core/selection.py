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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NonFiniteScores",
    "ScoredLayer",
    "all_finite",
    "count_below",
    "ordered_keys",
    "select_lowest",
    "select_lowest_kept",
    "select_lowest_streamed",
    "sum_over_ranks",
]

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
    before = sum(_per_rank(mine, group, device)[: torch.distributed.get_rank(group)])
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


# ----------------------------------------------------------------------------------------------- streamed selection
@dataclass(frozen=True)
class ScoredLayer:
    """One layer as a source of scores for :func:`select_lowest_streamed`: scores are computed on demand, a chunk
    (or a few sampled entries) at a time, so no score tensor of the whole layer is ever held.

    Args:
        numel: number of entries.
        chunk: ``chunk(start, stop)`` -> the float32 scores of flat entries ``[start, stop)``.
        at: ``at(indices)`` -> the float32 scores of the flat ``indices``.
        kept: flat bool tensor of the entries that may be chosen (``None``: all of them).
        scale: scores are ranked divided by this (``> 0``; e.g. the layer's mean score for a global threshold).
        device: where the scores live (default: ``kept``'s device, else the CPU); masks are made there.

    Example:
        >>> import torch
        >>> weight = torch.tensor([0.5, -2.0, 1.0, -0.1])
        >>> layer = ScoredLayer(4, lambda a, b: weight[a:b].abs(), lambda i: weight[i].abs())
        >>> select_lowest_streamed([layer], 2)[0].tolist()
        [True, False, False, True]
    """

    numel: int
    chunk: Callable[[int, int], Tensor]
    at: Callable[[Tensor], Tensor]
    kept: Tensor | None = None
    scale: float = 1.0
    device: torch.device | None = None

    @staticmethod
    def of(scores: Tensor, kept: Tensor | None = None, scale: float = 1.0) -> ScoredLayer:
        """A source over a score tensor that already exists (any shape; read flat).

        Example:
            >>> import torch
            >>> ScoredLayer.of(torch.tensor([[3.0, 1.0]])).chunk(0, 2)
            tensor([3., 1.])
        """
        flat = scores.detach().reshape(-1)
        return ScoredLayer(
            flat.numel(),
            lambda a, b: flat[a:b].float(),
            lambda i: flat[i].float(),
            _flat_or_none(kept),
            scale,
            flat.device,
        )


class NonFiniteScores(ValueError):
    """Raised by :func:`select_lowest_streamed` when a layer's scores hold NaN or Inf (``layers``: their indices).

    Example:
        >>> import torch
        >>> layers = [ScoredLayer.of(torch.ones(2)), ScoredLayer.of(torch.tensor([1.0, float("nan")]))]
        >>> try:
        ...     select_lowest_streamed(layers, 1)
        ... except NonFiniteScores as error:
        ...     error.layers
        [1]
    """

    def __init__(self, layers: list[int]) -> None:
        super().__init__(f"NaN or Inf in the scores of layers {layers}")
        self.layers = layers


def _flat_or_none(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.reshape(-1)


# Samples drawn to bracket the threshold (at most: 1 in 64 entries for smaller selections), and entries scored per
# chunk (4 x 128k floats stay in a core's L2 cache).
SAMPLE_SIZE = 1 << 17
CHUNK_SIZE = 1 << 17
_MIN_SAMPLE = 1 << 12
_Z = 6.0  # the bracket's half-width in standard deviations of the sampled rank estimate


def select_lowest_streamed(
    layers: Sequence[ScoredLayer],
    k: int,
    *,
    group: Any = None,
    seed: int = 0,
    sample_size: int | None = None,
    chunk_size: int | None = None,
) -> list[Tensor] | None:
    """Flat bool masks (one per layer) choosing exactly the ``k`` lowest ``score / scale`` among the kept entries of
    all layers (and of all ranks of ``group``: each rank passes its local shards of the same layers, ``k`` is the
    global count); ties at the threshold are taken in rank, layer, then index order (as :func:`select_lowest`).

    The scores are never held whole: a seeded sample (gathered from every rank: a few hundred kB) brackets the k-th
    value, one streamed pass scores each chunk, marks the entries below the bracket and keeps the few inside it, and
    an exact selection among those settles the rest. Transient memory is one chunk of scores plus the bracket's
    candidates (about 2% of the entries); time is about one scoring pass plus a few passes over bool chunks. Returns
    ``None`` on every rank if the bracket missed (a chance of about 1e-9 per call: the caller then selects exactly
    on whole tensors), and raises :class:`NonFiniteScores` on every rank if a score is NaN or infinite.

    Example:
        >>> import torch
        >>> layers = [ScoredLayer.of(torch.tensor([0.5, -1.0, 3.0])), ScoredLayer.of(torch.tensor([2.0, 0.5, 0.1]))]
        >>> [m.tolist() for m in select_lowest_streamed(layers, 3)]  # -1.0, 0.1 and the first 0.5
        [[True, True, False], [False, False, True]]
    """
    k = int(k)
    sample_size, chunk_size = sample_size or SAMPLE_SIZE, chunk_size or CHUNK_SIZE
    device = _device(layers[0]) if layers else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    numel_total, kept_total = sum_over_ranks([sum(x.numel for x in layers), _kept_count(layers)], group, device)
    sample_size = min(sample_size, max(_MIN_SAMPLE, numel_total // 64))  # the bracket's cost stays a fraction
    samples, weights, variance, bad = [], [], 0.0, [0] * len(layers)
    for index, layer in enumerate(layers):
        if layer.numel <= sample_size:  # small: every entry, exactly
            indices, weight = None, 1.0
            values = layer.chunk(0, layer.numel)
        else:
            count = max(1, math.ceil(sample_size * layer.numel / max(numel_total, 1)))
            indices = torch.randint(layer.numel, (count,), generator=generator).to(_device(layer))
            weight = layer.numel / count
            variance += layer.numel * weight / 4  # Var of the estimated count below a value <= n^2 / (4 m)
            values = layer.at(indices)
        bad[index] = int(not bool(torch.isfinite(values).all()))
        if layer.kept is not None:
            values = values[layer.kept[indices] if indices is not None else layer.kept]
        samples.append(values.cpu().double() / layer.scale)
        weights.append(torch.full((values.numel(),), weight, dtype=torch.float64))
    _raise_if_bad(sum_over_ranks(bad, group, device))
    if not 0 <= k <= kept_total:
        raise ValueError(f"Expected 0 <= k <= {kept_total} kept entries, but got k={k}")
    chosen = [torch.zeros(layer.numel, dtype=torch.bool, device=_device(layer)) for layer in layers]
    (variance,) = sum_over_ranks([variance], group, device, torch.float64)
    margin = _Z * math.sqrt(variance) + 1.0
    low, high = _bracket(*_gathered(torch.cat(samples), torch.cat(weights), group, device), k, margin)
    cap = 4 * margin + 1024  # candidates beyond this (on a rank) mean the bracket was too wide
    below, in_band, band_values, band_indices = 0, 0, [], []
    for index, layer in enumerate(layers):
        lo, hi = _raw_bounds(low, high, layer.scale)
        values_kept, indices_kept = [], []
        for start in range(0, layer.numel if in_band <= cap else 0, chunk_size):
            stop = min(start + chunk_size, layer.numel)
            scores = layer.chunk(start, stop)
            if not all_finite(scores):
                bad[index] = 1
                break
            marked = chosen[index][start:stop]
            torch.lt(scores, lo, out=marked)
            band = scores <= hi
            if layer.kept is not None:
                kept = layer.kept[start:stop]
                marked.logical_and_(kept)
                band.logical_and_(kept)
            band.logical_xor_(marked)  # lo <= score <= hi, kept
            below += int(marked.count_nonzero())
            where = band.nonzero().reshape(-1)
            values_kept.append(scores[where])
            indices_kept.append(where + start)
            in_band += where.numel()
            if in_band > cap:
                break
        band_values.append(torch.cat(values_kept) if values_kept else torch.empty(0, device=_device(layer)))
        band_indices.append(
            torch.cat(indices_kept) if indices_kept else torch.empty(0, dtype=torch.int64, device=_device(layer))
        )
    *bad, below, band_total, too_wide = sum_over_ranks([*bad, below, in_band, int(in_band > cap)], group, device)
    _raise_if_bad(bad)
    needed = k - below
    if too_wide or not 0 <= needed <= band_total:
        return None
    normalised = [
        values / layer.scale if layer.scale != 1.0 else values
        for values, layer in zip(band_values, layers, strict=True)
    ]
    for mask, taken, where in zip(chosen, select_lowest(normalised, needed, group), band_indices, strict=True):
        mask[where[taken]] = True
    return chosen


def _kept_count(layers: Sequence[ScoredLayer]) -> int:
    return sum(x.numel if x.kept is None else int(x.kept.count_nonzero()) for x in layers)


def sum_over_ranks(values: list[Any], group: Any, device: torch.device, dtype: torch.dtype = torch.int64) -> list[Any]:
    """Element-wise sums over the ranks of ``group`` (``values`` unchanged without one).

    Example:
        >>> import torch
        >>> sum_over_ranks([3, 4], None, torch.device("cpu"))
        [3, 4]
    """
    if group is None:
        return list(values)
    return _all_reduce(torch.tensor(values, dtype=dtype, device=device), group).cpu().tolist()


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: a sum first (a fast reduction; NaN and Inf propagate), the entry-wise check
    only when the sum is not finite (it may merely have overflowed).

    Example:
        >>> import torch
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("inf")]))
        (True, False)
    """
    return math.isfinite(float(tensor.detach().sum())) or bool(torch.isfinite(tensor).all())


def _raise_if_bad(flags: list[int]) -> None:
    bad = [index for index, flag in enumerate(flags) if flag]
    if bad:
        raise NonFiniteScores(bad)


def _gathered(values: Tensor, weights: Tensor, group: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every rank's samples and their weights (padded to one length with ``inf`` of weight 0 for the gather)."""
    if group is None:
        return values, weights
    world = torch.distributed.get_world_size(group)
    size = max(_per_rank(values.numel(), group, device))
    padded = torch.full((2, size), math.inf, dtype=torch.float64)
    padded[1] = 0.0
    padded[0, : values.numel()], padded[1, : values.numel()] = values, weights
    parts = [torch.empty_like(padded, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.to(device), group=group)
    both = torch.cat([part.cpu() for part in parts], dim=1)
    return both[0], both[1]


def _per_rank(value: int, group: Any, device: torch.device) -> list[int]:
    """Every rank's ``value``, in rank order."""
    values = torch.zeros(torch.distributed.get_world_size(group), dtype=torch.int64, device=device)
    values[torch.distributed.get_rank(group)] = value
    return _all_reduce(values, group).cpu().tolist()


def _device(layer: ScoredLayer) -> torch.device:
    if layer.kept is not None:
        return layer.kept.device
    return layer.device if layer.device is not None else torch.device("cpu")


def _bracket(values: Tensor, weights: Tensor, k: int, margin: float) -> tuple[float, float]:
    """Values whose estimated rank is safely below / above ``k`` (``-inf`` / ``inf`` where none is)."""
    values, order = values.sort()
    ranks = weights[order].cumsum(0)
    lower = int(torch.searchsorted(ranks, torch.tensor(k - margin, dtype=torch.float64))) - 1
    upper = int(torch.searchsorted(ranks, torch.tensor(k + margin, dtype=torch.float64), right=True)) + 1
    low = float(values[lower]) if lower >= 0 else -math.inf
    high = float(values[upper]) if upper < values.numel() else math.inf
    return low, high


def _raw_bounds(low: float, high: float, scale: float) -> tuple[float, float]:
    """Bounds on raw scores such that ``raw < lo`` implies ``raw / scale < low`` and ``raw > hi`` implies
    ``raw / scale > high`` despite float32 rounding (a margin of a few ulps)."""
    if scale == 1.0:
        return low, high
    lo, hi = low * scale, high * scale
    return lo - abs(lo) * 1e-6 - 1e-30, hi + abs(hi) * 1e-6 + 1e-30


def select_lowest_kept(layers: Sequence[ScoredLayer], k: int, group: Any = None) -> list[Tensor]:
    """:func:`select_lowest_streamed`, or the same choice by an exact selection over whole score tensors where its
    bracket missed.

    Example:
        >>> import torch
        >>> layer = ScoredLayer.of(torch.tensor([0.3, 0.1, 0.2]), kept=torch.tensor([True, False, True]))
        >>> select_lowest_kept([layer], 1)[0].tolist()
        [False, False, True]
    """
    chosen = select_lowest_streamed(layers, k, group=group)
    if chosen is not None:
        return chosen
    scores = []
    for layer in layers:
        values = layer.chunk(0, layer.numel)
        values = values / layer.scale if layer.scale != 1.0 else values
        scores.append(values if layer.kept is None else torch.where(layer.kept, values, torch.inf))
    return select_lowest(scores, k, group)
