"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity: A Missing Secret
Sauce for Pruning LLMs to High Sparsity"): layers with more outliers are pruned less.

For each layer (by default a transformer block: every target whose name shares the prefix up to the first numeric
part, e.g. ``net.blocks.3.``; a parameter on its own where names have no index), the outlier ratio ``D`` is the
fraction of its Wanda scores ``|W_ij| * ||X_j||`` above ``M`` times their mean over the layer. Ratios are mapped
linearly onto ``[0, 2 * lambda]`` and shifted so that the mean density is ``1 - target``:
``density = scaled D - mean(scaled D) + (1 - target)``; where one layer's outliers dominate this could leave the band,
so the sparsities are then shifted together and clipped to ``[target - lambda, target + lambda]``, the mean exact.
The paper's defaults (LLaMA, 70%): ``M = 5``, ``lambda = 0.08``; here ``owl_m`` and ``owl_lambda``.

OWL is an allocation (``allocation="owl"``, see :mod:`~pat_callbacks.core.allocation`): per-layer sparsities from
scores. :func:`~pat_callbacks.oneshot.prune.one_shot_prune` gives it Wanda scores from one calibration pass on the
dense model, as the paper does; a :class:`~pat_callbacks.core.pruner.Pruner` gives it its criterion's scores.

One deviation, on purpose: the mean is weighted by the layers' sizes, so the overall count is the target however
the layers differ in size (the paper's unweighted mean is the same thing for LLaMA's equal blocks).

Example:
    >>> import torch
    >>> scores = {"blocks.0.w": torch.ones(100), "blocks.1.w": torch.cat([torch.ones(90), 100 * torch.ones(10)])}
    >>> outlier_ratios(scores, m=5.0)  # block 1 has 10% outliers
    {'blocks.0': 0.0, 'blocks.1': 0.1}
    >>> {k: round(v, 4) for k, v in owl_sparsities(scores, 0.7).items()}
    {'blocks.0.w': 0.78, 'blocks.1.w': 0.62}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from pat_callbacks.core._validation import check_fraction, check_positive, renamed

__all__ = ["OWL_LAMBDA", "OWL_M", "check_owl_lambda", "layer_groups", "outlier_ratios", "owl_sparsities"]

OWL_LAMBDA = 0.08  # the paper's lambda for LLaMA-7B at 70%
OWL_M = 5.0  # the paper's outlier threshold M (x the layer's mean score)


