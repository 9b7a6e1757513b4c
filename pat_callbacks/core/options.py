"""What to prune and how: :class:`PruningOptions`, validated at construction, before any model is seen.

One vocabulary for every pruner and callback: ``criterion`` (what scores an entry), ``allocation`` (how an overall
target splits over layers), ``pattern`` (the mask's shape), ``include`` / ``exclude`` (which parameters),
``layer_sparsity`` / ``min_sparsity`` / ``max_sparsity`` (per-layer pins and caps).

Defaults: the Trainer-free :class:`~pat_callbacks.core.pruner.Pruner` defaults to ``criterion="magnitude",
allocation="uniform"``, which needs nothing but the weights, so ``prune_to`` works anywhere in a plain loop, even
on a model that never saw a gradient. The Lightning callbacks default to ``criterion="taylor", allocation="global"``,
the best setting measured by ``bench/accuracy.py``: they call ``accumulate()`` between ``backward`` and the optimizer
step themselves, which Taylor scores need.

Example:
    >>> PruningOptions(criterion="taylor", allocation="global").allocation
    'global'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from pat_callbacks.core._validation import check_choice, check_fraction, check_int
from pat_callbacks.core.allocation import ALLOCATIONS
from pat_callbacks.core.criteria import Criterion, get_criterion
from pat_callbacks.core.patterns import BlockPattern, Pattern, make_pattern
from pat_callbacks.core.scoring import HISTORY_DTYPES
from pat_callbacks.core.targets import check_real_parameters, normalize_patterns, select_parameters

__all__ = ["ACCUMULATE_WINDOW", "PruningOptions"]

ACCUMULATE_WINDOW = 40
"""The default window: Taylor and Fisher scores reading the 40 steps before each update (bfloat16 history) reached,
by ``bench/accuracy.py`` (MNIST-1D ConvBase, updates every 100 steps, 3 seeds), 86.6 +- 0.5 % at 0.9 and
72.6 +- 4.4 at 0.95, against 86.7 +- 0.9 and 69.3 +- 2.5 for every step in float32 rerun beside it; 20 steps gave
86.0 +- 1.1 and 70.4 +- 4.6 (``bench/results/accuracy.md``)."""


@dataclass
class PruningOptions:
    """What to prune and how, validated at construction (before any model is seen).

    Args:
        criterion: importance score: ``"magnitude"``, ``"taylor"``, ``"movement"``, ``"fisher"``, ``"random"``
            or a :class:`~pat_callbacks.core.criteria.Criterion`.
        allocation: how an overall target is split over layers: ``"uniform"``, ``"global"`` (mean-normalised
            scores), ``"global_raw"``, ``"erk"``, ``"er"``, ``"sensitivity"``, ``"owl"`` or any name in
            :data:`~pat_callbacks.core.allocation.ALLOCATIONS` (see :mod:`pat_callbacks.core.allocation`).
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``) or ``"block:RxC"`` (see
            :mod:`pat_callbacks.core.patterns`).
        include: glob patterns of parameter names to prune (default: see :mod:`pat_callbacks.core.targets`).
        exclude: glob patterns of parameter names to keep dense.
        keep_first, keep_last: keep the first / last pruned parameter (in model order) dense.
        layer_sparsity: ``{glob pattern: final sparsity}`` for layers pinned at a given sparsity.
        min_sparsity, max_sparsity: per-layer caps for ``global``, ``global_raw`` and ``sensitivity``.
        allow_vectors: let ``include`` select norm gains and biases (refused by default: rarely intended).
        accumulate_window: the steps before each update (the update step included) whose weights and gradients
            a criterion averaged since the last update (``taylor``, ``fisher``) accumulates, where the caller passes
            the step and the next update step to ``accumulate`` (the scheduled callbacks do); default
            :data:`ACCUMULATE_WINDOW` (40, measured to lose nothing); ``None``: every step since the last update
            (the former behaviour). A plain loop calling ``accumulate()`` without steps accumulates every call.
        history_dtype: ``"bfloat16"`` (default: half the bytes; 99.9% of the same mask entries as float32,
            ``bench/history_precision.py``) or ``"float32"`` (the former behaviour): the dtype of those criteria's
            history (movement's, summed over the whole run, stays float32). bfloat16 applies only to a history a
            window bounds (at most 256 steps before a known update); without a window, without steps (a plain
            loop's ``accumulate()``) or with a longer window the history is float32: a bfloat16 sum of equal terms
            stops growing after 256 of them.

    Example:
        >>> PruningOptions(allocation="global", max_sparsity=0.95).allocation
        'global'
        >>> PruningOptions(pattern="2:4", allocation="global")
        Traceback (most recent call last):
        ...
        ValueError: pattern='2:4' fixes the sparsity of every layer: use allocation='uniform', not 'global'
    """

    criterion: str | Criterion = "magnitude"
    allocation: str = "uniform"
    pattern: str | Pattern = "unstructured"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    keep_first: bool = False
    keep_last: bool = False
    layer_sparsity: Mapping[str, float] | None = field(default=None)
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    allow_vectors: bool = False
    accumulate_window: int | None = ACCUMULATE_WINDOW
    history_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.include is not None and not isinstance(self.include, str) and len(tuple(self.include)) == 0:
            raise ValueError(
                f"Expected `include` to hold at least one glob pattern, but got {self.include!r}: an empty list would "
                "prune nothing; leave `include` unset (None) for the default targets"
            )
        self.criterion = get_criterion(self.criterion)
        self.allocation = ALLOCATIONS.check(self.allocation)
        self.pattern = make_pattern(self.pattern)
        self.include = normalize_patterns("include", self.include)
        self.exclude = normalize_patterns("exclude", self.exclude)
        self.keep_first, self.keep_last = bool(self.keep_first), bool(self.keep_last)
        self.allow_vectors = bool(self.allow_vectors)
        if self.accumulate_window is not None:
            self.accumulate_window = check_int("accumulate_window", self.accumulate_window, minimum=1)
        dtype = getattr(self.history_dtype, "value", self.history_dtype)  # a Hydra config's enum: its value
        self.history_dtype = check_choice("history_dtype", dtype, HISTORY_DTYPES)
        if self.layer_sparsity is not None and not isinstance(self.layer_sparsity, Mapping):
            raise ValueError(
                f"Expected `layer_sparsity` to be a mapping of pattern -> sparsity, got {self.layer_sparsity!r}"
            )
        self.layer_sparsity = {
            str(pattern): check_fraction(f"layer_sparsity[{pattern!r}]", value)
            for pattern, value in (self.layer_sparsity or {}).items()
        }
        self.min_sparsity = check_fraction("min_sparsity", self.min_sparsity, allow_one=True)
        self.max_sparsity = check_fraction("max_sparsity", self.max_sparsity, allow_one=True)
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(
                f"Expected `min_sparsity` <= `max_sparsity`, but got {self.min_sparsity} > {self.max_sparsity}"
            )
        if self.pattern.fixed_sparsity is not None and self.allocation != "uniform":
            raise ValueError(
                f"pattern={self.pattern.name!r} fixes the sparsity of every layer: use allocation='uniform', "
                f"not {self.allocation!r}"
            )

    def targets(self, model_or_params: nn.Module | Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """The parameters these options prune: a module's targets by ``include`` / ``exclude`` (see
        :func:`~pat_callbacks.core.targets.select_parameters`), or a ``{name: parameter}`` mapping as given; less
        ``keep_first`` / ``keep_last``. Refuses lazy (uninitialised) parameters and ``layer_sparsity`` patterns
        that match nothing.

        Example:
            >>> from torch import nn
            >>> list(PruningOptions(keep_last=True).targets(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))))
            ['0.weight']
        """
        if isinstance(model_or_params, nn.Module):
            named = dict(model_or_params.named_parameters())
        elif isinstance(model_or_params, Mapping):
            named = dict(model_or_params)
        else:
            raise ValueError(
                f"Expected a module or a mapping of name -> parameter to prune, but got {type(model_or_params)}"
            )
        lazy = [name for name, p in named.items() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ValueError(
                f"{lazy} are uninitialised (a lazy module such as nn.LazyLinear) and have no shape to prune yet: run "
                "a forward pass or build the model before fit, or use configure_model"
            )
        if isinstance(model_or_params, nn.Module):
            params = select_parameters(
                model_or_params, include=self.include, exclude=self.exclude, allow_vectors=self.allow_vectors
            )
        else:
            check_real_parameters(named)  # a module's targets are checked in select_parameters
            params = named
        names = list(params)
        dense = ({names[0]} if self.keep_first and names else set()) | (
            {names[-1]} if self.keep_last and names else set()
        )
        params = {name: p for name, p in params.items() if name not in dense}
        empty = [name for name, p in params.items() if p.numel() == 0]
        if empty:
            warnings.warn(f"{empty} have no entries (a dimension of size 0) and are left out of pruning", stacklevel=3)
            params = {name: p for name, p in params.items() if name not in empty}
        if not params:
            raise ValueError(f"keep_first/keep_last leave no parameter to prune (targets were {names})")
        for pattern in self.layer_sparsity or {}:
            if not any(fnmatchcase(name, pattern) for name in params):
                raise ValueError(
                    f"`layer_sparsity` pattern {pattern!r} matches no pruned parameter; pruned: {sorted(params)}"
                )
        return params

    def check_shardable(self, transposed: Sequence[str] = ()) -> None:
        """Refuse what sharded (FSDP2) parameters do not support yet, naming every such option.

        Example:
            >>> PruningOptions(pattern="block:4x4").check_shardable()
            Traceback (most recent call last):
            ...
            ValueError: These options are not supported with sharded (FSDP2) parameters yet: pattern='block:4x4' \
(blocks may straddle two ranks' rows)
        """
        problems = []
        why = ALLOCATIONS[self.allocation].unsharded_because  # type: ignore[index]
        if why is not None:
            problems.append(f"allocation={self.allocation!r} ({why})")
        if isinstance(self.pattern, BlockPattern):
            problems.append(f"pattern={self.pattern.name!r} (blocks may straddle two ranks' rows)")
        if self.pattern.fixed_sparsity is not None and transposed:  # type: ignore[union-attr]
            problems.append(f"pattern={self.pattern.name!r} on in x out matrices {sorted(transposed)}")
        if self.allocation in ("global", "global_raw") and (self.min_sparsity > 0 or self.max_sparsity < 1):
            problems.append("min_sparsity / max_sparsity caps with a global allocation")
        if problems:
            raise ValueError(
                "These options are not supported with sharded (FSDP2) parameters yet: " + "; ".join(problems)
            )
