"""Exact k-lowest selection over many tensors and many ranks, without concatenating or gathering them.

A radix select on order-preserving 32-bit keys: four passes of 8-bit histograms (all-reduced across the ranks of a
process group, when one is given) find the exact k-th key; entries below it are selected, and ties at it are taken
in a fixed order (rank, then tensor, then flat index), so the count is exact to the entry and every rank agrees on
the threshold. Transient memory is one int32 key tensor of the largest chunk (computed chunk by chunk, pass by
pass); nothing is concatenated, so a global threshold over a billion weights needs no copy of all the scores, and
no rank ever holds another rank's shard.

Two strategies run these selections, with the same results (counts, ties): the *host* one above, built for a CPU
(128k-entry chunks, a sampled bracket, a few host reads per chunk), and the *device* one (:data:`STRATEGY`,
:func:`uses_device_strategy`), for CUDA scores: 16-bit histograms of the keys over chunks of up to 8M entries
(``torch.histc``; no ``topk``/``kthvalue``/``sort`` over a layer), a host read only after each histogram pass, masks
written in place. ``auto`` (the default) picks by the scores' device; tests force ``"device"`` on a CPU.

Example:
    >>> import torch
    >>> chunks = [torch.tensor([0.5, -1.0, 3.0]), torch.tensor([2.0, 0.5, 0.1])]
    >>> [m.tolist() for m in select_lowest(chunks, 3)]  # -1.0, 0.1 and the first 0.5
    [[True, True, False], [False, False, True]]
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NonFiniteScores",
    "ScoredLayer",
    "all_finite",
    "count_below",
    "layer_total",
    "ordered_keys",
    "select_lowest",
    "select_lowest_kept",
    "select_lowest_streamed",
    "signed_keys",
    "sum_over_ranks",
    "uses_device_strategy",
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
    if uses_device_strategy(device):
        layers = [ScoredLayer.of(chunk) for chunk in chunks]
        chosen = _select_on_device(layers, int(k), group, check_finite=False, what="entries")
        return [mask.view(chunk.shape) for mask, chunk in zip(chosen, chunks, strict=True)]
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
    total = torch.zeros(1, dtype=torch.int64, device=device)
    for chunk in chunks:
        total += (chunk < value).sum()  # on the chunks' device: one host read at the end
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
    on whole tensors), and raises :class:`NonFiniteScores` on every rank if a score is NaN or infinite. Scores on a
    CUDA device take the device strategy instead (see :func:`uses_device_strategy`): two or three passes over the
    scores, no host read inside a loop, never ``None``; ``sample_size`` is then unused.

    Example:
        >>> import torch
        >>> layers = [ScoredLayer.of(torch.tensor([0.5, -1.0, 3.0])), ScoredLayer.of(torch.tensor([2.0, 0.5, 0.1]))]
        >>> [m.tolist() for m in select_lowest_streamed(layers, 3)]  # -1.0, 0.1 and the first 0.5
        [[True, True, False], [False, False, True]]
    """
    k = int(k)
    device = _device(layers[0]) if layers else torch.device("cpu")
    if uses_device_strategy(device):
        return _select_on_device(layers, k, group, chunk_size=chunk_size)
    sample_size, chunk_size = sample_size or SAMPLE_SIZE, chunk_size or CHUNK_SIZE
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
    total = torch.zeros((), dtype=torch.float64, device=_device(layer))
    for start in range(0, layer.numel, size):
        total += layer.chunk(start, min(start + size, layer.numel)).sum()
    return float(total)


# ------------------------------------------------------------------------------------------------ device strategy
# How selections run: "host" (the sampled bracket and chunked passes above, built for a CPU: small chunks, a few
# host reads per chunk), "device" (the histogram radix select below: large chunks, no host read inside a loop) or
# "auto" (the device strategy for CUDA scores, the host one elsewhere). Tests force "device" on a CPU.
# PAT_SELECTION_STRATEGY sets it for a whole run, launched ranks included.
STRATEGIES = ("auto", "host", "device")
STRATEGY = os.environ.get("PAT_SELECTION_STRATEGY", "auto")
# Entries scored at once by the device strategy (at most 2**24, so a float32 histogram counts them exactly): larger
# chunks launch fewer kernels, smaller ones hold less (about 16 bytes per entry of a chunk). bench/gpu.py sweeps it.
DEVICE_CHUNK_SIZE = 1 << 23
_MAX_DEVICE_CHUNK = 1 << 24
_BINS = 1 << 16
_OUTSIDE = -65536.0  # a digit below every histogram's range: entries that are not kept are not counted


