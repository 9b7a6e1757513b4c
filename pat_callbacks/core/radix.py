"""The one exact k-lowest selection: a radix select on order-preserving 32-bit keys, in 16-bit histograms.

Every "k lowest" of the package comes here (whole score tensors, layers streamed a chunk at a time, the sampled
bracket's candidates, pattern blocks, one-shot blocks): one key function (:func:`signed_keys`), one algorithm
(:func:`radix_select`) and one tie rule: entries at the threshold are taken in rank, then layer, then flat-index
order, so the count is exact to the entry and every rank of a process group agrees on the threshold.

Pass 1 histograms the keys' top 16 bits (all-reduced over the ranks of ``group``, when one is given); pass 2, only
where some score is not a bf16 value, the low 16 bits inside the top bin holding the k-th key; the last pass writes
the masks. Each pass scores a layer a chunk at a time (:class:`ScoredLayer`), so no score tensor of a whole layer
is held, nothing is concatenated or gathered, and the host is read only after each histogram pass (never inside a
loop: on CUDA the passes queue without a synchronisation). Small selections in one process find the threshold key
by ``torch.kthvalue`` instead (``SMALL_SELECTION``), with the same keys, tie rule and mask pass.

Example:
    >>> import torch
    >>> layers = [ScoredLayer.of(torch.tensor([0.5, -1.0, 3.0])), ScoredLayer.of(torch.tensor([2.0, 0.5, 0.1]))]
    >>> [m.tolist() for m in radix_select(layers, 3)]  # -1.0, 0.1 and the first 0.5
    [[True, True, False], [False, False, True]]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NonFiniteScores", "ScoredLayer", "all_finite", "radix_select", "signed_keys", "sum_over_ranks"]

# Entries scored at once (at most 2**24, so a float32 histogram counts them exactly): larger chunks launch fewer
# kernels, smaller ones hold less (about 16 bytes per entry of a chunk). bench/gpu.py sweeps it.
DEFAULT_CHUNK_SIZE = 1 << 23
_MAX_CHUNK = 1 << 24
# Up to this many entries in one process, the threshold key is found by ``torch.kthvalue`` over the keys instead of
# the two 65536-bin histograms, whose fixed cost dominates small selections (SparseGPT blocks, structured blocks,
# the bracket's candidates). Measured on this CPU, 1 thread, randn, k = 70%: 64 entries 33 us vs 1.9 ms, 4096:
# 55 us vs 2.0 ms, 128k: 1.7 ms vs 3.1 ms, 512k: 7.5 vs 7.9 ms, 4M: 114 vs 73 ms. Same keys, same tie rule, same masks.
SMALL_SELECTION = 1 << 17
_BINS = 1 << 16
_OUTSIDE = -65536.0  # a digit below every histogram's range: entries that are not kept are not counted


@dataclass(frozen=True)
class ScoredLayer:
    """One layer as a source of scores for a selection: scores are computed on demand, a chunk (or a few sampled
    entries) at a time, so no score tensor of the whole layer is ever held.

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
        >>> radix_select([layer], 2)[0].tolist()
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
            None if kept is None else kept.reshape(-1),
            scale,
            flat.device,
        )

    @property
    def where(self) -> torch.device:
        """The device its scores and masks live on.

        Example:
            >>> import torch
            >>> ScoredLayer.of(torch.ones(2)).where.type
            'cpu'
        """
        if self.kept is not None:
            return self.kept.device
        return self.device if self.device is not None else torch.device("cpu")


class NonFiniteScores(ValueError):
    """Raised by the streamed selections when a layer's scores hold NaN or Inf (``layers``: their indices).

    Example:
        >>> import torch
        >>> layers = [ScoredLayer.of(torch.ones(2)), ScoredLayer.of(torch.tensor([1.0, float("nan")]))]
        >>> try:
        ...     radix_select(layers, 1)
        ... except NonFiniteScores as error:
        ...     error.layers
        [1]
    """

    def __init__(self, layers: list[int]) -> None:
        super().__init__(f"NaN or Inf in the scores of layers {layers}")
        self.layers = layers


def raise_if_bad(flags: list[int]) -> None:
    """Raise :class:`NonFiniteScores` naming the layers whose flag is set.

    Example:
        >>> raise_if_bad([0, 0])
    """
    bad = [index for index, flag in enumerate(flags) if flag]
    if bad:
        raise NonFiniteScores(bad)


# --------------------------------------------------------------------------------------------------- over ranks
def all_reduce(tensor: Tensor, group: Any) -> Tensor:
    """``tensor`` summed in place over the ranks of ``group`` (unchanged without one).

    Example:
        >>> import torch
        >>> all_reduce(torch.tensor([2]), None)
        tensor([2])
    """
    if group is not None:
        torch.distributed.all_reduce(tensor, group=group)
    return tensor


