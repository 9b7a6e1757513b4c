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
    >>> drop_and_grow(mask, weight, grad, fraction=0.5, method="rigl").tolist()
    [True, False, False, True]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pat_callbacks._validation import check_choice

__all__ = ["DECAYS", "GROWTH_METHODS", "drop_and_grow", "update_fraction"]

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
    method: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """New mask: drop ``round(fraction * active)`` lowest-|w| active entries, regrow as many inactive ones.

    The count regrown equals the count dropped (capped by the entries inactive before the update), so the
    number of active entries is unchanged.

    Example:
        >>> import torch
        >>> mask = torch.tensor([True, True, False, False])
        >>> new = drop_and_grow(mask, torch.tensor([0.9, 0.1, 0.0, 0.0]), None, 0.5, "set",
        ...                     torch.Generator().manual_seed(0))
        >>> int(new.sum()), bool(new[0]), bool(new[1])
        (2, True, False)
    """
    check_choice("method", method, GROWTH_METHODS)
    if method == "rigl" and grad is None:
        raise ValueError("method='rigl' needs the dense gradient, but got grad=None")
    flat_mask = mask.reshape(-1)
    inactive_before = ~flat_mask
    n_active = int(flat_mask.sum())
    n_swap = min(round(fraction * n_active), int(inactive_before.sum()))
    if n_swap == 0:
        return mask.clone()
    # Drop: the lowest |w| among active entries (inactive ones get +inf so they are never chosen).
    drop_scores = torch.where(flat_mask, weight.detach().reshape(-1).abs().float(), torch.inf)
    dropped = torch.topk(drop_scores, n_swap, largest=False, sorted=False).indices
    # Grow: the best-scoring entries among those inactive before the update (active ones get -inf).
    if grad is not None and method == "rigl":
        grow_scores = grad.detach().reshape(-1).abs().float()
    else:
        device = flat_mask.device
        grow_scores = torch.rand(flat_mask.numel(), generator=generator, device="cpu").to(device)
    grow_scores = torch.where(inactive_before, grow_scores, -torch.inf)
    grown = torch.topk(grow_scores, n_swap, largest=True, sorted=False).indices
    new_mask = flat_mask.clone()
    new_mask[dropped] = False
    new_mask[grown] = True
    return new_mask.view_as(mask)