def uses_device_strategy(device: torch.device) -> bool:
    """Whether selections on scores living on ``device`` take the device strategy (see ``STRATEGY``): ``"auto"``
    takes it for CUDA scores. (Its histograms are exact either way: ``torch.histc``, or ``torch.bincount`` where
    deterministic algorithms are enforced.)

    Example:
        >>> import torch
        >>> uses_device_strategy(torch.device("cpu"))  # STRATEGY = "auto": the host strategy on a CPU
        False
    """
    if STRATEGY not in STRATEGIES:
        raise ValueError(
            f"Expected selection.STRATEGY (or PAT_SELECTION_STRATEGY) to be one of {list(STRATEGIES)}, but got "
            f"{STRATEGY!r}"
        )
    if STRATEGY != "auto":
        return STRATEGY == "device"
    return device.type == "cuda"


def signed_keys(scores: Tensor) -> Tensor:
    """int32 keys whose *signed* order is the float order of float32 ``scores`` (bits of negatives flipped except
    the sign): the same order as :func:`ordered_keys`, ``signed_keys(x) == ordered_keys(x) ^ 0x80000000``.

    Example:
        >>> import torch
        >>> values = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
        >>> keys = signed_keys(values)
        >>> keys.tolist() == sorted(keys.tolist()), torch.equal(keys, ordered_keys(values) ^ _SIGN)
        (True, True)
    """
    bits = scores.contiguous().view(torch.int32)
    keys = bits >> 31
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


def _high_keys(scores: Tensor) -> Tensor:
    """The top 16 bits of :func:`signed_keys` (int16, signed order), read from the float32 bits' upper halves."""
    halves = scores.contiguous().view(torch.int16).view(-1, 2)
    high = halves[:, 1 if sys.byteorder == "little" else 0]
    keys = high >> 15
    keys &= 0x7FFF
    keys ^= high
    return keys


def _low_bits_set(scores: Tensor) -> Tensor:
    """Whether any float32 score has a non-zero lower half (``False``: every score is a bf16 value exactly)."""
    halves = scores.contiguous().view(torch.int16).view(-1, 2)
    return halves[:, 0 if sys.byteorder == "little" else 1].any()


def _histogram(digits: Tensor, valid: Tensor | None, low: float) -> Tensor:
    """Counts of the integer ``digits`` in ``[low, low + 65536)`` where ``valid`` (float32; exact: at most 2**24
    entries). ``torch.histc`` skips entries outside the range, so invalid ones are moved below it. Under
    ``torch.use_deterministic_algorithms(True)`` (which refuses ``histc`` on CUDA) ``torch.bincount`` counts instead,
    at the price of one host read per call on CUDA."""
    if torch.are_deterministic_algorithms_enabled():
        shifted = digits.to(torch.int64) - int(low)
        if valid is not None:
            shifted = shifted.masked_fill_(~valid, _BINS)  # an extra last bin, dropped
        return torch.bincount(shifted, minlength=_BINS + 1)[:_BINS].to(torch.float32)
    values = digits.to(torch.float32)
    if valid is not None:
        values = values.masked_fill_(~valid, _OUTSIDE + low)
    return torch.histc(values, bins=_BINS, min=low, max=low + _BINS)


def _chunks(layer: ScoredLayer, size: int) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor | None]]:
    """``(start, stop, scores, scores / scale, kept)`` over a layer, ``size`` entries at a time (flat)."""
    for start in range(0, layer.numel, size):
        stop = min(start + size, layer.numel)
        scores = layer.chunk(start, stop).reshape(-1).to(torch.float32)
        scaled = scores / layer.scale if layer.scale != 1.0 else scores  # as the host strategy normalises
        yield start, stop, scores, scaled, None if layer.kept is None else layer.kept[start:stop]


def _read(*tensors: Tensor) -> list[float]:
    """Small device tensors as one host list (one synchronisation)."""
    return torch.cat([t.reshape(-1).double() for t in tensors]).tolist()


