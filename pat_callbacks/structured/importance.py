"""Structured importances: one score per channel of a channel group, over all its coupled slices."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

from torch import Tensor

from pat_callbacks.core._validation import renamed_choice
from pat_callbacks.core.registry import Registry
from pat_callbacks.structured.channels import ChannelGroup


class StructuredImportance(ABC):
    """One score per channel of a :class:`ChannelGroup` (higher = keep), over all its coupled slices.

    Subclasses reduce over the group with :meth:`ChannelGroup.channel_sums` (one ``index_select`` and one
    ``index_add_`` per coupled parameter: no per-channel loop, no host copy). A new importance is one class registered
    with ``@STRUCTURED_IMPORTANCES.register`` (see ``docs/extending.md``).

    Example:
        >>> import torch
        >>> class MaxAbs(StructuredImportance):
        ...     name = "l1_mean"
        ...     def __call__(self, group, params, grads=None):
        ...         sums = group.channel_sums(lambda name, dim, idx: params[name].index_select(dim, idx).abs())
        ...         return sums / group.channel_sizes(params)
        >>> _ = STRUCTURED_IMPORTANCES.register(MaxAbs)
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> channel_scores(g, {"w": torch.tensor([[3.0, -1.0], [0.0, 1.0]])}, "l1_mean")
        tensor([2.0000, 0.5000])
        >>> del STRUCTURED_IMPORTANCES["l1_mean"]

    Attributes:
        name: the name used in configs (``importance=l2``).
        needs_grad: whether scores read this step's dense gradients.
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False

    @abstractmethod
    def __call__(
        self, group: ChannelGroup, params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None] | None = None
    ) -> Tensor:
        """A float tensor of ``group.n_channels`` scores."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _selected(tensors: Mapping[str, Tensor | None], what: str) -> Callable[[str, int, Tensor], Tensor]:
    def select(name: str, dim: int, index: Tensor) -> Tensor:
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"structured importance needs the {what} of {name!r}, but got none")
        return tensor.detach().index_select(dim, index).float()

    return select


def _products(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None] | None
) -> Callable[[str, int, Tensor], Tensor]:
    weights, gradients = _selected(params, "weights"), _selected(grads or {}, "gradient")
    return lambda name, dim, index: weights(name, dim, index) * gradients(name, dim, index)


class L1Importance(StructuredImportance):
    """Sum of ``|w|`` over the channel's coupled slices (Li et al. 2016).

    Example:
        >>> import torch
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> L1Importance()(g, {"w": torch.tensor([[3.0, -4.0], [0.0, 1.0]])})
        tensor([7., 1.])
    """

    name: ClassVar[str] = "l1"

    def __call__(self, group, params, grads=None):
        select = _selected(params, "weights")
        return group.channel_sums(lambda n, d, i: select(n, d, i).abs(), device=params[group.root].device)


class L2Importance(StructuredImportance):
    """Euclidean norm of the channel's coupled slices.

    Example:
        >>> import torch
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> L2Importance()(g, {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]])})
        tensor([5., 1.])
    """

    name: ClassVar[str] = "l2"

    def __call__(self, group, params, grads=None):
        select = _selected(params, "weights")
        return group.channel_sums(lambda n, d, i: select(n, d, i).square(), device=params[group.root].device).sqrt()


class GroupTaylorImportance(StructuredImportance):
    """``(sum g * w)^2`` over the channel's coupled slices with this step's dense gradients (Molchanov et al.
    2019): the squared first-order change in loss if the whole channel were removed. (Unstructured
    ``criterion="taylor"`` is another quantity: the mean of ``|w * g|`` per weight since the last update.)

    Example:
        >>> import torch
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> w, grad = torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, -1.0], [0.5, 0.5]])
        >>> GroupTaylorImportance()(g, {"w": w}, {"w": grad})
        tensor([1., 1.])
    """

    name: ClassVar[str] = "group_taylor"
    needs_grad: ClassVar[bool] = True

    def __call__(self, group, params, grads=None):
        return group.channel_sums(_products(params, grads), device=params[group.root].device).square()


class GateImportance(StructuredImportance):
    """``|sum g * w|`` over the slices that scale the channel's output: ``|dL/d gate|`` for a gate multiplying it
    (Michel et al. 2019's head importance).

    Example:
        >>> import torch
        >>> channel = [("w", 0, torch.tensor([0])), ("next", 1, torch.tensor([0]))]
        >>> g = ChannelGroup("w", 1, [channel])
        >>> GateImportance()(g, {"w": torch.ones(1, 2)}, {"w": -torch.ones(1, 2)})
        tensor([2.])
    """

    name: ClassVar[str] = "gate"
    needs_grad: ClassVar[bool] = True

    def __call__(self, group, params, grads=None):
        return group.channel_sums(_products(params, grads), gates=True, device=params[group.root].device).abs()


STRUCTURED_IMPORTANCES: Registry[type[StructuredImportance]] = Registry("criterion", base=StructuredImportance)
"""The structured importances by name; a new one is a :class:`StructuredImportance` subclass with a ``name`` and
``@STRUCTURED_IMPORTANCES.register``."""
_RENAMED = {"taylor": "group_taylor"}  # former names, resolved by the one renaming helper


def register_importance(cls: type[StructuredImportance]) -> type[StructuredImportance]:
    """Register a structured importance under its ``name`` (usable as ``criterion="NAME"``): the same as
    ``STRUCTURED_IMPORTANCES.register(cls)``.

    Example:
        >>> register_importance(L2Importance)
        Traceback (most recent call last):
        ...
        ValueError: criterion 'l2' is already registered (L2Importance); pass replace=True to replace it
    """
    return STRUCTURED_IMPORTANCES.register(cls)


for _cls in (L1Importance, L2Importance, GroupTaylorImportance, GateImportance):
    STRUCTURED_IMPORTANCES.register(_cls)


def get_structured_importance(importance: str | StructuredImportance) -> StructuredImportance:
    """An importance instance from a registered name (``"taylor"`` is the former name of ``"group_taylor"``).

    Example:
        >>> get_structured_importance("gate")
        GateImportance()
        >>> get_structured_importance("l3")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `criterion` 'l3'; expected one of: 'gate', 'group_taylor', 'l1', 'l2'
    """
    if isinstance(importance, StructuredImportance):
        return importance
    importance = renamed_choice(
        "importance",
        importance,
        _RENAMED,
        why=" (it is (sum g*w)^2 of the whole channel, not the per-weight criterion 'taylor')",
        stacklevel=4,
    )
    return STRUCTURED_IMPORTANCES[STRUCTURED_IMPORTANCES.check(importance)]()


def channel_scores(
    group: ChannelGroup,
    params: Mapping[str, Tensor],
    importance: str | StructuredImportance = "l2",
    grads: Mapping[str, Tensor | None] | None = None,
) -> Tensor:
    """One score per channel of ``group`` by a structured importance (see :data:`STRUCTURED_IMPORTANCES`).

    Example:
        >>> import torch
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> g = ChannelGroup("w", 2, [[("w", 0, torch.tensor([0]))], [("w", 0, torch.tensor([1]))]])
        >>> channel_scores(g, {"w": w})
        tensor([5., 1.])
    """
    return get_structured_importance(importance)(group, params, grads)