def sum_over_ranks(values: list[Any], group: Any, device: torch.device, dtype: torch.dtype = torch.int64) -> list[Any]:
    """Element-wise sums over the ranks of ``group`` (``values`` unchanged without one).

    Example:
        >>> import torch
        >>> sum_over_ranks([3, 4], None, torch.device("cpu"))
        [3, 4]
    """
    if group is None:
        return list(values)
    return all_reduce(torch.tensor(values, dtype=dtype, device=device), group).cpu().tolist()


def per_rank(value: int, group: Any, device: torch.device) -> list[int]:
    """Every rank's ``value``, in rank order.

    Example:
        >>> import torch
        >>> per_rank(5, None, torch.device("cpu"))
        [5]
    """
    if group is None:
        return [value]
    values = torch.zeros(torch.distributed.get_world_size(group), dtype=torch.int64, device=device)
    values[torch.distributed.get_rank(group)] = value
    return all_reduce(values, group).cpu().tolist()


def _tie_quota(mine: int, needed: int, group: Any, device: torch.device) -> int:
    """How many of this rank's ties at the threshold to take: ranks in order take what is still needed."""
    if group is None:
        return min(needed, mine)
    before = sum(per_rank(mine, group, device)[: torch.distributed.get_rank(group)])
    return max(0, min(mine, needed - before))


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: a sum first (a fast reduction; NaN and Inf propagate), the entry-wise check
    only when the sum is not finite (it may merely have overflowed).

    Example:
        >>> import torch
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("inf")]))
        (True, False)
    """
    return math.isfinite(float(tensor.detach().sum())) or bool(torch.isfinite(tensor).all())


# ---------------------------------------------------------------------------------------------------------- keys
def signed_keys(scores: Tensor) -> Tensor:
    """int32 keys whose *signed* order is the float order of float32 ``scores`` (NaN excluded): the bits of
    negatives flipped except the sign (``-0.0`` ranks just below ``0.0``). The one key of every selection.

    Example:
        >>> import torch
        >>> keys = signed_keys(torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0]))
        >>> keys.tolist() == sorted(keys.tolist())
        True
    """
    bits = scores.contiguous().view(torch.int32)
    keys = bits >> 31
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


def _halves(scores: Tensor) -> tuple[Tensor, Tensor]:
    """The float32 bits' (high, low) int16 halves."""
    halves = scores.contiguous().view(torch.int16).view(-1, 2)
    little = sys.byteorder == "little"
    return halves[:, 1 if little else 0], halves[:, 0 if little else 1]


def _high_keys(scores: Tensor) -> Tensor:
    """The top 16 bits of :func:`signed_keys` (int16, signed order), read from the float32 bits' upper halves."""
    high = _halves(scores)[0]
    keys = high >> 15
    keys &= 0x7FFF
    keys ^= high
    return keys


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
        scaled = scores / layer.scale if layer.scale != 1.0 else scores
        yield start, stop, scores, scaled, None if layer.kept is None else layer.kept[start:stop]


def _read(*tensors: Tensor) -> list[float]:
    """Small device tensors as one host list (one synchronisation)."""
    return torch.cat([t.reshape(-1).double() for t in tensors]).tolist()


