"""The one-shot methods: a :class:`OneShotMethod` declares what it needs (which calibration statistics; whether it
selects its own masks and updates the weights), so :func:`~pat_callbacks.oneshot.prune.one_shot_prune` has no
per-method branch; :data:`ONE_SHOT_METHODS` is their registry (a new method is one registered class,
``docs/extending.md``).

Example:
    >>> sorted(ONE_SHOT_METHODS), ONE_SHOT_METHODS["wanda"].statistics
    (['magnitude', 'sparsegpt', 'wanda'], ('norms',))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from pat_callbacks.core.patterns import NMPattern
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.core.registry import Registry
from pat_callbacks.core.sharding import local
from pat_callbacks.oneshot.calibration import Calibration
from pat_callbacks.oneshot.sparsegpt import refuse_sharded, sparsegpt_prune
from pat_callbacks.oneshot.wanda import wanda_scores

if TYPE_CHECKING:
    from pat_callbacks.oneshot.prune import OneShotOptions

__all__ = ["ONE_SHOT_METHODS", "MagnitudeMethod", "OneShotMethod", "SparseGPTMethod", "WandaMethod"]


class OneShotMethod:
    """A one-shot algorithm, with what it needs declared so :func:`one_shot_prune` never switches on its name.

    A scoring method implements :meth:`scores` (higher = keep); the allocation and pattern then choose the masks
    (per output row with ``per_row``). A method that selects its own masks and updates the kept weights (SparseGPT)
    sets ``updates_weights`` and implements :meth:`prune_layer`.

    Attributes:
        name: the name used in configs (``method="wanda"``).
        statistics: the calibration statistics it reads: ``()`` (weights only: no calibration), ``("norms",)``
            (``||X_j||``, :meth:`Calibration.norms`) or ``("hessians",)`` (``X^T X``, :meth:`Calibration.pop_hessian`).
        updates_weights: whether it selects its own masks, a layer at a time, and rewrites the kept weights (then
            not ``per_row`` and no allocation that compares all layers' scores at once).
        per_row: the default of ``per_row`` (compare scores within each output row).

    Example:
        >>> import torch
        >>> sorted(ONE_SHOT_METHODS)
        ['magnitude', 'sparsegpt', 'wanda']
        >>> MagnitudeMethod().scores({"w": torch.tensor([[-2.0, 1.0]])}, None, ())
        {'w': tensor([[2., 1.]])}
    """

    name: ClassVar[str] = ""
    statistics: ClassVar[tuple[str, ...]] = ()
    updates_weights: ClassVar[bool] = False
    per_row: ClassVar[bool] = False

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Refuse parameters the method cannot prune (e.g. sharded ones), before anything is read."""

    def scores(
        self, params: Mapping[str, Tensor], calibration: Calibration | None, transposed: Iterable[str]
    ) -> dict[str, Tensor]:
        """``{name: scores}`` in each parameter's shape (``transposed``: names stored ``in x out``)."""
        raise NotImplementedError(f"{type(self).__name__} neither scores weights nor updates them")

    def prune_layer(
        self, pruner: Pruner, name: str, calibration: Calibration, sparsity: float, options: OneShotOptions
    ) -> Tensor:
        """Prune one parameter in place (updating its kept weights) and return its keep-mask."""
        raise NotImplementedError(f"{type(self).__name__} declares updates_weights but has no prune_layer")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MagnitudeMethod(OneShotMethod):
    """``|W|``: no calibration (Han et al. 2015).

    Example:
        >>> MagnitudeMethod.statistics
        ()
    """

    name: ClassVar[str] = "magnitude"

    def scores(self, params, calibration, transposed):
        return {name: local(p).detach().abs().float() for name, p in params.items()}


class WandaMethod(OneShotMethod):
    """``|W_ij| * ||X_j||`` (Sun et al. 2024), compared per output row by default (see
    :mod:`~pat_callbacks.oneshot.wanda`).

    Example:
        >>> WandaMethod.statistics, WandaMethod.per_row
        (('norms',), True)
    """

    name: ClassVar[str] = "wanda"
    statistics: ClassVar[tuple[str, ...]] = ("norms",)
    per_row: ClassVar[bool] = True

    def scores(self, params, calibration, transposed):
        return wanda_scores(params, {n: calibration.norms(n) for n in params}, transposed)  # type: ignore[union-attr]


class SparseGPTMethod(OneShotMethod):
    """SparseGPT's OBS update from the input Hessian, blockwise (Frantar & Alistarh 2023, see
    :mod:`~pat_callbacks.oneshot.sparsegpt`); not on sharded parameters.

    Example:
        >>> SparseGPTMethod.statistics, SparseGPTMethod.updates_weights
        (('hessians',), True)
    """

    name: ClassVar[str] = "sparsegpt"
    statistics: ClassVar[tuple[str, ...]] = ("hessians",)
    updates_weights: ClassVar[bool] = True

    def check(self, params):
        refuse_sharded(dict(params))

    def prune_layer(self, pruner, name, calibration, sparsity, options):
        return _sparsegpt_layer(pruner, name, calibration.pop_hessian(name), sparsity, options)


ONE_SHOT_METHODS: Registry[type[OneShotMethod]] = Registry("method", base=OneShotMethod)
"""The one-shot methods by name; a new one is a :class:`OneShotMethod` subclass with a ``name`` and
``@ONE_SHOT_METHODS.register``."""
for _cls in (MagnitudeMethod, WandaMethod, SparseGPTMethod):
    ONE_SHOT_METHODS.register(_cls)


@torch.no_grad()
def _sparsegpt_layer(pruner: Pruner, name: str, hessian: Tensor, sparsity: float, opts: OneShotOptions) -> Tensor:
    """SparseGPT on one parameter: its updated weights written back, its keep-mask returned (the Hessian freed).

    A mask the pruner already holds (a second ``one_shot_prune(..., pruner=p)``) nests: its pruned entries are
    pruned again and stay exactly zero. Like the Pruner, the layer keeps at least one weight and is warned about past
    0.99."""
    param = pruner.params[name]
    weight = local(param).detach()
    flipped = name in pruner.transposed
    matrix = weight.t() if flipped else weight.reshape(weight.shape[0], -1)
    previous = pruner.masks.get(name)
    keep = None
    if previous is not None:
        keep = previous.t() if flipped else previous.reshape(matrix.shape)
    nm = (opts.pattern.n, opts.pattern.m) if isinstance(opts.pattern, NMPattern) else None
    new, mask = sparsegpt_prune(
        matrix, hessian, sparsity, nm=nm, block_size=opts.block_size, damping=opts.damping, keep=keep
    )
    del hessian
    if flipped:
        new, mask = new.t(), mask.t()
    weight.copy_(new.reshape(weight.shape).to(weight.dtype))
    pruner.planner.warn_nearly_empty({name: 1.0 - int(mask.sum()) / mask.numel()}, None, owner="SparseGPT")
    return mask.reshape(weight.shape)
