"""Sequential one-shot calibration: the layer groups pruned in order, each calibrated on the model pruned so far,
by whole-model passes or block by block from cached block inputs (:mod:`~pat_callbacks.oneshot.blocks`), with the
validation that runs before any weight changes. Used by :func:`~pat_callbacks.oneshot.prune.one_shot_prune`.

Example:
    >>> _groups(["blocks.0.a.weight", "blocks.0.b.weight", "blocks.1.a.weight", "head.weight"])
    [['blocks.0.a.weight', 'blocks.0.b.weight'], ['blocks.1.a.weight'], ['head.weight']]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.owl import layer_groups
from pat_callbacks.core.patterns import NMPattern, Pattern
from pat_callbacks.core.pruner import Pruner
from pat_callbacks.oneshot.blocks import BlockInputs, Blocks, check_forward, find_blocks, offloaded
from pat_callbacks.oneshot.calibration import Calibration, input_readers
from pat_callbacks.oneshot.wanda import row_masks

if TYPE_CHECKING:
    from pat_callbacks.oneshot.methods import OneShotMethod
    from pat_callbacks.oneshot.prune import OneShotOptions

__all__: list[str] = []

_log = logging.getLogger(__name__)


def _calibrate(
    model: nn.Module,
    names: list[str],
    statistics: Sequence[str],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
) -> Calibration:
    """One calibration pass collecting ``statistics`` (``"norms"``, ``"hessians"``) of ``names``."""
    calib = Calibration(model, names, norms="norms" in statistics, hessians="hessians" in statistics)
    return _finite(calib.collect(batches, forward))


def _finite(calib: Calibration) -> Calibration:
    """``calib``, refused (naming the targets) when its statistics hold NaN or Inf."""
    bad = [
        name
        for table in (calib.sq_norms, calib.hessians)
        for name, value in table.items()
        if not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise ValueError(
            f"The calibration inputs of {sorted(set(bad))} hold NaN or Inf: the calibration data or the model's "
            "activations are not finite"
        )
    return calib


@dataclass
class _Pipeline:
    """How a sequential calibration runs: ``blocks`` (``None``: whole-model passes) and the ``device`` blocks move
    to (``None``: none moves)."""

    blocks: Blocks | None = None
    device: torch.device | None = None


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _pipeline(
    model: nn.Module,
    pruner: Pruner,
    opts: OneShotOptions,
    algorithm: OneShotMethod,
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    optimizers: list[torch.optim.Optimizer],
) -> _Pipeline:
    """Validate before anything changes (names; one dense forward of the first batch reaching every target on
    finite inputs) and choose the pipeline: the model's blocks, or whole-model passes (with why)."""
    if not batches:
        return _Pipeline()
    readers = input_readers(model, pruner.params)  # every target's input readable, or refused by name
    blocks, why = None, ""
    groups = _groups(list(pruner.params)) if opts.sequential else []
    if opts.sequential and algorithm.statistics and opts.pipeline != "whole":
        blocks, why = find_blocks(model, pruner.params)
        if blocks is not None:
            why = _layout_problem(groups, blocks)
            blocks = None if why else blocks
    chain = check_forward(model, readers, batches[0], forward, blocks)
    if chain:
        blocks, why = None, f"{type(model).__name__}'s blocks cannot be run one by one: {chain}"
    device, chosen = _offload_device(model, opts)
    if chosen and (blocks is None or optimizers or not algorithm.statistics):
        device = None  # the automatic offload applies only where it can run: the model stays where it is
    elif chosen:
        _log.info(
            "one-shot: the model is in CPU memory and CUDA is available: its blocks are calibrated on %s one "
            "at a time (offload=False calibrates it where it is)",
            device,
        )
    if blocks is None and opts.sequential and algorithm.statistics and opts.pipeline != "whole":
        if opts.pipeline == "blocks" or device is not None:
            asked = "pipeline='blocks'" if opts.pipeline == "blocks" else f"offloading to {device}"
            raise ValueError(f"{asked} needs the model's blocks, but {why}")
        _log.info("one-shot calibration runs the whole model per layer group: %s", why)
    if device is not None and optimizers:
        raise ValueError("offloading keeps optimizer state where it is: give no `optimizers` when offloading")
    return _Pipeline(blocks, device)


def _offload_device(model: nn.Module, opts: OneShotOptions) -> tuple[torch.device | None, bool]:
    """The device blocks move to one at a time (``None``: the model is calibrated where it is), and whether
    ``offload="auto"`` chose it: a model held in CPU memory while CUDA is available (one too large for the GPU, or
    left there) is calibrated on the GPU one block at a time."""
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    chosen = False
    if opts.device is not None:
        device = torch.device(opts.device)
    elif opts.offload is True or (opts.offload == "auto" and home.type == "cpu"):
        device = torch.device("cuda") if torch.cuda.is_available() else home
        chosen = opts.offload == "auto" and device.type == "cuda"
    else:
        device = home
    offload = (not _same_device(device, home)) if opts.offload == "auto" else bool(opts.offload)
    if not offload:
        if not _same_device(device, home):
            raise ValueError(
                f"device={opts.device!r}, but the model is on {home} and offload=False: move the model there, or "
                "offload=True (one block at a time)"
            )
        return None, False
    return device, chosen


def _groups(names: list[str]) -> list[list[str]]:
    """The layer groups of ``names``, in order (see :func:`~pat_callbacks.core.owl.layer_groups`)."""
    by_group: dict[str, list[str]] = {}
    for name, group in layer_groups(names).items():
        by_group.setdefault(group, []).append(name)
    return list(by_group.values())


