"""One-shot pruning of a trained model from calibration data: :func:`one_shot_prune` (magnitude, Wanda, SparseGPT,
each with or without OWL layer-wise sparsities), leaving the model's pruned weights exactly zero and a
:class:`~pat_callbacks.core.pruner.Pruner` holding the masks for recovery training.

Layers are pruned in order, a layer group at a time (``sequential=True``, as both reference implementations do):
each group (a transformer block, see :func:`~pat_callbacks.oneshot.owl.layer_groups`) is calibrated on the model
whose earlier groups are already pruned, so it sees the inputs it will get; statistics exist for one group at a
time. ``sequential=False`` calibrates every layer once, on the dense model (needed by the global allocations).
Calibration costs one pass over the batches per group (plus one for OWL's outlier ratios, on the dense model).

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

from pat_callbacks.core._validation import check_choice, check_fraction, check_int, check_positive
from pat_callbacks.core.patterns import BlockPattern, NMPattern, Pattern, make_pattern
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.core.sharding import local
from pat_callbacks.oneshot.calibration import Calibration
from pat_callbacks.oneshot.owl import OWL_LAMBDA, OWL_M, layer_groups, owl_sparsities
from pat_callbacks.oneshot.sparsegpt import refuse_sharded, sparsegpt_prune
from pat_callbacks.oneshot.wanda import row_masks, wanda_scores

__all__ = ["ONE_SHOT_ALLOCATIONS", "ONE_SHOT_METHODS", "OneShotOptions", "OneShotResult", "one_shot_prune"]

ONE_SHOT_METHODS = ("magnitude", "wanda", "sparsegpt")
ONE_SHOT_ALLOCATIONS = ("uniform", "global", "global_raw", "erk", "er")


@dataclass
class OneShotOptions:
    """How to prune one-shot, validated at construction.

    Args:
        method: ``"magnitude"`` (``|W|``, no calibration), ``"wanda"`` (``|W| * ||X||``) or ``"sparsegpt"``
            (OBS weight update from ``X^T X``).
        sparsity: the overall target in (0, 1); with an N:M pattern it defaults to (and must be) ``1 - N/M``.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        owl: per-layer sparsities by OWL (:mod:`~pat_callbacks.oneshot.owl`) instead of the same for every layer;
            unstructured only.
        owl_lambda, owl_m: OWL's ``lambda`` (sparsities within target +- lambda) and outlier threshold ``M``.
        per_row: compare scores within each output row (rows pruned alike to one weight, each layer's count
            exact), the Wanda paper's choice and its default; ``False``: within the layer (magnitude's default).
            Not for SparseGPT (its own mask selection).
        allocation: how a layer-compared target is split over layers (``"uniform"``; ``"global"``,
            ``"global_raw"``, ``"erk"``, ``"er"``: see :mod:`~pat_callbacks.core.allocation`; they need
            ``per_row=False``, ``owl=False`` and ``sequential=False``; not for SparseGPT).
        sequential: prune layer group by layer group, each calibrated on the model pruned so far (see module doc).
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

    def __post_init__(self) -> None:
        self.method = check_choice("method", self.method, ONE_SHOT_METHODS)
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
        self.owl = bool(self.owl)
        if self.owl and fixed is not None:
            raise ValueError(f"owl=True sets a sparsity per layer, which pattern={self.pattern.name!r} fixes; use one")
        if not 0.0 < float(self.owl_lambda) < 0.5:
            raise ValueError(f"Expected `owl_lambda` in (0, 0.5), but got {self.owl_lambda!r}")
        self.owl_lambda = float(self.owl_lambda)
        self.owl_m = check_positive("owl_m", self.owl_m)
        if self.per_row not in (None, True, False):
            raise ValueError(f"Expected `per_row` to be True, False or None, but got {self.per_row!r}")
        if self.method == "sparsegpt" and self.per_row:
            raise ValueError(
                "per_row=True is not for method='sparsegpt' (it selects its own masks, a block of columns at a "
                "time); leave per_row unset"
            )
        if self.per_row is None:
            self.per_row = self.method == "wanda"
        self.allocation = check_choice("allocation", self.allocation, ONE_SHOT_ALLOCATIONS)
        if self.allocation != "uniform":
            why = [
                reason
                for reason, bad in (
                    ("method='sparsegpt'", self.method == "sparsegpt"),
                    ("per_row=True", self.per_row),
                    ("owl=True", self.owl),
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

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration batches are read (every method but plain magnitude)."""
        return self.method != "magnitude" or self.owl

    @property
    def name(self) -> str:
        """E.g. ``wanda``, ``sparsegpt+owl``, ``magnitude 2:4`` (for reports)."""
        owl = "+owl" if self.owl else ""
        pattern = "" if self.pattern.fixed_sparsity is None else f" {self.pattern.name}"
        return f"{self.method}{owl}{pattern}"


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
        method, sparsity, pattern, owl: see :class:`OneShotOptions` (its other fields go in ``kwargs``).
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
        >>> result = one_shot_prune(net, "sparsegpt", 0.7, owl=True, calibration=windows,
        ...                         forward=lambda model, batch: model(batch[:, :-1]))
        >>> round(result.sparsity, 2), result.passes                    # OWL's pass + one per transformer block
        (0.7, 3)
        >>> float((net.blocks[0].mlp[0].weight == 0).float().mean()) == result.layer_sparsity["blocks.0.mlp.0.weight"]
        True
    """
    opts = options if options is not None else OneShotOptions(method, sparsity, pattern, owl, **kwargs)
    start = time.perf_counter()
    if pruner is None:
        pruner = Pruner(model, pattern=opts.pattern, allocation=opts.allocation, include=include, exclude=exclude)
    elif include is not None or exclude is not None:
        raise TypeError("Give `include` / `exclude` or a `pruner`, not both")
    elif pruner.options.pattern.name != opts.pattern.name:  # type: ignore[union-attr]
        raise ValueError(
            f"The given pruner has pattern={pruner.options.pattern.name!r}, but one-shot pruning was asked for "  # type: ignore[union-attr]
            f"pattern={opts.pattern.name!r}"
        )
    if opts.method == "sparsegpt":
        refuse_sharded(pruner.params)
    batches = _batches(calibration, opts)
    optimizers = list(optimizers)
    target = float(opts.sparsity)  # type: ignore[arg-type]
    passes = 0
    planned = dict.fromkeys(pruner.params, target)
    if opts.owl:
        calib = Calibration(model, pruner.params).collect(batches, forward)
        passes += 1
        scores = wanda_scores(pruner.params, {n: calib.norms(n) for n in pruner.params}, pruner.transposed)
        planned = owl_sparsities(scores, target, lam=opts.owl_lambda, m=opts.owl_m)
        del scores, calib
    if opts.method == "magnitude":
        scores = {name: local(p).detach().abs().float() for name, p in pruner.params.items()}
        _commit(pruner, opts, scores, planned, target, optimizers)
    elif not opts.sequential and opts.method == "wanda":
        calib = Calibration(model, pruner.params).collect(batches, forward)
        passes += 1
        scores = wanda_scores(pruner.params, {n: calib.norms(n) for n in pruner.params}, pruner.transposed)
        _commit(pruner, opts, scores, planned, target, optimizers)
    else:
        passes += _prune_by_groups(model, pruner, opts, planned, batches, forward, optimizers)
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
    )


def _batches(calibration: Iterable[Any] | None, opts: OneShotOptions) -> list[Any]:
    if not opts.needs_calibration:
        return []
    if calibration is None:
        raise ValueError(f"method={opts.method!r}{' with owl=True' if opts.owl else ''} needs `calibration` batches")
    batches = list(calibration)
    if not batches:
        raise ValueError(f"method={opts.method!r} needs calibration batches, but `calibration` is empty")
    return batches


def _layer_mask(pruner: Pruner, name: str, scores: Tensor, sparsity: float) -> Tensor:
    """The pattern's mask of one layer compared as a whole (N:M groups along the inputs of in x out matrices)."""
    pattern: Pattern = pruner.options.pattern  # type: ignore[assignment]
    if name in pruner.transposed and scores.dim() == 2:
        return pattern.mask(scores.t(), sparsity).t()
    return pattern.mask(scores, sparsity)


def _masks(
    pruner: Pruner, opts: OneShotOptions, scores: Mapping[str, Tensor], planned: Mapping[str, float]
) -> dict[str, Tensor]:
    """Masks of scored layers at their planned sparsities: per output row (unstructured ``per_row``) or per layer."""
    if opts.per_row and not isinstance(opts.pattern, NMPattern):
        return row_masks(scores, {n: planned[n] for n in scores}, pruner.transposed)
    return {name: _layer_mask(pruner, name, layer, planned[name]) for name, layer in scores.items()}


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
    if not opts.per_row and not opts.owl:
        if not pruner.prune_to(target, scores=scores, optimizers=optimizers):
            raise ValueError(
                "one-shot scores hold NaN or Inf: the model's weights or calibration inputs are not finite"
            )
        return
    pruner.set_masks(_masks(pruner, opts, scores, planned), optimizers=optimizers)


def _prune_by_groups(
    model: nn.Module,
    pruner: Pruner,
    opts: OneShotOptions,
    planned: Mapping[str, float],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    optimizers: list[torch.optim.Optimizer],
) -> int:
    """Wanda (sequential) or SparseGPT, a layer group at a time; returns the calibration passes made."""
    names = list(pruner.params)
    if opts.sequential:
        by_group: dict[str, list[str]] = {}
        for name, group in layer_groups(names).items():
            by_group.setdefault(group, []).append(name)
        groups = list(by_group.values())
    else:
        groups = [names]
    sparsegpt = opts.method == "sparsegpt"
    for group in groups:
        calib = Calibration(model, group, norms=not sparsegpt, hessians=sparsegpt).collect(batches, forward)
        if sparsegpt:
            masks = {
                name: _sparsegpt_layer(pruner, name, calib.pop_hessian(name), planned[name], opts) for name in group
            }
        else:
            params = {name: pruner.params[name] for name in group}
            scores = wanda_scores(params, {n: calib.norms(n) for n in group}, pruner.transposed)
            masks = _masks(pruner, opts, scores, planned)
        del calib
        pruner.set_masks(masks, optimizers=optimizers)  # zeroes them: the next group calibrates on the pruned model
    return len(groups)


@torch.no_grad()
def _sparsegpt_layer(pruner: Pruner, name: str, hessian: Tensor, sparsity: float, opts: OneShotOptions) -> Tensor:
    """SparseGPT on one parameter: its updated weights written back, its keep-mask returned (the Hessian freed)."""
    param = pruner.params[name]
    weight = local(param).detach()
    flipped = name in pruner.transposed
    matrix = weight.t() if flipped else weight.reshape(weight.shape[0], -1)
    nm = (opts.pattern.n, opts.pattern.m) if isinstance(opts.pattern, NMPattern) else None
    new, mask = sparsegpt_prune(matrix, hessian, sparsity, nm=nm, block_size=opts.block_size, damping=opts.damping)
    del hessian
    if flipped:
        new, mask = new.t(), mask.t()
    weight.copy_(new.reshape(weight.shape).to(weight.dtype))
    return mask.reshape(weight.shape)
