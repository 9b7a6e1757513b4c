"""One-shot pruning of a trained model from calibration data: :func:`one_shot_prune` (magnitude, Wanda, SparseGPT,
each with any allocation, e.g. OWL's layer-wise sparsities), leaving the model's pruned weights exactly zero and a
:class:`~pat_callbacks.core.pruner.Pruner` holding the masks for recovery training.

A one-shot method is a :class:`OneShotMethod` in the :data:`ONE_SHOT_METHODS` registry, declaring what it needs
(which calibration statistics; whether it selects its own masks and updates the weights), so
:func:`one_shot_prune` has no per-method branch and a new method is one registered class (``docs/extending.md``).

Layers are pruned in order, a layer group at a time (``sequential=True``, as both reference implementations do):
each group (a transformer block, see :func:`~pat_callbacks.core.owl.layer_groups`) is calibrated on the model
whose earlier groups are already pruned, so it sees the inputs it will get; statistics exist for one group at a
time. ``sequential=False`` calibrates every layer once, on the dense model (needed by the global allocations).

Where the groups are a model's repeated blocks (``pipeline="auto"``, see :mod:`~pat_callbacks.oneshot.blocks`), the
model runs once up to its first block, and each block is calibrated from its cached inputs, pruned, and run once
more to give the next block's inputs: two block forwards per batch per block, whatever the depth (the masks and
weights those of whole-model passes, ``pipeline="whole"``, which forward every block once per group). With
``offload`` the model stays where it is (e.g. in CPU memory) and one block at a time moves to ``device``, with the
cached activations there. Groups outside the blocks (a head) take one whole-model pass each.

Nothing changes unless everything is valid: the target names, and one dense forward of the first batch in which
every target's module runs on finite inputs, are checked before any weight is touched (and the cached inputs of
the first block for every batch, and each group's statistics, are checked finite before that group is pruned).

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> batches = [torch.randn(64, 16) for _ in range(4)]
    >>> result = one_shot_prune(model, "sparsegpt", 0.5, calibration=batches)
    >>> result.sparsity, float((model[0].weight == 0).float().mean())
    (0.5, 0.5)
    >>> one_shot_prune(model, "wanda", pattern="2:4", calibration=batches).layer_sparsity
    {'0.weight': 0.5, '2.weight': 0.5}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core._validation import check_fraction, check_int, check_positive, deprecated
from pat_callbacks.core.allocation import ALLOCATIONS, Allocation
from pat_callbacks.core.owl import OWL_LAMBDA, OWL_M, check_owl_lambda
from pat_callbacks.core.patterns import BlockPattern, NMPattern, Pattern, make_pattern
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.core.registry import unknown_name_message
from pat_callbacks.oneshot.methods import (
    ONE_SHOT_METHODS,
    MagnitudeMethod,
    OneShotMethod,
    SparseGPTMethod,
    WandaMethod,
)
from pat_callbacks.oneshot.sequential import _calibrate, _masks, _Pipeline, _pipeline, _prune_by_groups
from pat_callbacks.oneshot.wanda import wanda_scores

__all__ = [
    "ONE_SHOT_METHODS",
    "PIPELINES",
    "MagnitudeMethod",
    "OneShotMethod",
    "OneShotOptions",
    "OneShotResult",
    "SparseGPTMethod",
    "WandaMethod",
    "one_shot_allocations",
    "one_shot_prune",
]


def one_shot_allocations() -> list[str]:
    """The allocations one-shot pruning takes: every registered one but those that need measured sensitivities (a
    loss); a view of :data:`~pat_callbacks.core.allocation.ALLOCATIONS`, not a second list.

    Example:
        >>> one_shot_allocations()
        ['er', 'erk', 'global', 'global_raw', 'owl', 'uniform']
    """
    return sorted(name for name, allocation in ALLOCATIONS.items() if not allocation.needs_sensitivities)


PIPELINES = ("auto", "blocks", "whole")
"""How sequential calibration runs: ``"blocks"`` (block by block from cached inputs), ``"whole"`` (the whole model
per layer group), ``"auto"`` (blocks where the model has them, else whole, with an info line saying why)."""


def _planned_up_front(allocation: Allocation) -> bool:
    """Whether the allocation's per-layer sparsities are known before the method scores anything: from the layers'
    shapes, or from calibration statistics of the dense model (OWL). Else it compares all layers' scores at once."""
    return not allocation.needs_scores or allocation.needs_calibration


