"""Which parameters are pruned.

By default: the ``weight`` of every ``Linear`` and ``Conv*`` layer; biases, norm layers and embeddings are
left dense. ``include`` / ``exclude`` take glob patterns over parameter names (``"features.*.weight"``);
a pattern that matches nothing is an error, since it is almost always a typo.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    >>> list(select_parameters(model))
    ['0.weight', '2.weight']
    >>> list(select_parameters(model, exclude=["2.*"]))
    ['0.weight']
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["DEFAULT_MODULE_TYPES", "normalize_patterns", "select_parameters"]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def normalize_patterns(name: str, patterns: str | Sequence[str] | None) -> tuple[str, ...]:
    """Turn ``None``, one pattern or a list of patterns into a tuple of strings, refusing anything else.

    Example:
        >>> normalize_patterns("exclude", "fc.*")
        ('fc.*',)
        >>> normalize_patterns("exclude", [3])
        Traceback (most recent call last):
        ...
        ValueError: Expected `exclude` to be a glob pattern or a list of them, but got [3]
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    items = tuple(patterns) if isinstance(patterns, Sequence) else None
    if items is None or not all(isinstance(p, str) and p for p in items):
        raise ValueError(f"Expected `{name}` to be a glob pattern or a list of them, but got {patterns!r}")
    return items


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    module_types: tuple[type[nn.Module], ...] = DEFAULT_MODULE_TYPES,
) -> dict[str, nn.Parameter]:
    """Return ``{name: parameter}`` of the parameters to prune, in model order.

    Args:
        model: the module whose parameters are searched (``named_parameters`` names).
        include: glob patterns; when given, every parameter whose name matches one is a target,
            whatever its module type. When ``None``, the ``weight`` of each ``module_types`` layer is.
        exclude: glob patterns removed from the targets.
        module_types: layer types whose ``weight`` is a default target.

    Raises:
        ValueError: a pattern matches no parameter, or nothing is left to prune.

    Example:
        >>> from torch import nn
        >>> list(select_parameters(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), include=["1.*"]))
        ['1.weight', '1.bias']
    """
    include = normalize_patterns("include", include)
    exclude = normalize_patterns("exclude", exclude)
    named = dict(model.named_parameters())
    if include:
        for pattern in include:
            if not any(fnmatchcase(name, pattern) for name in named):
                raise ValueError(_no_match("include", pattern, named))
        candidates = {n: p for n, p in named.items() if any(fnmatchcase(n, pat) for pat in include)}
    else:
        candidates = {}
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, module_types) and isinstance(weight, nn.Parameter):
                candidates[f"{module_name}.weight" if module_name else "weight"] = weight
    for pattern in exclude:
        if not any(fnmatchcase(name, pattern) for name in named):
            raise ValueError(_no_match("exclude", pattern, named))
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in candidates.items():
        if any(fnmatchcase(name, pat) for pat in exclude) or id(param) in seen:
            continue
        seen.add(id(param))
        selected[name] = param
    if not selected:
        raise ValueError(
            f"No parameter to prune in {type(model).__name__} (include={list(include)}, exclude={list(exclude)}); "
            f"by default the weights of {', '.join(t.__name__ for t in module_types)} layers are pruned"
        )
    return selected


def _no_match(argument: str, pattern: str, named: dict[str, nn.Parameter]) -> str:
    sample = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
    return f"`{argument}` pattern {pattern!r} matches no parameter; parameter names are: {sample}"