def check_owl_lambda(value: object, key: str = "owl_lambda") -> float:
    """``value`` as a float in (0, 0.5) (OWL's sparsities lie within target +- lambda), else a ``ValueError``.

    Example:
        >>> check_owl_lambda(0.08)
        0.08
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 0.5:
        raise ValueError(f"Expected `{key}` in (0, 0.5), but got {value!r} (sparsities lie within target +- {key})")
    return float(value)


_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_groups(names: Iterable[str]) -> dict[str, str]:
    """``{parameter: layer}``: the prefix up to the first numeric part of the name (a block of a ``ModuleList`` or
    ``Sequential``), or the parameter's own name when it has none.

    Example:
        >>> layer_groups(["net.blocks.0.attn.in_proj_weight", "net.blocks.0.mlp.0.weight", "net.blocks.1.mlp.2.weight",
        ...               "conv1.weight"])
        {'net.blocks.0.attn.in_proj_weight': 'net.blocks.0', 'net.blocks.0.mlp.0.weight': 'net.blocks.0', \
'net.blocks.1.mlp.2.weight': 'net.blocks.1', 'conv1.weight': 'conv1.weight'}
    """
    groups = {}
    for name in names:
        match = _INDEX.match(name)
        groups[name] = match.group(1) if match else name
    return groups


def outlier_ratios(
    scores: Mapping[str, Tensor],
    *,
    owl_m: float = OWL_M,
    groups: Mapping[str, str] | None = None,
    m: float | None = None,
) -> dict[str, float]:
    """``{layer: fraction of its scores above owl_m x their mean}``, a layer's scores taken together (``m``: the
    former name of ``owl_m``).

    Example:
        >>> import torch
        >>> outlier_ratios({"a": torch.tensor([1.0, 1.0, 1.0, 9.0])}, owl_m=2.0)  # mean 3: one score above 6
        {'a': 0.25}
    """
    owl_m, key = renamed("m", m, "owl_m", owl_m, OWL_M)
    m = check_positive(key, owl_m)
    groups = dict(groups) if groups is not None else layer_groups(scores)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, layer in scores.items():
        totals[groups[name]] = totals.get(groups[name], 0.0) + float(layer.double().sum())
        counts[groups[name]] = counts.get(groups[name], 0) + layer.numel()
    above: dict[str, int] = dict.fromkeys(totals, 0)
    for name, layer in scores.items():
        group = groups[name]
        mean = totals[group] / max(counts[group], 1)
        above[group] += int((layer.double() > m * mean).sum())
    return {group: above[group] / max(counts[group], 1) for group in totals}


def owl_sparsities(
    scores: Mapping[str, Tensor],
    target: float,
    *,
    owl_lambda: float = OWL_LAMBDA,
    owl_m: float = OWL_M,
    groups: Mapping[str, str] | None = None,
    lam: float | None = None,
    m: float | None = None,
) -> dict[str, float]:
    """``{parameter: sparsity}`` by OWL for an overall ``target``: every parameter of a layer gets the layer's.

    Usable as ``PruningOptions(layer_sparsity=...)`` (names are glob patterns matching themselves), as the
    sparsities of :func:`~pat_callbacks.oneshot.wanda.row_masks`, or per layer in SparseGPT. Values are clipped to
    ``[target - owl_lambda, target + owl_lambda]`` (and ``[0, 1)``) keeping the size-weighted mean at ``target``:
    where one layer's outliers dominate, the others would fall outside the band; then all are shifted together and
    clipped to it (the layers' order kept). ``lam`` and ``m``: the former names of
    ``owl_lambda`` and ``owl_m``.

    Example:
        >>> import torch
        >>> owl_sparsities({"a": torch.ones(4), "b": torch.ones(4)}, 0.5)  # no outliers anywhere: uniform
        {'a': 0.5, 'b': 0.5}
        >>> owl_sparsities({"a": torch.ones(4)}, 0.5, owl_lambda=0.7)
        Traceback (most recent call last):
        ...
        ValueError: Expected `owl_lambda` in (0, 0.5), but got 0.7 (sparsities lie within target +- owl_lambda)
    """
    target = check_fraction("target", target)
    lam, lam_key = renamed("lam", lam, "owl_lambda", owl_lambda, OWL_LAMBDA)
    owl_m, _ = renamed("m", m, "owl_m", owl_m, OWL_M)
    lam = check_owl_lambda(lam, lam_key)
    groups = dict(groups) if groups is not None else layer_groups(scores)
    ratios = outlier_ratios(scores, owl_m=owl_m, groups=groups)
    sizes: dict[str, int] = {}
    for name, layer in scores.items():
        sizes[groups[name]] = sizes.get(groups[name], 0) + layer.numel()
    low, high = min(ratios.values()), max(ratios.values())
    if high == low:
        return dict.fromkeys(scores, target)
    scaled = {g: (r - low) / (high - low) * 2 * lam for g, r in ratios.items()}
    mean = sum(scaled[g] * sizes[g] for g in scaled) / sum(sizes.values())
    density = {g: s - mean + (1.0 - target) for g, s in scaled.items()}
    sparsity = {g: 1.0 - d for g, d in density.items()}
    low_s, high_s = max(target - lam, 0.0), min(target + lam, 1.0 - 1e-6)
    if any(not low_s <= s <= high_s for s in sparsity.values()):
        sparsity = _within_band(scaled, sizes, target, low_s, high_s)
    return {name: sparsity[groups[name]] for name in scores}


def _within_band(
    scaled: Mapping[str, float], sizes: Mapping[str, int], target: float, low: float, high: float
) -> dict[str, float]:
    """Sparsities ``clip(target + shift - scaled, low, high)`` whose size-weighted mean is ``target``: the shift
    found by bisection (the mean rises with it), so the order of the layers is kept, every layer lies in the band
    ``[low, high]`` and the overall count stays the target (one layer's outliers dominating no longer pushes the
    others out of ``target +- owl_lambda``).

    Example:
        >>> out = _within_band({"a": 0.0, "b": 0.0, "c": 0.16}, {"a": 1, "b": 1, "c": 1}, 0.9, 0.82, 0.98)
        >>> {k: round(v, 6) for k, v in out.items()}
        {'a': 0.94, 'b': 0.94, 'c': 0.82}
    """
    total = sum(sizes.values())

    def at(shift: float) -> dict[str, float]:
        return {g: min(max(target + shift - s, low), high) for g, s in scaled.items()}

    def mean(shift: float) -> float:
        values = at(shift)
        return sum(values[g] * sizes[g] for g in values) / total

    lo, hi = -2.0, 2.0 + max(scaled.values())
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return at((lo + hi) / 2)