def __getattr__(name: str) -> Any:
    if name == "ONE_SHOT_ALLOCATIONS":
        deprecated(
            "`ONE_SHOT_ALLOCATIONS` is now `one_shot_allocations()` (a view of core.allocation.ALLOCATIONS); the old "
            "name still works"
        )
        return tuple(one_shot_allocations())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class OneShotOptions:
    """How to prune one-shot, validated at construction.

    Args:
        method: a name in :data:`ONE_SHOT_METHODS`: ``"magnitude"`` (``|W|``, no calibration), ``"wanda"``
            (``|W| * ||X||``) or ``"sparsegpt"`` (OBS weight update from ``X^T X``).
        sparsity: the overall target in (0, 1); with an N:M pattern it defaults to (and must be) ``1 - N/M``.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        owl: deprecated: ``allocation="owl"``. Read back, whether the allocation is OWL.
        owl_lambda, owl_m: OWL's ``lambda`` (sparsities within target +- lambda) and outlier threshold ``M``.
        per_row: compare scores within each output row (rows pruned alike to one weight, each layer's count
            exact), the Wanda paper's choice and its default; ``False``: within the layer (magnitude's default).
            Not for SparseGPT (its own mask selection).
        allocation: how the target is split over layers (see :func:`one_shot_allocations` and
            :mod:`~pat_callbacks.core.allocation`). Planned before pruning: ``"uniform"``, ``"erk"``, ``"er"`` (from
            shapes) and ``"owl"`` (:mod:`~pat_callbacks.core.owl`, from Wanda scores of the dense model; not with an
            N:M pattern). Comparing all layers' scores at once (``"global"``, ``"global_raw"``): they need
            ``per_row=False`` and ``sequential=False``, and not a method that updates weights (SparseGPT).
        sequential: prune layer group by layer group, each calibrated on the model pruned so far (see module doc).
        pipeline: one of :data:`PIPELINES`: how ``sequential`` calibration runs (the results are the same).
        offload: keep the model where it is and move one block at a time to ``device`` (``True``); ``"auto"``: when
            ``device`` is given and the model is elsewhere, or, with no ``device``, when the model is in CPU memory
            (e.g. larger than the GPU), CUDA is available, its blocks are found and no optimizer is given (so not
            from the Lightning callback, whose model is already where the Trainer put it).
        device: where blocks are calibrated and pruned when offloading (default: ``"cuda"`` when available).
        block_size, damping: SparseGPT's lazy-update block (128) and Hessian damping (0.01 of its mean diagonal).

    Example:
        >>> OneShotOptions("wanda", pattern="2:4").sparsity
        0.5
        >>> OneShotOptions("sparsegpt", 0.5, per_row=True)
        Traceback (most recent call last):
        ...
        ValueError: per_row=True is not for method='sparsegpt' (it selects its own masks, a block of columns at a \
time); leave per_row unset
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | Pattern = "unstructured"
    owl: bool = False
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    per_row: bool | None = None
    allocation: str = "uniform"
    sequential: bool = True
    block_size: int = 128
    damping: float = 0.01
    pipeline: str = "auto"
    offload: bool | str = "auto"
    device: str | None = None

    def __post_init__(self) -> None:
        self.method = ONE_SHOT_METHODS.check(self.method)
        algorithm = ONE_SHOT_METHODS[self.method]
        self.pattern = make_pattern(self.pattern)
        if isinstance(self.pattern, BlockPattern):
            raise ValueError(f"pattern={self.pattern.name!r}: one-shot pruning supports 'unstructured' and 'N:M'")
        fixed = self.pattern.fixed_sparsity
        if fixed is not None:
            if self.sparsity is None:
                self.sparsity = fixed
            if abs(float(self.sparsity) - fixed) > 1e-9:
                raise ValueError(
                    f"pattern={self.pattern.name!r} reaches sparsity {fixed:g}, but got sparsity={self.sparsity!r}"
                )
        if self.sparsity is None:
            raise ValueError("Expected `sparsity` (a float in (0, 1)) or an N:M `pattern`, but got neither")
        self.sparsity = check_fraction("sparsity", self.sparsity)
        if self.sparsity == 0.0:
            raise ValueError("Expected `sparsity` in (0, 1), but got 0.0 (nothing to prune)")
        given = f"allocation={self.allocation!r}"
        if self.owl:  # the former flag: the renaming helper's warning, naming the new form
            if self.allocation not in ("uniform", "owl"):
                raise ValueError(
                    f"Give `allocation='owl'` (the new form of `owl=True`), not both: got "
                    f"allocation={self.allocation!r} and owl=True"
                )
            deprecated("`owl=True` is now `allocation='owl'`; the old form still works", stacklevel=3)
            self.allocation, given = "owl", "owl=True"
        if self.allocation not in one_shot_allocations():
            raise ValueError(
                unknown_name_message("allocation", self.allocation, one_shot_allocations())
                + " (one-shot pruning has no loss to measure sensitivities with)"
                if self.allocation in ALLOCATIONS
                else unknown_name_message("allocation", self.allocation, one_shot_allocations())
            )
        allocation = ALLOCATIONS[self.allocation]
        self.owl = allocation.name == "owl"
        if allocation.needs_calibration and fixed is not None:
            raise ValueError(f"{given} sets a sparsity per layer, which pattern={self.pattern.name!r} fixes; use one")
        self.owl_lambda = check_owl_lambda(self.owl_lambda)
        self.owl_m = check_positive("owl_m", self.owl_m)
        if self.per_row not in (None, True, False):
            raise ValueError(f"Expected `per_row` to be True, False or None, but got {self.per_row!r}")
        if algorithm.updates_weights and self.per_row:
            raise ValueError(
                f"per_row=True is not for method={self.method!r} (it selects its own masks, a block of columns at a "
                "time); leave per_row unset"
            )
        if self.per_row is None:
            self.per_row = algorithm.per_row
        if not _planned_up_front(allocation):
            why = [
                reason
                for reason, bad in (
                    (f"method={self.method!r}", algorithm.updates_weights),
                    ("per_row=True", self.per_row),
                    ("sequential=True", self.sequential),
                    (f"pattern={self.pattern.name!r}", fixed is not None),
                )
                if bad
            ]
            if why:
                raise ValueError(
                    f"allocation={self.allocation!r} compares all layers at once: not with {', '.join(why)}"
                )
        self.sequential = bool(self.sequential)
        self.block_size = check_int("block_size", self.block_size, minimum=1)
        if isinstance(self.pattern, NMPattern) and self.block_size % self.pattern.m:
            raise ValueError(f"Expected `block_size` to be a multiple of M={self.pattern.m}, but got {self.block_size}")
        self.damping = check_positive("damping", self.damping)
        if self.pipeline not in PIPELINES:
            raise ValueError(f"Expected `pipeline` in {PIPELINES}, but got {self.pipeline!r}")
        if not (isinstance(self.offload, bool) or self.offload == "auto"):
            raise ValueError(f"Expected `offload` to be True, False or 'auto', but got {self.offload!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"Expected `device` to name a torch device, but got {self.device!r}") from error
            self.device = str(self.device)
        if self.offload is True and (self.pipeline == "whole" or not self.sequential):
            raise ValueError(
                "offload=True moves one block at a time: it needs sequential=True and pipeline 'auto' or 'blocks', "
                f"but got sequential={self.sequential!r}, pipeline={self.pipeline!r}"
            )

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration batches are read (a method or an allocation that reads calibration statistics)."""
        return bool(ONE_SHOT_METHODS[self.method].statistics) or ALLOCATIONS[self.allocation].needs_calibration

    @property
    def name(self) -> str:
        """E.g. ``wanda``, ``sparsegpt+owl``, ``magnitude 2:4`` (for reports): the method, ``+allocation`` where
        the allocation is planned from calibration statistics, and the N:M pattern."""
        allocation = f"+{self.allocation}" if ALLOCATIONS[self.allocation].needs_calibration else ""
        pattern = "" if self.pattern.fixed_sparsity is None else f" {self.pattern.name}"
        return f"{self.method}{allocation}{pattern}"