def _split(groups: list[list[str]], blocks: Blocks) -> tuple[list[list[str]], dict[int, list[str]], list[list[str]]]:
    """Groups before the blocks, the groups of the blocks by index, groups after (see :func:`_layout_problem`)."""
    index = {blocks.name(i): i for i in range(len(blocks.modules))}
    before: list[list[str]] = []
    inside: dict[int, list[str]] = {}
    after: list[list[str]] = []
    for group in groups:
        at = index.get(layer_groups(group[:1])[group[0]])
        if at is not None:
            inside[at] = group
        else:
            (after if inside else before).append(group)
    return before, inside, after


def _layout_problem(groups: list[list[str]], blocks: Blocks) -> str:
    """Why the layer groups are not ``[outside...] block groups in order [outside...]`` (``""`` when they are)."""
    index = {blocks.name(i): i for i in range(len(blocks.modules))}
    start = f"{blocks.prefix}." if blocks.prefix else ""
    seen: list[int] = []
    after = False
    for group in groups:
        at = index.get(layer_groups(group[:1])[group[0]])
        if at is None:
            if any(name.startswith(start) for name in group):
                return f"the layer group of {group[0]!r} is not one of the blocks {blocks.prefix!r}"
            after = after or bool(seen)
            continue
        if after or (seen and at <= seen[-1]):
            return f"the layer groups are not in block order around {blocks.name(at)!r}"
        seen.append(at)
    if not seen:
        return f"no target lies in the blocks {blocks.prefix!r}"
    return ""


def _layer_mask(pruner: Pruner, name: str, scores: Tensor, sparsity: float) -> Tensor:
    """The pattern's mask of one layer compared as a whole (N:M groups along the inputs of in x out matrices)."""
    pattern: Pattern = pruner.options.pattern  # type: ignore[assignment]
    if not isinstance(pattern, NMPattern):  # every layer keeps a weight, as the Pruner's and Wanda's rows do
        sparsity = min(sparsity, (scores.numel() - 1) / scores.numel())
    if name in pruner.transposed and scores.dim() == 2:
        return pattern.mask(scores.t(), sparsity).t()
    return pattern.mask(scores, sparsity)


def _masks(
    pruner: Pruner, opts: OneShotOptions, scores: Mapping[str, Tensor], planned: Mapping[str, float]
) -> dict[str, Tensor]:
    """Masks of scored layers at their planned sparsities: per output row (unstructured ``per_row``) or per layer."""
    if opts.per_row and not isinstance(opts.pattern, NMPattern):
        return row_masks(scores, {n: planned[n] for n in scores}, pruner.transposed)
    masks = {name: _layer_mask(pruner, name, layer, planned[name]) for name, layer in scores.items()}
    pruner.planner.warn_nearly_empty({n: 1 - int(m.sum()) / m.numel() for n, m in masks.items()}, None, owner=opts.name)
    return masks


def _prune_by_groups(
    model: nn.Module,
    pruner: Pruner,
    opts: OneShotOptions,
    algorithm: OneShotMethod,
    planned: Mapping[str, float],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    optimizers: list[torch.optim.Optimizer],
    pipeline: _Pipeline | None = None,
) -> int:
    """A calibrated method a layer group at a time (or all at once, ``sequential=False``), by whole-model passes
    or block by block (``pipeline``); returns the calibration passes made (one per group)."""
    names = list(pruner.params)
    groups = _groups(names) if opts.sequential else [names]
    blocks = pipeline.blocks if pipeline is not None else None

    def by_whole_passes(group: list[str]) -> None:
        stats = _calibrate(model, group, algorithm.statistics, batches, forward)
        _prune_group(pruner, opts, algorithm, planned, group, stats, optimizers)

    if blocks is None:
        for group in groups:
            by_whole_passes(group)
        return len(groups)
    device = pipeline.device if pipeline is not None else None
    before, inside, after = _split(groups, blocks)
    for group in before:
        by_whole_passes(group)
    inputs = BlockInputs.capture(model, blocks, batches, forward, device)
    last = max(inside)
    for index in range(last + 1):
        block = blocks.modules[index]
        with offloaded(block, device):
            if index in inside:
                group = inside[index]
                calib = Calibration(
                    model, group, norms="norms" in algorithm.statistics, hessians="hessians" in algorithm.statistics
                )
                calib.collect(
                    range(len(batches)), lambda _, i, b=block: inputs.run(b, i), mask_of=inputs.masks.__getitem__
                )
                _prune_group(pruner, opts, algorithm, planned, group, _finite(calib), optimizers)
            if index < last:
                inputs.advance(block)  # the pruned block's outputs: the next block's inputs
        if device is not None:
            pruner.to_devices()  # the masks follow the block back
    inputs.hidden, inputs.arguments = [], []  # the cached activations freed before the groups after the blocks
    for group in after:
        by_whole_passes(group)
    return len(groups)


def _prune_group(
    pruner: Pruner,
    opts: OneShotOptions,
    algorithm: OneShotMethod,
    planned: Mapping[str, float],
    group: list[str],
    calib: Calibration,
    optimizers: list[torch.optim.Optimizer],
) -> None:
    """Masks of one calibrated group, committed (the pruned weights zeroed: later groups calibrate on them)."""
    if algorithm.updates_weights:
        masks = {name: algorithm.prune_layer(pruner, name, calib, planned[name], opts) for name in group}
    else:
        params = {name: pruner.params[name] for name in group}
        masks = _masks(pruner, opts, algorithm.scores(params, calib, pruner.transposed), planned)
    del calib
    pruner.set_masks(masks, optimizers=optimizers)
