"""Drop-and-regrow for dynamic sparse training (pure functions; the callback wires them to Lightning).

Every update, a fraction ``f(t)`` of a layer's active weights with the lowest magnitude is dropped and as many
inactive weights are regrown, so each layer's sparsity is unchanged while its connectivity moves:

- ``rigl`` (Evci et al. 2020): regrow the inactive entries with the largest dense-gradient magnitude;
- ``set`` (Mocanu et al. 2018): regrow inactive entries uniformly at random.

Regrowth picks only among entries inactive *before* this update (a weight just dropped is not regrown at once).

Example:
    >>> import torch
    >>> mask = torch.tensor([True, True, False, False])
    >>> weight = torch.tensor([0.9, 0.1, 0.0, 0.0])
    >>> grad = torch.tensor([0.0, 0.0, 0.2, 0.7])
    >>> drop_and_grow(mask, weight, grad, fraction=0.5, regrowth="rigl").tolist()
    [True, False, False, True]

``regrowth`` names the grow rule everywhere (``Pruner.regrow``, :func:`drop_and_grow`, :func:`swapped_entries`,
:func:`regrow_in_place`); ``method`` is its former name there (deprecated: ``method`` means a one-shot algorithm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pat_callbacks.core._validation import check_choice, renamed
from pat_callbacks.core.radix import signed_keys
from pat_callbacks.core.selection import ScoredLayer, select_lowest_kept, sum_over_ranks
from pat_callbacks.core.sharding import local

if TYPE_CHECKING:
    from pat_callbacks.core.masks import MaskStore

__all__ = ["DECAYS", "GROWTH_METHODS", "drop_and_grow", "regrow_in_place", "swapped_entries", "update_fraction"]

DECAYS = ("cosine", "linear", "constant")
GROWTH_METHODS = ("rigl", "set")


def update_fraction(step: int, drop_fraction: float, end_step: int, decay: str = "cosine") -> float:
    """Fraction of active weights to drop at ``step``; 0 from ``end_step`` on.

    ``cosine``: ``drop_fraction / 2 * (1 + cos(pi * step / end_step))`` (RigL); ``linear``: decays to 0 at
    ``end_step``; ``constant``: ``drop_fraction`` until ``end_step``.

    Example:
        >>> [round(update_fraction(t, 0.3, 100), 4) for t in (0, 50, 100, 150)]
        [0.3, 0.15, 0.0, 0.0]
    """
    check_choice("decay", decay, DECAYS)
    if step >= end_step:
        return 0.0
    progress = step / end_step
    if decay == "cosine":
        return drop_fraction / 2 * (1 + math.cos(math.pi * progress))
    if decay == "linear":
        return drop_fraction * (1 - progress)
    return drop_fraction


def drop_and_grow(
    mask: Tensor,
    weight: Tensor,
    grad: Tensor | None,
    fraction: float,
    regrowth: str = "rigl",
    generator: torch.Generator | None = None,
    *,
    method: str | None = None,
) -> Tensor:
    """New mask: drop ``round(fraction * active)`` lowest-|w| active entries, regrow as many inactive ones.

    The count regrown equals the count dropped (capped by the entries inactive before the update), so the
    number of active entries is unchanged. (``mask ^ swapped_entries(...)``.) ``method``: the former name of
    ``regrowth`` (deprecated).

    Example:
        >>> import torch
        >>> mask = torch.tensor([True, True, False, False])
        >>> new = drop_and_grow(mask, torch.tensor([0.9, 0.1, 0.0, 0.0]), None, 0.5, "set",
        ...                     torch.Generator().manual_seed(0))
        >>> int(new.sum()), bool(new[0]), bool(new[1])
        (2, True, False)
    """
    regrowth, _ = renamed("method", method, "regrowth", regrowth, "rigl")
    return mask ^ swapped_entries(mask, weight, grad, fraction, regrowth, generator)


def swapped_entries(
    mask: Tensor,
    weight: Tensor,
    grad: Tensor | None,
    fraction: float,
    regrowth: str = "rigl",
    generator: torch.Generator | None = None,
    *,
    group: Any = None,
    method: str | None = None,
) -> Tensor:
    """The entries a drop-and-grow flips (``mask`` 's shape): the dropped active ones and the regrown inactive
    ones, as many of each; ``mask ^= swapped`` applies them in place. ``method``: the former name of ``regrowth``
    (deprecated).

    One selection per layer: the drop key (``|w|`` of active entries) and the grow key (``-|g|``, or uniform noise
    for ``set``, of inactive ones) go in one int64 key per entry, the smaller group's band first, its index last
    (ties go to the lower index), and one partial sort of the lowest ``min(active, inactive) + n`` keys yields both
    sets (:func:`_one_selection`). With ``group`` (``mask``, ``weight`` and ``grad`` this rank's shards, counts over
    every rank's) and in layers of ``2**29`` entries or more, the two sets are two streamed selections
    (:func:`~pat_callbacks.core.selection.select_lowest_kept`) instead, scored chunk by chunk; the same entries.

    Example:
        >>> import torch
        >>> mask = torch.tensor([True, True, False, False])
        >>> swapped_entries(mask, torch.tensor([0.9, 0.1, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.2, 0.7]), 0.5,
        ...                 "rigl").tolist()
        [False, True, False, True]
    """
    regrowth, key = renamed("method", method, "regrowth", regrowth, "rigl")
    check_choice(key, regrowth, GROWTH_METHODS)
    if regrowth == "rigl" and grad is None:
        raise ValueError(f"{key}='rigl' needs the dense gradient, but got grad=None")
    flat_mask = mask.reshape(-1)
    # a shard: counts over every rank's rows
    n_active, numel = sum_over_ranks([int(flat_mask.count_nonzero()), flat_mask.numel()], group, flat_mask.device)
    n_swap = min(round(fraction * n_active), numel - n_active)
    if n_swap == 0:
        return torch.zeros_like(mask)
    inactive = ~flat_mask
    weights = weight.detach().reshape(-1)
    if grad is not None and regrowth == "rigl":
        grads = grad.detach().reshape(-1)
        grow_values = None
    else:
        noise = torch.rand(flat_mask.numel(), generator=generator, device="cpu").to(flat_mask.device)
        grow_values = noise.neg_()
    if group is None and numel < _ONE_SELECTION_LIMIT:
        grow_key = grow_values if grow_values is not None else grads.float().abs().neg_()
        return _one_selection(flat_mask, weights.float().abs(), grow_key, n_active, n_swap).view_as(mask)
    # Drop: the lowest |w| among active entries.
    (dropped,) = select_lowest_kept([_scored(weights, torch.abs, flat_mask)], n_swap, group)
    # Grow: the best-scoring entries among those inactive before the update.
    grow = (
        _scored(grads, lambda g: g.abs().neg_(), inactive)
        if grow_values is None
        else ScoredLayer.of(grow_values, inactive)
    )
    (grown,) = select_lowest_kept([grow], n_swap, group)
    return dropped.logical_or_(grown).view_as(mask)


_INDEX_BITS = 29
_ONE_SELECTION_LIMIT = 1 << _INDEX_BITS  # entries of a layer whose key holds its index (1 band + 32 score bits)


def _one_selection(active: Tensor, drop_key: Tensor, grow_key: Tensor, n_active: int, n_swap: int) -> Tensor:
    """The ``n_swap`` lowest ``drop_key`` of ``active`` entries and the ``n_swap`` lowest ``grow_key`` of the others,
    ties to the lower index, from one partial sort: ``band << 61 | ordered score << 29 | index`` is unique per entry
    and orders by band, then score, then index, so the lowest ``len(first band) + n_swap`` keys hold the first band's
    ``n_swap`` lowest at their head and the second band's at their tail.

    Example:
        >>> import torch
        >>> active = torch.tensor([True, True, False, False, False])
        >>> _one_selection(active, torch.tensor([0.3, 0.1, 0, 0, 0]), torch.tensor([0, 0, -0.2, -0.7, -0.7]), 2, 1)
        tensor([False,  True, False,  True, False])
    """
    numel = active.numel()
    first_band_active = n_active <= numel - n_active  # the smaller group first: fewer keys to sort
    scores = torch.where(active, drop_key, grow_key)
    keys = (signed_keys(scores).to(torch.int64) + 2**31).bitwise_left_shift_(_INDEX_BITS)  # unsigned float order
    keys.bitwise_or_(torch.arange(numel, device=active.device))
    second_band = ~active if first_band_active else active
    keys.bitwise_or_(second_band.to(torch.int64).bitwise_left_shift_(61))
    first = n_active if first_band_active else numel - n_active
    lowest = torch.topk(keys, first + n_swap, largest=False, sorted=True).indices
    swapped = torch.zeros(numel, dtype=torch.bool, device=active.device)
    swapped[lowest[:n_swap]] = True
    swapped[lowest[first:]] = True
    return swapped


def _scored(values: Tensor, score: Callable[[Tensor], Tensor], kept: Tensor) -> ScoredLayer:
    return ScoredLayer(
        values.numel(), lambda a, b: score(values[a:b].float()), lambda i: score(values[i].float()), kept
    )


def regrow_in_place(
    masked: MaskStore,
    fraction: float,
    regrowth: str = "rigl",
    generator: torch.Generator | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    method: str | None = None,
) -> dict[str, float]:
    """Drop-and-grow over every masked layer of ``masked``: each layer's swapped entries (:func:`swapped_entries`,
    over the ranks of a sharded layer; the same on every DDP rank) flipped in its mask in place, dropped weights
    zeroed, the optimizer state of every swapped entry reset. A layer without a gradient keeps its mask under
    ``rigl``. Returns the update's metrics. ``method``: the former name of ``regrowth`` (deprecated).

    Example:
        >>> from torch import nn
        >>> from pat_callbacks.core.masks import MaskStore
        >>> layer = nn.Linear(4, 4)
        >>> masked = MaskStore({"weight": layer.weight})
        >>> _ = masked.set_masks({"weight": torch.arange(16).view(4, 4) % 2 == 0})
        >>> regrow_in_place(masked, 0.25, "set", torch.Generator().manual_seed(0))["pruning/regrown"]
        2.0
    """
    regrowth, _ = renamed("method", method, "regrowth", regrowth, "rigl")
    swapped: dict[str, Tensor] = {}
    n_active = 0
    for name, mask in masked.masks.items():
        param = masked.params[name]
        if regrowth == "rigl" and param.grad is None:
            continue  # a layer without a gradient this step keeps its mask
        grad = None if param.grad is None else local(param.grad)
        swapped[name] = swapped_entries(mask, local(param), grad, fraction, regrowth, generator, group=masked.group)
        n_active += int(mask.count_nonzero())
    swapped = masked.flip(swapped, optimizers=optimizers)
    n_swapped, n_active = masked.sum_over_ranks([sum(int(e.count_nonzero()) for e in swapped.values()), n_active])
    n_regrown = n_swapped // 2  # as many as dropped
    return {
        "pruning/drop_fraction": fraction,
        "pruning/regrown": float(n_regrown),
        "pruning/dropped": float(n_regrown),
        "pruning/mask_change_rate": n_regrown / max(n_active, 1),
    }
