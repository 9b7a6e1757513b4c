"""Exact k-lowest selection over many tensors and many ranks, without concatenating or gathering them.

Every selection here is exact to the entry with one tie rule (entries at the threshold in rank, then tensor, then
flat-index order) and ends in the one radix select of :mod:`pat_callbacks.core.radix` (16-bit histograms of
:func:`~pat_callbacks.core.radix.signed_keys`, all-reduced over the ranks of a process group when one is given):

- :func:`select_lowest`: over score tensors that already exist (the exact path of an update);
- :func:`select_lowest_streamed`: over layers scored a chunk at a time (:class:`ScoredLayer`), never a whole score
  tensor. On a CPU a seeded sample first brackets the k-th value, so one scoring pass marks most entries and the
  radix select only settles the few inside the bracket (measured 2.4x faster than three radix passes over 4M
  scores on this CPU, ``bench/update_cost.py``); where the bracket misses (a chance of about 1e-9), or for CUDA
  scores, the radix select runs over the layers themselves. ``STRATEGY`` (``PAT_SELECTION_STRATEGY``) picks.

Example:
    >>> import torch
    >>> chunks = [torch.tensor([0.5, -1.0, 3.0]), torch.tensor([2.0, 0.5, 0.1])]
    >>> [m.tolist() for m in select_lowest(chunks, 3)]  # -1.0, 0.1 and the first 0.5
    [[True, True, False], [False, False, True]]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pat_callbacks.core.radix import (
    NonFiniteScores,
    ScoredLayer,
    all_finite,
    all_reduce,
    per_rank,
    radix_select,
    raise_if_bad,
    signed_keys,
    sum_over_ranks,
)

__all__ = [
    "STRATEGIES",
    "NonFiniteScores",
    "ScoredLayer",
    "all_finite",
    "count_below",
    "layer_total",
    "select_lowest",
    "select_lowest_kept",
    "select_lowest_streamed",
    "signed_keys",
    "sum_over_ranks",
    "uses_device_strategy",
]

# How streamed selections run: "host" (the sampled bracket, built for a CPU: small chunks, a few host reads per
# chunk), "device" (the radix select over the layers: large chunks, no host read inside a loop) or "auto" (the
# device strategy for CUDA scores, the host one elsewhere). Tests force "device" on a CPU. PAT_SELECTION_STRATEGY
# sets it for a whole run, launched ranks included (any case; an unknown value is refused at import).
STRATEGIES = ("auto", "host", "device")


def parse_strategy(value: str, source: str = "PAT_SELECTION_STRATEGY") -> str:
    """``value`` as one of :data:`STRATEGIES` (any case), or a ``ValueError`` naming ``source``, the value and the
    allowed ones.

    Example:
        >>> parse_strategy(" Device ")
        'device'
        >>> parse_strategy("gpu")
        Traceback (most recent call last):
        ...
        ValueError: Expected PAT_SELECTION_STRATEGY to be one of ['auto', 'host', 'device'] (any case), but got 'gpu'
    """
    strategy = value.strip().lower() if isinstance(value, str) else value
    if strategy not in STRATEGIES:
        raise ValueError(f"Expected {source} to be one of {list(STRATEGIES)} (any case), but got {value!r}")
    return strategy


STRATEGY = parse_strategy(os.environ.get("PAT_SELECTION_STRATEGY", "auto"))
# Entries scored at once by the radix select (at most 2**24). bench/gpu.py sweeps it.
DEVICE_CHUNK_SIZE = 1 << 23
# Samples drawn to bracket the threshold (at most: 1 in 64 entries for smaller selections), and entries scored per
# chunk by the host strategy (4 x 128k floats stay in a core's L2 cache).
SAMPLE_SIZE = 1 << 17
CHUNK_SIZE = 1 << 17
_MIN_SAMPLE = 1 << 12
_Z = 6.0  # the bracket's half-width in standard deviations of the sampled rank estimate


def uses_device_strategy(device: torch.device) -> bool:
    """Whether streamed selections on scores living on ``device`` skip the sampled bracket (see ``STRATEGY``):
    ``"auto"`` skips it for CUDA scores.

    Example:
        >>> import torch
        >>> uses_device_strategy(torch.device("cpu"))  # STRATEGY = "auto": the sampled bracket on a CPU
        False
    """
    strategy = parse_strategy(STRATEGY, "selection.STRATEGY (or PAT_SELECTION_STRATEGY)")
    if strategy != "auto":
        return strategy == "device"
    return device.type == "cuda"


def select_lowest(chunks: Sequence[Tensor], k: int, group: Any = None) -> list[Tensor]:
    """Bool masks (one per chunk, same shapes) marking exactly the ``k`` lowest entries over all chunks (and over all
    ranks of ``group``: each rank passes its local chunks, the same number of chunks in the same order, and ``k`` is
    the global count); ties in rank, chunk, then index order.

    Example:
        >>> import torch
        >>> select_lowest([torch.tensor([1.0, 1.0, 1.0, 0.0])], 2)[0].tolist()  # ties in index order
        [True, False, False, True]
    """
    layers = [ScoredLayer.of(chunk) for chunk in chunks]
    chosen = radix_select(layers, int(k), group, chunk_size=DEVICE_CHUNK_SIZE, check_finite=False, what="entries")
    return [mask.view(chunk.shape) for mask, chunk in zip(chosen, chunks, strict=True)]


def count_below(chunks: Sequence[Tensor], value: float, group: Any = None) -> int:
    """Number of entries ``< value`` over all chunks (and ranks).

    Example:
        >>> import torch
        >>> count_below([torch.tensor([1.0, 2.0]), torch.tensor([0.5])], 1.5)
        2
    """
    device = chunks[0].device if chunks else torch.device("cpu")
    total = torch.zeros(1, dtype=torch.int64, device=device)
    for chunk in chunks:
        total += (chunk < value).sum()  # on the chunks' device: one host read at the end
    return int(all_reduce(total, group))


def layer_total(layer: ScoredLayer, chunk_size: int | None = None) -> float:
    """Sum of a layer's scores over every entry (the global allocation's mean): float32 sums of ``CHUNK_SIZE``
    chunks added in float64 in order (exact to ~1e-7 per chunk, where one float32 sum of a large layer drifts),
    accumulated on the scores' device with one host read at the end instead of one per chunk.

    Example:
        >>> import torch
        >>> layer_total(ScoredLayer.of(torch.tensor([0.5, 1.5, 2.0])), chunk_size=2)
        4.0
    """
    size = chunk_size or CHUNK_SIZE
    total = torch.zeros((), dtype=torch.float64, device=layer.where)
    for start in range(0, layer.numel, size):
        total += layer.chunk(start, min(start + size, layer.numel)).sum()
    return float(total)


# ----------------------------------------------------------------------------------------------- streamed selection
def select_lowest_streamed(
    layers: Sequence[ScoredLayer],
    k: int,
    *,
    group: Any = None,
    seed: int = 0,
    sample_size: int | None = None,
    chunk_size: int | None = None,
) -> list[Tensor]:
    """Flat bool masks (one per layer) choosing exactly the ``k`` lowest ``score / scale`` among the kept entries of
    all layers (and of all ranks of ``group``: each rank passes its local shards of the same layers, ``k`` is the
    global count); ties at the threshold are taken in rank, layer, then index order (as :func:`select_lowest`).

    The scores are never held whole. Under the host strategy a seeded sample (gathered from every rank: a few
    hundred kB) brackets the k-th value, one streamed pass scores each chunk of ``chunk_size``, marks the entries
    below the bracket and keeps the few inside it, and the radix select among those settles the rest; transient
    memory is one chunk of scores plus the bracket's candidates (about 2% of the entries). Where the bracket missed,
    and under the device strategy (see :func:`uses_device_strategy`), the radix select runs over the layers (two or
    three passes, no host read inside a loop; ``sample_size`` unused). Raises :class:`NonFiniteScores` on every rank
    if a score is NaN or infinite.

    Example:
        >>> import torch
        >>> layers = [ScoredLayer.of(torch.tensor([0.5, -1.0, 3.0])), ScoredLayer.of(torch.tensor([2.0, 0.5, 0.1]))]
        >>> [m.tolist() for m in select_lowest_streamed(layers, 3)]  # -1.0, 0.1 and the first 0.5
        [[True, True, False], [False, False, True]]
    """
    k = int(k)
    device = layers[0].where if layers else torch.device("cpu")
    if uses_device_strategy(device):
        return radix_select(layers, k, group, chunk_size=chunk_size or DEVICE_CHUNK_SIZE)
    chosen = _bracketed(layers, k, group, seed, sample_size or SAMPLE_SIZE, chunk_size or CHUNK_SIZE)
    return chosen if chosen is not None else radix_select(layers, k, group, chunk_size=DEVICE_CHUNK_SIZE)


def select_lowest_kept(layers: Sequence[ScoredLayer], k: int, group: Any = None) -> list[Tensor]:
    """:func:`select_lowest_streamed` with its defaults (kept for callers of the time when a missed bracket fell
    back to whole score tensors here).

    Example:
        >>> import torch
        >>> layer = ScoredLayer.of(torch.tensor([0.3, 0.1, 0.2]), kept=torch.tensor([True, False, True]))
        >>> select_lowest_kept([layer], 1)[0].tolist()
        [False, False, True]
    """
    return select_lowest_streamed(layers, k, group=group)


def _bracketed(
    layers: Sequence[ScoredLayer], k: int, group: Any, seed: int, sample_size: int, chunk_size: int
) -> list[Tensor] | None:
    """The host strategy: the sampled bracket, one streamed pass, the radix select inside the bracket (``None`` on
    every rank where the bracket missed)."""
    device = layers[0].where if layers else torch.device("cpu")
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
            indices = torch.randint(layer.numel, (count,), generator=generator).to(layer.where)
            weight = layer.numel / count
            variance += layer.numel * weight / 4  # Var of the estimated count below a value <= n^2 / (4 m)
            values = layer.at(indices)
        bad[index] = int(not bool(torch.isfinite(values).all()))
        if layer.kept is not None:
            values = values[layer.kept[indices] if indices is not None else layer.kept]
        samples.append(values.cpu().double() / layer.scale)
        weights.append(torch.full((values.numel(),), weight, dtype=torch.float64))
    raise_if_bad(sum_over_ranks(bad, group, device))
    if not 0 <= k <= kept_total:
        raise ValueError(f"Expected 0 <= k <= {kept_total} kept entries, but got k={k}")
    chosen = [torch.zeros(layer.numel, dtype=torch.bool, device=layer.where) for layer in layers]
    (variance,) = sum_over_ranks([variance], group, device, torch.float64)
    margin = _Z * math.sqrt(variance) + 1.0
    low, high = _bracket(*_gathered(torch.cat(samples), torch.cat(weights), group, device), k, margin)
    cap = 4 * margin + 1024  # candidates beyond this (on a rank) mean the bracket was too wide
    below, in_band, band = 0, 0, []
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
            inside = scores <= hi
            if layer.kept is not None:
                kept = layer.kept[start:stop]
                marked.logical_and_(kept)
                inside.logical_and_(kept)
            inside.logical_xor_(marked)  # lo <= score <= hi, kept
            below += int(marked.count_nonzero())
            where = inside.nonzero().reshape(-1)
            values_kept.append(scores[where])
            indices_kept.append(where + start)
            in_band += where.numel()
            if in_band > cap:
                break
        values = torch.cat(values_kept) if values_kept else torch.empty(0, device=layer.where)
        where = torch.cat(indices_kept) if indices_kept else torch.empty(0, dtype=torch.int64, device=layer.where)
        band.append((ScoredLayer.of(values, scale=layer.scale), where))
    *bad, below, band_total, too_wide = sum_over_ranks([*bad, below, in_band, int(in_band > cap)], group, device)
    raise_if_bad(bad)
    needed = k - below
    if too_wide or not 0 <= needed <= band_total:
        return None
    taken = radix_select([layer for layer, _ in band], needed, group, check_finite=False)
    for mask, chosen_band, (_, where) in zip(chosen, taken, band, strict=True):
        mask[where[chosen_band]] = True
    return chosen


def _kept_count(layers: Sequence[ScoredLayer]) -> int:
    return sum(x.numel if x.kept is None else int(x.kept.count_nonzero()) for x in layers)


def _gathered(values: Tensor, weights: Tensor, group: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every rank's samples and their weights (padded to one length with ``inf`` of weight 0 for the gather)."""
    if group is None:
        return values, weights
    world = torch.distributed.get_world_size(group)
    size = max(per_rank(values.numel(), group, device))
    padded = torch.full((2, size), math.inf, dtype=torch.float64)
    padded[1] = 0.0
    padded[0, : values.numel()], padded[1, : values.numel()] = values, weights
    parts = [torch.empty_like(padded, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.to(device), group=group)
    both = torch.cat([part.cpu() for part in parts], dim=1)
    return both[0], both[1]


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