@dataclass
class OneShotResult:
    """What :func:`one_shot_prune` did: the masks (in ``pruner``) and what it measured on them.

    Attributes:
        options: the options used.
        pruner: the :class:`~pat_callbacks.core.pruner.Pruner` holding the masks (``pruner.mask_grads()`` /
            ``KeepSparsity`` keep them during recovery training).
        sparsity: pruned fraction of the targets, from the masks (the weights are exactly zero there).
        layer_sparsity: per target, from the masks.
        planned: per-target sparsities asked for (OWL's, or the target everywhere).
        calibration_batches: batches read per calibration pass (0 for plain magnitude).
        passes: calibration passes over the batches.
        seconds: wall time.
        pipeline: how the layer groups were calibrated: ``"blocks"`` (from cached block inputs), ``"whole"``
            (whole-model passes) or ``""`` (no sequential calibration).

    Example:
        >>> from torch import nn
        >>> result = one_shot_prune(nn.Linear(8, 4), "magnitude", 0.25)
        >>> result.sparsity, result.passes, sorted(result.masks)
        (0.25, 0, ['weight'])
    """

    options: OneShotOptions
    pruner: Pruner
    sparsity: float
    layer_sparsity: dict[str, float]
    planned: dict[str, float] = field(default_factory=dict)
    calibration_batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    pipeline: str = ""

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{name: bool keep-mask}``."""
        return self.pruner.masks


def one_shot_prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    owl: bool = False,
    calibration: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    pruner: Pruner | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    options: OneShotOptions | None = None,
    **kwargs: Any,
) -> OneShotResult:
    """Prune ``model`` once, in place, by ``method`` (see :class:`OneShotOptions`) from calibration batches.

    Args:
        model: the trained model (its weights are overwritten: pruned ones zeroed, SparseGPT updates the rest).
        method, sparsity, pattern: see :class:`OneShotOptions` (its other fields, e.g. ``allocation="owl"``, go in
            ``kwargs``); ``owl=True``: the former form of ``allocation="owl"`` (deprecated).
        calibration: the batches (held as a list: each layer group reads them again). Not needed for plain
            magnitude pruning.
        forward: ``forward(model, batch)`` runs one batch (default: ``model(batch[0])`` for tuples, else
            ``model(batch)``; e.g. ``lambda m, b: m(b[:, :-1])`` for token windows with their shifted target).
        pruner: an existing :class:`Pruner` to hold the masks (its pattern must be ``pattern``); default: a new one
            over the default targets of ``model`` (or ``include`` / ``exclude``).
        optimizers: their state of newly pruned entries is zeroed.
        options: a :class:`OneShotOptions` instead of ``method``, ``sparsity``, ``pattern``, ``owl``, ``kwargs``.

    Returns:
        A :class:`OneShotResult`; sparsity and per-layer values are counted on the masks, where the weights are 0.

    Example:
        >>> import torch
        >>> from pat_callbacks.app.models import CharGPT
        >>> torch.manual_seed(0) and None
        >>> net = CharGPT(vocab_size=10, context=8, dim=16, layers=2, heads=2)
        >>> windows = [torch.randint(0, 10, (4, 9)) for _ in range(2)]   # tokens + the shifted target
        >>> result = one_shot_prune(net, "sparsegpt", 0.7, allocation="owl", calibration=windows,
        ...                         forward=lambda model, batch: model(batch[:, :-1]))
        >>> round(result.sparsity, 2), result.passes                    # OWL's pass + one per transformer block
        (0.7, 3)
        >>> float((net.blocks[0].mlp[0].weight == 0).float().mean()) == result.layer_sparsity["blocks.0.mlp.0.weight"]
        True
    """
    opts = options if options is not None else OneShotOptions(method, sparsity, pattern, owl, **kwargs)
    algorithm = ONE_SHOT_METHODS[opts.method]()
    allocation = ALLOCATIONS[opts.allocation]
    start = time.perf_counter()
    if pruner is None:
        # An allocation planned from calibration statistics is the one-shot code's to plan (the Pruner only holds
        # the masks): the Pruner splits nothing itself.
        split = "uniform" if allocation.needs_calibration else opts.allocation
        pruner = Pruner(model, pattern=opts.pattern, allocation=split, include=include, exclude=exclude)
    elif include is not None or exclude is not None:
        raise TypeError("Give `include` / `exclude` or a `pruner`, not both")
    elif pruner.options.pattern.name != opts.pattern.name:  # type: ignore[union-attr]
        raise ValueError(
            f"The given pruner has pattern={pruner.options.pattern.name!r}, but one-shot pruning was asked for "  # type: ignore[union-attr]
            f"pattern={opts.pattern.name!r}"
        )
    algorithm.check(pruner.params)
    batches = _batches(calibration, opts)
    optimizers = list(optimizers)
    pipeline = _pipeline(model, pruner, opts, algorithm, batches, forward, optimizers)
    target = float(opts.sparsity)  # type: ignore[arg-type]
    passes = 0
    planned = _plan(model, pruner, opts, allocation, target, batches, forward)
    passes += int(allocation.needs_calibration)
    if not algorithm.statistics:
        _commit(pruner, opts, algorithm.scores(pruner.params, None, pruner.transposed), planned, target, optimizers)
    elif not opts.sequential and not algorithm.updates_weights:
        calib = _calibrate(model, list(pruner.params), algorithm.statistics, batches, forward)
        passes += 1
        _commit(pruner, opts, algorithm.scores(pruner.params, calib, pruner.transposed), planned, target, optimizers)
    else:
        passes += _prune_by_groups(model, pruner, opts, algorithm, planned, batches, forward, optimizers, pipeline)
    pruner.target_sparsity = target
    return OneShotResult(
        options=opts,
        pruner=pruner,
        sparsity=pruner.sparsity(),
        layer_sparsity=pruner.layer_sparsity(),
        planned=planned,
        calibration_batches=len(batches),
        passes=passes,
        seconds=time.perf_counter() - start,
        pipeline=_pipeline_name(opts, algorithm, pipeline),
    )


def _pipeline_name(opts: OneShotOptions, algorithm: OneShotMethod, pipeline: _Pipeline) -> str:
    if not algorithm.statistics or not (opts.sequential or algorithm.updates_weights):
        return ""
    return "blocks" if pipeline.blocks is not None and opts.sequential else "whole"


def _plan(
    model: nn.Module,
    pruner: Pruner,
    opts: OneShotOptions,
    allocation: Allocation,
    target: float,
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
) -> dict[str, float]:
    """Per-layer sparsities known before the method runs: by calibration statistics of the dense model (OWL: Wanda
    scores, one pass) or by shapes; the target everywhere where the allocation compares all layers' scores (the
    Pruner's ``prune_to`` then splits it)."""
    if allocation.needs_calibration:
        calib = _calibrate(model, list(pruner.params), ("norms",), batches, forward)
        scores = wanda_scores(pruner.params, {n: calib.norms(n) for n in pruner.params}, pruner.transposed)
        return allocation(scores, target, owl_lambda=opts.owl_lambda, owl_m=opts.owl_m)
    if not allocation.needs_scores:
        shapes = {name: torch.empty(tuple(p.shape), device="meta") for name, p in pruner.params.items()}
        return allocation(shapes, target)
    return dict.fromkeys(pruner.params, target)


