"""A Hydra schema checked against its callback's signature: :func:`schema_drift` (kept out of
:mod:`pat_callbacks.app.config`, which every Hydra app of the environment imports through the search-path plugin).
"""

import dataclasses
import inspect
from dataclasses import fields

from pat_callbacks.app.config import conf_type
from pat_callbacks.core.windows import WindowArguments

__all__ = ["schema_drift"]


def schema_drift(schema: type, callback: type) -> list[str]:
    """How a config schema differs from its callback's ``__init__`` (empty: in step): an argument missing from
    the schema, a field that is no argument, a field whose type (:func:`conf_type`) or default is not the
    argument's, unless the schema declares it in ``left_out`` / ``differs``; a declaration naming no argument.
    The window arguments of a callback taking ``**window`` are its arguments too.

    Example:
        >>> from dataclasses import dataclass
        >>> from typing import Optional
        >>> class Callback:
        ...     def __init__(self, sparsity: float = 0.5, *, end_step: "int | None" = None): ...
        >>> @dataclass
        ... class CallbackConf:
        ...     _target_: str = "Callback"
        ...     sparsity: float = 0.9
        ...     stop_step: Optional[int] = None
        >>> for line in schema_drift(CallbackConf, Callback): print(line)
        sparsity: default 0.9, but the argument's is 0.5
        end_step: an argument of Callback missing from CallbackConf
        stop_step: a field of CallbackConf but no argument of Callback
    """
    params = list(inspect.signature(callback.__init__).parameters.values())[1:]
    arguments = {p.name: (p.annotation, p.default) for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        arguments.update({key: (kind, None) for key, kind in WindowArguments.__annotations__.items()})
    left_out, differs = getattr(schema, "left_out", {}), getattr(schema, "differs", {})
    found = {f.name: f for f in fields(schema) if f.name != "_target_"}
    drift = []
    for name, (annotation, default) in arguments.items():
        if name in left_out or name in differs:
            continue
        if name not in found:
            drift.append(f"{name}: an argument of {callback.__name__} missing from {schema.__name__}")
            continue
        value = found[name].default
        if value is dataclasses.MISSING and found[name].default_factory is not dataclasses.MISSING:
            value = found[name].default_factory()
        expected = list(default) if isinstance(default, tuple) else default
        if value != expected or type(value) is not type(expected):
            drift.append(f"{name}: default {value!r}, but the argument's is {default!r}")
        if found[name].type != conf_type(annotation):
            drift.append(
                f"{name}: type {found[name].type}, but the argument's is {annotation} ({conf_type(annotation)})"
            )
    drift += [
        f"{name}: a field of {schema.__name__} but no argument of {callback.__name__}"
        for name in found
        if name not in arguments
    ]
    stale = sorted((set(left_out) | set(differs)) - set(arguments))
    drift += [f"{name}: declared by {schema.__name__} but no argument of {callback.__name__}" for name in stale]
    return drift