def _select_on_device(
    layers: Sequence[ScoredLayer],
    k: int,
    group: Any,
    *,
    chunk_size: int | None = None,
    check_finite: bool = True,
    what: str = "kept entries",
) -> list[Tensor]:
    """The device strategy of :func:`select_lowest_streamed` (and of :func:`select_lowest`): an exact radix select
    on :func:`signed_keys` of ``score / scale`` in two 16-bit digits, with no host read inside a loop.

    Pass 1 scores each chunk and adds the histogram of its keys' top 16 bits (kept entries only), a flag for a
    non-finite score (from the chunk's sum, confirmed exactly on the layer where raised) and a flag for scores that
    are not bf16 values. One host read gives the top bin holding the k-th key. Pass 2, only where some score is not
    a bf16 value, histograms the low 16 bits inside that bin (a second read). The last pass writes each mask in
    place: keys below the threshold, then the ties at it in rank, layer and index order. Transient memory is a few
    bytes per entry of one chunk; the result equals the host strategy's exactly (same count, same ties).
    """
    device = _device(layers[0]) if layers else torch.device("cpu")
    size = max(1, min(chunk_size or DEVICE_CHUNK_SIZE, _MAX_DEVICE_CHUNK))
    high_hist = torch.zeros(_BINS, dtype=torch.int64, device=device)  # integer sums: exact, deterministic
    sums_bad = torch.zeros(len(layers), dtype=torch.bool, device=device)
    low_bits = torch.zeros(1, dtype=torch.bool, device=device)
    for index, layer in enumerate(layers):
        for _, _, raw, scores, kept in _chunks(layer, size):
            if check_finite:
                sums_bad[index : index + 1].logical_or_(~torch.isfinite(raw.sum()))
            low_bits.logical_or_(_low_bits_set(scores))
            high_hist += _histogram(_high_keys(scores), kept, -(_BINS // 2)).long()
    local_high = high_hist.clone() if group is not None else high_hist
    summary = _all_reduce(torch.cat([high_hist, sums_bad.long(), low_bits.long()]), group)
    high_hist = summary[:_BINS]
    cumulative = high_hist.cumsum(0)
    k_tensor = torch.tensor([k], dtype=torch.int64, device=device)
    top = torch.searchsorted(cumulative, k_tensor).clamp_(max=_BINS - 1)
    below = (cumulative - high_hist)[top]
    *flags, any_low_bits, kept_total, top_bin, below_top = _read(summary[_BINS:], cumulative[-1:], top, below)
    if check_finite:
        _raise_if_bad(_confirmed_non_finite(layers, [i for i, f in enumerate(flags) if f], size, group, device))
    kept_total = int(kept_total)
    if not 0 <= k <= kept_total:
        raise ValueError(f"Expected 0 <= k <= {kept_total} {what}, but got k={k}")
    top_bin, remaining = int(top_bin), k - int(below_top)
    top_key = top_bin - _BINS // 2  # the k-th key's top 16 bits, signed
    if any_low_bits:  # pass 2: the low 16 bits of the keys in the top bin
        low_hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
        for layer in layers:
            for _, _, _, scores, kept in _chunks(layer, size):
                keys = signed_keys(scores)
                inside = (keys >> 16) == top_key
                if kept is not None:
                    inside &= kept
                keys &= 0xFFFF
                low_hist += _histogram(keys, inside, 0.0).long()
        local_low = low_hist.clone() if group is not None else low_hist
        low_hist = _all_reduce(low_hist, group)
        cumulative = low_hist.cumsum(0)
        low = torch.searchsorted(cumulative, torch.tensor([remaining], device=device, dtype=torch.int64))
        low = low.clamp_(max=_BINS - 1)
        low_bin, below_low, local_ties = _read(low, (cumulative - low_hist)[low], local_low[low])
        low_bin = int(low_bin)
        remaining -= int(below_low)
        threshold, full = top_key * _BINS + low_bin, True
    else:  # every score is a bf16 value: keys in the top bin are all equal
        (local_ties,) = _read(local_high[top])
        threshold, full = top_key, False
    quota = _tie_quota([int(local_ties)], remaining, group, device)
    return _masks_at(layers, threshold, full, quota, int(local_ties), size)


def _masks_at(
    layers: Sequence[ScoredLayer], threshold: int, full: bool, quota: int, ties: int, size: int
) -> list[Tensor]:
    """Masks of the kept keys below ``threshold`` (full 32-bit keys, or their top 16 bits), plus the first
    ``quota`` of this rank's ``ties`` kept keys equal to it, in layer then index order; written in place."""
    chosen = [torch.zeros(layer.numel, dtype=torch.bool, device=_device(layer)) for layer in layers]
    device = _device(layers[0]) if layers else torch.device("cpu")
    taken = torch.zeros((), dtype=torch.int64, device=device)
    for layer, mask in zip(layers, chosen, strict=True):
        for start, stop, _, scores, kept in _chunks(layer, size):
            keys = signed_keys(scores) if full else _high_keys(scores)
            out = mask[start:stop]
            if quota == 0:
                torch.lt(keys, threshold, out=out)
            elif quota == ties:
                torch.le(keys, threshold, out=out)
            else:  # some ties only: a running count on the device
                torch.lt(keys, threshold, out=out)
                tie = keys == threshold
                if kept is not None:
                    tie &= kept
                limit = (quota - taken).clamp(0, torch.iinfo(torch.int32).max).to(torch.int32)
                taken += tie.sum()
                tie &= tie.cumsum(0, dtype=torch.int32) <= limit
                out |= tie
            if kept is not None:
                out &= kept
    return chosen


def _confirmed_non_finite(
    layers: Sequence[ScoredLayer], flagged: list[int], size: int, group: Any, device: torch.device
) -> list[int]:
    """Per layer, 1 where a score is NaN or infinite (checked exactly on the layers whose sums were not finite)."""
    bad = [0] * len(layers)
    for index in flagged:
        bad[index] = int(not all(all_finite(raw) for _, _, raw, _, _ in _chunks(layers[index], size)))
    return sum_over_ranks(bad, group, device) if flagged else bad
