"""Importance criteria: map a weight tensor, its gradient and the criterion's own history to scores.

Higher score = keep. A criterion never sees the step or the target sparsity: it only ranks weights.

Criteria that need gradients read the *real* training gradients: the callback calls :meth:`Criterion.accumulate`
once per optimizer step (in ``on_before_optimizer_step``, before gradients are masked) while pruning is under
way, so no extra forward or backward pass is ever run. History lives in a per-parameter ``state`` dict of
tensors that the callback owns and checkpoints. Memory: one buffer the size of the parameter for ``taylor``,
``movement`` and ``fisher`` (plus a scalar step count); none for ``magnitude`` and ``random``. A criterion makes
its history in float32 and adds to an existing one in place in the dtype it has: the
:class:`~pat_callbacks.core.scoring.Scorer` keeps the histories averaged since the last update in bfloat16 and
fills them only over a window of steps before each update (see :mod:`pat_callbacks.core.scoring`).

| name | score | history |
|---|---|---|
| ``magnitude`` | ``|w|`` | none |
| ``taylor`` | mean over steps since the last update of ``|w_t * g_t|`` (Molchanov et al. 2017) | sum, count |
| ``movement`` | ``-sum_t w_t * g_t`` since pruning started (Sanh et al. 2020) | sum |
| ``fisher`` | ``w^2 * E[g^2] / 2``, ``E`` over steps since the last update (OBD, diagonal Fisher) | sum, count |
| ``random`` | uniform in (0, 1) for non-zero weights, 0 for zero ones (a seeded baseline) | generator |

Example:
    >>> import torch
    >>> get_criterion("magnitude").score(torch.tensor([-3.0, 0.5, 2.0]), None, {})
    tensor([3.0000, 0.5000, 2.0000])
    >>> taylor, state = get_criterion("taylor"), {}
    >>> w = torch.tensor([1.0, -2.0])
    >>> for g in (torch.tensor([0.5, 0.1]), torch.tensor([-0.5, 0.3])):
    ...     taylor.accumulate(w, g, state)
    >>> taylor.score(w, None, state)  # mean |w*g| over the two steps
    tensor([0.5000, 0.4000])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from pat_callbacks.core._rng import SeededGenerator
from pat_callbacks.core._validation import check_int
from pat_callbacks.core.elementwise import aligned_pieces, piece_size
from pat_callbacks.core.registry import Registry

__all__ = [
    "CRITERIA",
    "Criterion",
    "FisherCriterion",
    "MagnitudeCriterion",
    "MovementCriterion",
    "RandomCriterion",
    "TaylorCriterion",
    "get_criterion",
]


class Criterion(ABC):
    """Base class for importance scores.

    Example:
        >>> import torch
        >>> class Squared(Criterion):
        ...     name = "squared"
        ...     def score(self, param, grad, state):
        ...         return param.detach() ** 2
        >>> Squared().score(torch.tensor([-2.0, 1.0]), None, {})
        tensor([4., 1.])

    Attributes:
        name: the name used in configs (``criterion=magnitude``).
        needs_grad: whether :meth:`score` or :meth:`accumulate` read gradients; checked before the first step.
        needs_history: whether :meth:`accumulate` must run at every optimizer step while pruning.
        resets_after_update: whether the history restarts after each mask update ("since the last update").
        elementwise: whether each entry's score depends only on that entry's weight, gradient and history, so that
            a slice of the inputs scores that slice (mask updates then score large layers chunk by chunk).
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False
    needs_history: ClassVar[bool] = False
    resets_after_update: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False

    @abstractmethod
    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        """Scores with ``param``'s shape; the lowest are pruned first."""

    def accumulate(self, param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> None:
        """Add one optimizer step's weights and dense gradients to ``state`` (in place)."""
        if self.needs_history:
            raise NotImplementedError(f"{type(self).__name__} declares needs_history but does not accumulate")

    def accumulate_many(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]]
    ) -> None:
        """:meth:`accumulate` for many parameters at once, with the same numbers; the gradient criteria do it with
        a few multi-tensor (``torch._foreach_*``) kernels per step instead of a few kernels per parameter.

        Example:
            >>> import torch
            >>> taylor, states = get_criterion("taylor"), [{}, {}]
            >>> for _ in range(2):
            ...     taylor.accumulate_many([torch.ones(2), torch.ones(3)], [torch.ones(2), -torch.ones(3)], states)
            >>> states[1]["sum"], states[1]["count"]
            (tensor([2., 2., 2.]), tensor(2.))
        """
        for param, grad, state in zip(params, grads, states, strict=True):
            self.accumulate(param, grad, state)

    def reset(self, state: dict[str, Tensor]) -> None:
        """Forget the history in ``state`` (after a mask update, for criteria averaged since the last one)."""
        state.clear()

    def state_dict(self) -> dict[str, Any]:
        """The criterion's own state beyond per-parameter history (e.g. a random generator)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a criterion without own state accepts only an empty one."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _add(state: dict[str, Tensor], key: str, value: Tensor) -> None:
    if key in state:
        state[key].add_(value)
    else:
        state[key] = value.detach().float().clone()


def _add_owned(state: dict[str, Tensor], key: str, value: Tensor) -> None:
    """:func:`_add` for a ``value`` made for it (a temporary): the first one becomes the float32 history itself."""
    if key in state:
        state[key].add_(value)
    else:
        state[key] = value.float()


def _accumulate_many(
    criterion: Criterion,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    key: str,
    terms: Callable[[list[Tensor], list[Tensor]], list[Tensor]],
    counted: bool,
) -> None:
    """Histories that exist take one multi-tensor add of ``terms(params, grads)`` (and of 1 to their counts); the
    others start with :meth:`Criterion.accumulate`, one parameter at a time."""
    ready = [i for i, state in enumerate(states) if key in state and (not counted or "count" in state)]
    for i in sorted(set(range(len(states))) - set(ready)):
        criterion.accumulate(params[i], grads[i], states[i])
    if not ready:
        return
    rows = [(params[i].detach(), grads[i].detach(), states[i][key]) for i in ready]
    for weights, gradients, histories in aligned_pieces(rows, piece_size(rows[0][0].device)):
        torch._foreach_add_(histories, terms(weights, gradients))  # cache-sized pieces on a CPU: the same numbers
    if counted:
        torch._foreach_add_([states[i]["count"] for i in ready], 1.0)


def _count(state: dict[str, Tensor]) -> None:
    if "count" in state:
        state["count"].add_(1.0)  # in place: no new tensor per step
    else:
        _add(state, "count", torch.ones((), device=next(iter(state.values())).device if state else "cpu"))


class MagnitudeCriterion(Criterion):
    """``|w|``: small weights matter least (Han et al. 2015; Zhu & Gupta 2017).

    Example:
        >>> import torch
        >>> MagnitudeCriterion().score(torch.tensor([[1.0, -2.0]]), None, {})
        tensor([[1., 2.]])
    """

    name: ClassVar[str] = "magnitude"
    elementwise: ClassVar[bool] = True

    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        return param.detach().abs()


class TaylorCriterion(Criterion):
    """First-order Taylor saliency ``|w * g|`` (Molchanov et al. 2017), averaged over the steps since the last
    mask update rather than taken from one noisy batch. Falls back to the current gradient with no history.

    Example:
        >>> import torch
        >>> TaylorCriterion().score(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0]), {})
        tensor([1., 3.])
    """

    name: ClassVar[str] = "taylor"
    needs_grad: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True
    needs_history: ClassVar[bool] = True
    resets_after_update: ClassVar[bool] = True

    def accumulate(self, param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> None:
        product = torch.mul(param.detach().float(), grad.detach().float())  # float32: fp16 products underflow
        _add_owned(state, "sum", product.abs_())  # |w * g| in place: one temporary per step, the same numbers
        _count(state)

    def accumulate_many(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]]
    ) -> None:
        def terms(w: list[Tensor], g: list[Tensor]) -> list[Tensor]:
            products = torch._foreach_mul([x.float() for x in w], [x.float() for x in g])  # float32, as above
            torch._foreach_abs_(products)
            return products

        _accumulate_many(self, params, grads, states, "sum", terms, counted=True)

    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        if "sum" in state:
            return state["sum"].float() / state["count"]  # float32 scores from a bfloat16 history too
        if grad is None:
            raise ValueError("criterion='taylor' needs a gradient or accumulated history, but got neither")
        return (param.detach().float() * grad.detach().float()).abs()


class MovementCriterion(Criterion):
    """Movement score ``S = -sum_t w_t * g_t`` accumulated since pruning started (Sanh et al. 2020).

    Weights moving away from zero score high. With SGD, ``-g`` is the update direction, so ``S`` is large
    when the optimizer keeps pushing a weight further from zero. Not reset between updates.

    Example:
        >>> import torch
        >>> movement, state = MovementCriterion(), {}
        >>> w = torch.tensor([1.0, 1.0])
        >>> movement.accumulate(w, torch.tensor([-1.0, 2.0]), state)  # first grows, second shrinks
        >>> movement.score(w, None, state)
        tensor([ 1., -2.])
    """

    name: ClassVar[str] = "movement"
    needs_grad: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True
    needs_history: ClassVar[bool] = True

    def accumulate(self, param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> None:
        _add_owned(state, "sum", torch.mul(param.detach().float(), grad.detach().float()).neg_())

    def accumulate_many(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]]
    ) -> None:
        def terms(w: list[Tensor], g: list[Tensor]) -> list[Tensor]:
            products = torch._foreach_mul([x.float() for x in w], [x.float() for x in g])
            torch._foreach_neg_(products)
            return products

        _accumulate_many(self, params, grads, states, "sum", terms, counted=False)

    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        if "sum" in state:
            return state["sum"].clone()
        if grad is None:
            raise ValueError("criterion='movement' needs a gradient or accumulated history, but got neither")
        return -(param.detach().float() * grad.detach().float())


class FisherCriterion(Criterion):
    """Optimal Brain Damage saliency with the diagonal empirical Fisher as the Hessian: ``1/2 * w^2 * E[g^2]``,
    ``E[g^2]`` the mean of squared gradients over *all* steps since the last mask update (LeCun et al. 1990).

    Example:
        >>> import torch
        >>> fisher, state = FisherCriterion(), {}
        >>> w = torch.tensor([2.0, 1.0])
        >>> for g in (torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0])):
        ...     fisher.accumulate(w, g, state)
        >>> fisher.score(w, None, state)  # 0.5 * w^2 * mean(g^2) = 0.5*4*5, 0.5*1*2
        tensor([10.,  1.])
    """

    name: ClassVar[str] = "fisher"
    needs_grad: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True
    needs_history: ClassVar[bool] = True
    resets_after_update: ClassVar[bool] = True

    def accumulate(self, param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> None:
        grad = grad.detach()
        squared = grad.square() if grad.dtype == torch.float32 else grad.float().square_()  # never the grad's memory
        _add_owned(state, "sum_sq_grad", squared)
        _count(state)

    def accumulate_many(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]]
    ) -> None:
        def terms(w: list[Tensor], g: list[Tensor]) -> list[Tensor]:
            floats = [x.float() for x in g]
            return torch._foreach_mul(floats, floats)  # x * x: the same numbers as x.square()

        _accumulate_many(self, params, grads, states, "sum_sq_grad", terms, counted=True)

    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        if "sum_sq_grad" in state:
            mean_sq = state["sum_sq_grad"].float() / state["count"]
        elif grad is not None:
            mean_sq = grad.detach().float().square()
        else:
            raise ValueError("criterion='fisher' needs a gradient or accumulated history, but got neither")
        return 0.5 * param.detach().float().square() * mean_sq


class RandomCriterion(Criterion):
    """Uniform random scores for non-zero weights (zero weights score 0, so pruned ones stay pruned).

    A baseline: any criterion worth using should beat it. Seeded; the generator state is checkpointed.

    Example:
        >>> import torch
        >>> RandomCriterion(seed=0).score(torch.tensor([0.0, 1.0, 2.0]), None, {})[0].item()
        0.0
    """

    name: ClassVar[str] = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed, minimum=0)
        self.rng = SeededGenerator(self.seed)

    def score(self, param: Tensor, grad: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        noise = torch.rand(param.shape, generator=self.rng.generator).to(param.device)
        return noise.clamp_min_(1e-12) * (param.detach() != 0)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.rng.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"RandomCriterion(seed={self.seed})"


CRITERIA: Registry[type[Criterion]] = Registry("criterion", base=Criterion)
"""The criteria by name; a new one is a :class:`Criterion` subclass with a ``name`` and ``@CRITERIA.register``.

Example:
    >>> sorted(CRITERIA)
    ['fisher', 'magnitude', 'movement', 'random', 'taylor']
"""
for _cls in (MagnitudeCriterion, TaylorCriterion, MovementCriterion, FisherCriterion, RandomCriterion):
    CRITERIA.register(_cls)


def get_criterion(criterion: str | Criterion) -> Criterion:
    """Return a criterion instance from a registered name, or the instance itself.

    Example:
        >>> get_criterion("fisher")
        FisherCriterion()
    """
    if isinstance(criterion, Criterion):
        return criterion
    return CRITERIA[CRITERIA.check(criterion)]()
