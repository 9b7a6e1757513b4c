"""Mask shapes: turn scores and a per-layer sparsity into a boolean keep-mask.

Example:
    >>> import torch
    >>> unstructured_mask(torch.tensor([0.1, 0.9, 0.5, 0.3]), sparsity=0.5)
    tensor([False,  True,  True, False])
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from pat_callbacks.core.radix import signed_keys
from pat_callbacks.core.selection import select_lowest

__all__ = [
    "PATTERNS",
    "BlockPattern",
    "NMPattern",
    "Pattern",
    "UnstructuredPattern",
    "block_mask",
    "lowest_k",
    "make_pattern",
    "nm_mask",
    "parse_block",
    "parse_nm",
    "prune_count",
    "unstructured_mask",
]


def prune_count(numel: int, sparsity: float) -> int:
    """Number of entries to prune so that ``numel`` entries reach ``sparsity`` (nearest integer).

    Example:
        >>> prune_count(125, 0.9), prune_count(10, 0.7)
        (112, 7)
    """
    return min(numel, max(0, round(numel * sparsity)))


def unstructured_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (``True`` = kept) that prunes the ``prune_count`` lowest-scoring entries of ``scores``.

    Exact count, ties in index order, never a full sort (see :func:`lowest_k`).

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
    """Bool mask of exactly ``k`` lowest entries of the 1-D ``values``, ties in index order: the package's one
    exact selection (:func:`~pat_callbacks.core.selection.select_lowest`), never a full sort.

    Example:
        >>> import torch
        >>> lowest_k(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2).tolist()
        [False, True, False, True]
        >>> lowest_k(torch.tensor([1.0, 0.0, 1.0, 1.0]), 3).tolist()  # the tied 1.0s in index order
        [True, True, True, False]
    """
    return select_lowest([values.detach().reshape(-1)], k)[0]


def parse_nm(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """``"N:M"`` (keep N of every M consecutive weights, NVIDIA's 2:4 convention) as ``(N, M)``; the literal
    ``"N:M"`` means the default, 2:4.

    ``"M:N"`` written the other way round (``"4:2"``) is refused with a pointer to the convention.

    Example:
        >>> parse_nm("2:4"), parse_nm((1, 4)), parse_nm("N:M")
        ((2, 4), (1, 4), (2, 4))
        >>> parse_nm("4:2")
        Traceback (most recent call last):
        ...
        ValueError: Expected `pattern` 'N:M' with 0 < N < M (keep N of every M weights, e.g. '2:4'), but got '4:2'; \
did you mean '2:4'?
    """
    if isinstance(pattern, str) and pattern.strip().upper() == "N:M":
        return 2, 4
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        n, m = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = int(pattern[0]), int(pattern[1])
    else:
        n, m = 0, 0
    if not 0 < n < m:
        hint = f"; did you mean '{m}:{n}'?" if 0 < m < n else ""
        raise ValueError(
            "Expected `pattern` 'N:M' with 0 < N < M (keep N of every M weights, e.g. '2:4'), "
            f"but got {pattern!r}{hint}"
        )
    return n, m


def nm_mask(scores: Tensor, n: int, m: int, pruned_per_group: int | None = None) -> Tensor:
    """Keep-mask with the ``m - pruned_per_group`` highest scores of every group of ``m`` consecutive entries
    along each output row (default: keep exactly ``n`` of every ``m``); ties pruned in index order, as every
    selection: entries rank by :func:`~pat_callbacks.core.radix.signed_keys`, then position in the group (a
    per-group count does not batch into one selection; see :func:`_group_ranks`).

    Rows are the first dimension; the remaining dimensions are flattened (for a conv, in-channels x kernel), and
    their size must be a multiple of ``m``.

    Example:
        >>> import torch
        >>> nm_mask(torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]]), 2, 4).int().tolist()
        [[0, 1, 1, 0, 1, 1, 0, 0]]
    """
    rows = scores.detach().reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(
            f"An N:M pattern with M={m} needs each row's size to be a multiple of {m}, but a tensor of shape "
            f"{tuple(scores.shape)} has rows of {rows.shape[1]}"
        )
    pruned = m - n if pruned_per_group is None else pruned_per_group
    groups = rows.reshape(rows.shape[0], -1, m)
    if pruned <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return (_group_ranks(signed_keys(groups.to(torch.float32))) >= pruned).reshape(scores.shape)


# Groups up to this size rank by pairwise comparisons (m passes), larger ones by a stable sort: measured on this CPU
# (1 thread, 2048 x 2048 randn, keep m / 2): m = 4: 40 ms vs 83 ms (topk, whose tie order is unspecified: 55 ms);
# m = 8: 75 vs 92 ms; m = 16: 120 vs 108 ms; m = 32: 189 vs 124 ms. Both give the same ranks.
_PAIRWISE_GROUPS = 8


def _group_ranks(keys: Tensor) -> Tensor:
    """Each entry's rank within its group (the last dimension): how many entries of the group have a lower key, or
    the same key at a lower position.

    Example:
        >>> import torch
        >>> _group_ranks(torch.tensor([[5, 1, 5, 0]])).tolist()
        [[2, 1, 3, 0]]
    """
    m = keys.shape[-1]
    if m > _PAIRWISE_GROUPS:
        ranks = torch.empty_like(keys, dtype=torch.int64)
        order = torch.sort(keys, dim=-1, stable=True).indices
        return ranks.scatter_(-1, order, torch.arange(m, device=keys.device).expand_as(order))
    ranks = torch.zeros_like(keys, dtype=torch.uint8)
    for j in range(m):
        other = keys[..., j : j + 1]
        below = other < keys
        below[..., j + 1 :] |= other == keys[..., j + 1 :]  # a tie at a lower position ranks below
        ranks += below
    return ranks


def parse_block(pattern: str) -> tuple[int, int]:
    """``"block:RxC"`` as ``(R, C)``: prune whole R x C blocks of each weight (rows x flattened inputs).

    Example:
        >>> parse_block("block:4x8")
        (4, 8)
    """
    match = re.fullmatch(r"block:(\d+)x(\d+)", pattern.strip()) if isinstance(pattern, str) else None
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"Expected `pattern` 'block:RxC' with R, C >= 1 (e.g. 'block:4x4'), but got {pattern!r}")
    return int(match.group(1)), int(match.group(2))


def block_mask(scores: Tensor, sparsity: float, block: tuple[int, int]) -> Tensor:
    """Keep-mask pruning the lowest-scoring ``R x C`` blocks (block score: sum of its entries' scores) until
    ``sparsity`` is reached to the nearest block. The weight is viewed as rows x flattened inputs; both sizes must
    be multiples of the block.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
        >>> block_mask(scores, 0.5, (2, 2)).int().tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    r, c = block
    rows = scores.detach().reshape(scores.shape[0], -1)
    if rows.shape[0] % r or rows.shape[1] % c:
        raise ValueError(
            f"A block pattern of {r}x{c} needs a weight whose rows x inputs ({rows.shape[0]}x{rows.shape[1]}, "
            f"from shape {tuple(scores.shape)}) divide into whole blocks"
        )
    blocks = rows.reshape(rows.shape[0] // r, r, rows.shape[1] // c, c).sum(dim=(1, 3))
    pruned = lowest_k(blocks.reshape(-1), prune_count(blocks.numel(), sparsity)).reshape(blocks.shape)
    keep = (~pruned).repeat_interleave(r, 0).repeat_interleave(c, 1)
    return keep.reshape(scores.shape)


class Pattern(ABC):
    """The shape of a layer's mask: turns scores and a sparsity into a keep-mask.

    Attributes:
        fixed_sparsity: the sparsity the pattern imposes on every layer (N:M), or ``None``.
        allows_regrowth: whether single entries may be swapped in and out (pruning reversal) without breaking it.

    Example:
        >>> import torch
        >>> make_pattern("2:4").mask(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 0.5).tolist()
        [[False, True, True, False]]
    """

    name: ClassVar[str] = ""
    fixed_sparsity: float | None = None
    allows_regrowth: ClassVar[bool] = True

    @abstractmethod
    def mask(self, scores: Tensor, sparsity: float) -> Tensor:
        """Keep-mask with ``scores``' shape pruning ``sparsity`` of it (``True`` = kept)."""

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming ``name`` if a parameter of ``shape`` cannot take this pattern (any shape can,
        unless a subclass says otherwise)."""
        del name, shape

    def __repr__(self) -> str:
        return repr(self.name)


class UnstructuredPattern(Pattern):
    """Any entries: the lowest-scoring ones, exact count (:func:`unstructured_mask`).

    Example:
        >>> import torch
        >>> UnstructuredPattern().mask(torch.tensor([0.3, 0.1, 0.2]), 0.34).tolist()
        [True, False, True]
    """

    name: ClassVar[str] = "unstructured"

    def mask(self, scores: Tensor, sparsity: float) -> Tensor:
        return unstructured_mask(scores, sparsity)


class NMPattern(Pattern):
    """Keep ``n`` of every ``m`` consecutive weights of each output row (:func:`nm_mask`); intermediate targets
    of a schedule round down to whole weights per group.

    Example:
        >>> NMPattern(2, 4).fixed_sparsity, NMPattern(2, 4).check("w", (3, 6))
        Traceback (most recent call last):
        ...
        ValueError: pattern '2:4' needs rows whose size is a multiple of 4, but 'w' has shape (3, 6); exclude it \
(exclude=['w'])
    """

    allows_regrowth: ClassVar[bool] = False

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = parse_nm((n, m))
        self.name = f"{self.n}:{self.m}"  # type: ignore[misc]
        self.fixed_sparsity = 1 - self.n / self.m

    def mask(self, scores: Tensor, sparsity: float) -> Tensor:
        return nm_mask(scores, self.n, self.m, pruned_per_group=min(self.m - self.n, int(sparsity * self.m + 1e-9)))

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2 or math.prod(shape[1:]) % self.m:
            raise ValueError(
                f"pattern '{self.name}' needs rows whose size is a multiple of {self.m}, but {name!r} has shape "
                f"{tuple(shape)}; exclude it (exclude=[{name!r}])"
            )


class BlockPattern(Pattern):
    """Whole ``r x c`` blocks of rows x flattened inputs (:func:`block_mask`).

    Example:
        >>> import torch
        >>> BlockPattern(1, 2).mask(torch.tensor([[1.0, 1.0, 5.0, 5.0]]), 0.5).tolist()
        [[False, False, True, True]]
    """

    allows_regrowth: ClassVar[bool] = False  # single regrown entries would leave blocks partly masked

    def __init__(self, r: int, c: int) -> None:
        self.block = (r, c)
        self.name = f"block:{r}x{c}"  # type: ignore[misc]

    def mask(self, scores: Tensor, sparsity: float) -> Tensor:
        return block_mask(scores, sparsity, self.block)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        r, c = self.block
        if len(shape) < 2 or shape[0] % r or math.prod(shape[1:]) % c:
            raise ValueError(
                f"pattern '{self.name}' needs rows x inputs divisible into blocks, but {name!r} has shape "
                f"{tuple(shape)}; exclude it (exclude=[{name!r}])"
            )


PATTERNS = ("unstructured", "N:M (e.g. '2:4')", "block:RxC (e.g. 'block:4x4')")


def make_pattern(pattern: str | Pattern) -> Pattern:
    """A :class:`Pattern` from its config name: ``"unstructured"``, ``"N:M"`` or ``"block:RxC"``.

    Example:
        >>> make_pattern("block:2x2"), make_pattern("N:M")
        ('block:2x2', '2:4')
        >>> make_pattern("Unstructured")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `pattern` 'Unstructured'; expected one of: unstructured, N:M (e.g. '2:4'), \
block:RxC (e.g. 'block:4x4')
    """
    if isinstance(pattern, Pattern):
        return pattern
    if pattern == "unstructured":
        return UnstructuredPattern()
    if isinstance(pattern, str) and pattern.startswith("block:"):
        return BlockPattern(*parse_block(pattern))
    if isinstance(pattern, str) and ":" in pattern:
        return NMPattern(*parse_nm(pattern))
    raise ValueError(f"Unknown `pattern` {pattern!r}; expected one of: {', '.join(PATTERNS)}")