# ----------------------------------------------------------------------------------------------------- selection
def radix_select(
    layers: Sequence[ScoredLayer],
    k: int,
    group: Any = None,
    *,
    chunk_size: int | None = None,
    check_finite: bool = True,
    what: str = "kept entries",
) -> list[Tensor]:
    """Flat bool masks (one per layer) choosing exactly the ``k`` lowest ``score / scale`` among the kept entries of
    all layers (and of all ranks of ``group``: each rank passes its local shards of the same layers, ``k`` is the
    global count); ties at the threshold in rank, layer, then index order.

    Pass 1 scores each chunk and adds the histogram of its keys' top 16 bits (kept entries only), a flag for a
    non-finite score (from the chunk's sum, confirmed exactly on the layer where raised; with ``check_finite``) and
    a flag for scores that are not bf16 values. One host read gives the top bin holding the k-th key. Pass 2, only
    where some score is not a bf16 value, histograms the low 16 bits inside that bin (a second read). The last pass
    writes each mask in place: keys below the threshold, then the ties at it. (Up to ``SMALL_SELECTION`` entries
    in one process, ``torch.kthvalue`` over the kept keys finds the threshold instead of the histograms: one host
    read, the same mask pass.) Transient memory is a few bytes per
    entry of one chunk of ``chunk_size`` entries (default ``DEFAULT_CHUNK_SIZE``, at most 2**24). Raises
    :class:`NonFiniteScores` on every rank if a score is NaN or infinite (with ``check_finite``), and
    ``ValueError`` naming ``k`` and the ``what`` there are when ``k`` is out of range.

    Example:
        >>> import torch
        >>> radix_select([ScoredLayer.of(torch.tensor([1.0, 1.0, 1.0, 0.0]))], 2)[0].tolist()  # ties in index order
        [True, False, False, True]
    """
    device = layers[0].where if layers else torch.device("cpu")
    size = max(1, min(chunk_size or DEFAULT_CHUNK_SIZE, _MAX_CHUNK))
    if group is None and sum(layer.numel for layer in layers) <= SMALL_SELECTION:
        threshold, quota, ties = _small_threshold(layers, k, check_finite, what, device)
        return _masks_at(layers, threshold, True, quota, ties, size)
    high_hist = torch.zeros(_BINS, dtype=torch.int64, device=device)  # integer sums: exact, deterministic
    sums_bad = torch.zeros(len(layers), dtype=torch.bool, device=device)
    low_bits = torch.zeros(1, dtype=torch.bool, device=device)
    for index, layer in enumerate(layers):
        for _, _, raw, scores, kept in _chunks(layer, size):
            if check_finite:
                sums_bad[index : index + 1].logical_or_(~torch.isfinite(raw.sum()))
            low_bits.logical_or_(_halves(scores)[1].any())
            high_hist += _histogram(_high_keys(scores), kept, -(_BINS // 2)).long()
    local_high = high_hist.clone() if group is not None else high_hist
    summary = all_reduce(torch.cat([high_hist, sums_bad.long(), low_bits.long()]), group)
    high_hist = summary[:_BINS]
    cumulative = high_hist.cumsum(0)
    top = torch.searchsorted(cumulative, torch.tensor([k], dtype=torch.int64, device=device)).clamp_(max=_BINS - 1)
    below = (cumulative - high_hist)[top]
    *flags, any_low_bits, kept_total, top_bin, below_top = _read(summary[_BINS:], cumulative[-1:], top, below)
    if check_finite:
        raise_if_bad(_confirmed_non_finite(layers, [i for i, f in enumerate(flags) if f], size, group, device))
    if not 0 <= k <= int(kept_total):
        raise ValueError(f"Expected 0 <= k <= {int(kept_total)} {what}, but got k={k}")
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
        low_hist = all_reduce(low_hist, group)
        cumulative = low_hist.cumsum(0)
        low = torch.searchsorted(cumulative, torch.tensor([remaining], device=device, dtype=torch.int64))
        low = low.clamp_(max=_BINS - 1)
        low_bin, below_low, local_ties = _read(low, (cumulative - low_hist)[low], local_low[low])
        remaining -= int(below_low)
        threshold, full = top_key * _BINS + int(low_bin), True
    else:  # every score is a bf16 value: keys in the top bin are all equal
        (local_ties,) = _read(local_high[top])
        threshold, full = top_key, False
    quota = _tie_quota(int(local_ties), remaining, group, device)
    return _masks_at(layers, threshold, full, quota, int(local_ties), size)


def _small_threshold(
    layers: Sequence[ScoredLayer], k: int, check_finite: bool, what: str, device: torch.device
) -> tuple[int, int, int]:
    """``(threshold key, ties to take, ties)`` of a small selection in one process, by ``torch.kthvalue``."""
    keys, bad = [], []
    for layer in layers:
        raw = layer.chunk(0, layer.numel).reshape(-1).to(torch.float32)
        bad.append(int(check_finite and not all_finite(raw)))
        key = signed_keys(raw / layer.scale if layer.scale != 1.0 else raw)
        keys.append(key if layer.kept is None else key[layer.kept])
    raise_if_bad(bad)
    kept = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int32, device=device)
    if not 0 <= k <= kept.numel():
        raise ValueError(f"Expected 0 <= k <= {kept.numel()} {what}, but got k={k}")
    if k == 0:
        return torch.iinfo(torch.int32).min, 0, 0
    threshold = torch.kthvalue(kept, k).values
    threshold, below, ties = (int(v) for v in _read(threshold, (kept < threshold).sum(), (kept == threshold).sum()))
    return threshold, k - below, ties


def _masks_at(
    layers: Sequence[ScoredLayer], threshold: int, full: bool, quota: int, ties: int, size: int
) -> list[Tensor]:
    """Masks of the kept keys below ``threshold`` (full 32-bit keys, or their top 16 bits), plus the first
    ``quota`` of this rank's ``ties`` kept keys equal to it, in layer then index order; written in place."""
    chosen = [torch.zeros(layer.numel, dtype=torch.bool, device=layer.where) for layer in layers]
    device = layers[0].where if layers else torch.device("cpu")
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
