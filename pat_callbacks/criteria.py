"""Importance criteria: map a weight tensor (and, for some, its gradient) to scores; higher = keep.

A criterion never sees the step or the target sparsity: it only ranks weights. Criteria that need
gradients say so with ``needs_grad`` so callbacks can check before training starts.

Example:
    >>> import torch
    >>> get_criterion("magnitude").score(torch.tensor([-3.0, 0.5, 2.0]), None, {})
    tensor([3.0000, 0.5000, 2.0000])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from pat_callbacks._validation import check_choice

__all__ = ["CRITERIA", "Criterion", "MagnitudeCriterion", "get_criterion"]


class Criterion(ABC):
    """Base class for importance scores.

    Attributes:
        name: the name used in configs (``criterion=magnitude``).
        needs_grad: whether :meth:`score` reads the gradient; callbacks check this before the first step.
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False

    @abstractmethod
    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Any]) -> Tensor:
        """Scores with ``param``'s shape; the lowest are pruned first."""

    def state_dict(self) -> dict[str, Any]:
        """History to checkpoint (empty for stateless criteria)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a stateless criterion accepts only an empty state."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MagnitudeCriterion(Criterion):
    """``|w|``: small weights matter least (Han et al. 2015; Zhu & Gupta 2017).

    Example:
        >>> import torch
        >>> MagnitudeCriterion().score(torch.tensor([[1.0, -2.0]]), None, {})
        tensor([[1., 2.]])
    """

    name: ClassVar[str] = "magnitude"

    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Any]) -> Tensor:
        return param.detach().abs()


CRITERIA: dict[str, type[Criterion]] = {cls.name: cls for cls in (MagnitudeCriterion,)}


def get_criterion(criterion: str | Criterion) -> Criterion:
    """Return a criterion instance from a registered name, or the instance itself.

    Example:
        >>> get_criterion("magnitude")
        MagnitudeCriterion()
    """
    if isinstance(criterion, Criterion):
        return criterion
    return CRITERIA[check_choice("criterion", criterion, CRITERIA)]()