def _batches(calibration: Iterable[Any] | None, opts: OneShotOptions) -> list[Any]:
    if not opts.needs_calibration:
        return []
    if calibration is None:
        owl = f" with allocation={opts.allocation!r}" if ALLOCATIONS[opts.allocation].needs_calibration else ""
        raise ValueError(f"method={opts.method!r}{owl} needs `calibration` batches")
    batches = list(calibration)
    if not batches:
        raise ValueError(f"method={opts.method!r} needs calibration batches, but `calibration` is empty")
    return batches


def _commit(
    pruner: Pruner,
    opts: OneShotOptions,
    scores: dict[str, Tensor],
    planned: Mapping[str, float],
    target: float,
    optimizers: list[torch.optim.Optimizer],
) -> None:
    """Masks from all layers' scores at once: the Pruner's allocation when layers are compared as wholes at one
    target (every allocation and pattern of the Pruner), else per layer / per row at the planned sparsities."""
    if not opts.per_row and not ALLOCATIONS[opts.allocation].needs_calibration:
        if not pruner.prune_to(target, scores=scores, optimizers=optimizers):
            raise ValueError(
                "one-shot scores hold NaN or Inf: the model's weights or calibration inputs are not finite"
            )
        return
    pruner.set_masks(_masks(pruner, opts, scores, planned), optimizers=optimizers)
