"""Argument checks shared by schedules, criteria and callbacks.

Every check names the argument and echoes the bad value, so a typo in a config fails at construction
with a message that says what is allowed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any


def check_fraction(name: str, value: Any, *, allow_one: bool = False) -> float:
    """Return ``value`` as a float in ``[0, 1)`` (or ``[0, 1]``), else raise ``ValueError`` naming it.

    Example:
        >>> check_fraction("final_sparsity", 0.9)
        0.9
        >>> check_fraction("final_sparsity", 1.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `final_sparsity` to be a float in [0, 1), but got 1.0
    """
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise ValueError(f"Expected `{name}` to be a float in {interval}, but got {value!r}")
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value >= 0.0 and upper_ok):
        raise ValueError(f"Expected `{name}` to be a float in {interval}, but got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` as an int ``>= minimum``, else raise ``ValueError`` naming it.

    Example:
        >>> check_int("update_every", 100, minimum=1)
        100
        >>> check_int("update_every", 0, minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `update_every` to be an integer >= 1, but got 0
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, but got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float ``> 0``, else raise ``ValueError`` naming it.

    Example:
        >>> check_positive("power", 3)
        3.0
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not float(value) > 0 or math.isinf(float(value)):
        raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them.

    Example:
        >>> check_choice("allocation", "global", ["uniform", "global"])
        'global'
        >>> check_choice("allocation", "best", ["uniform", "global"])
        Traceback (most recent call last):
        ...
        ValueError: Unknown `allocation` 'best'; expected one of: 'global', 'uniform'
    """
    choices = sorted(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown `{name}` {value!r}; expected one of: {allowed}")
    return value


def check_number(name: str, value: Any, *, minimum: float = 0.0) -> float:
    """Return ``value`` as a finite float ``>= minimum``, else raise ``ValueError`` naming it.

    Example:
        >>> check_number("start_epoch", 1.5)
        1.5
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) or value < minimum:
        raise ValueError(f"Expected `{name}` to be a number >= {minimum:g}, but got {value!r}")
    return float(value)


def renamed(
    old: str, old_value: Any, new: str, new_value: Any, default: Any, *, warn: bool = True, stacklevel: int = 3
) -> tuple[Any, str]:
    """The one renaming helper for arguments: the value of an argument that was renamed, and the key it came from.
    ``old`` still works with a :class:`DeprecationWarning` naming both; giving both (``new`` not at its
    ``default``) is an error naming both. ``warn=False`` only resolves (for a caller that passes the value on to
    one that warns); ``stacklevel`` as in a :func:`warnings.warn` called here (3: the code that called the caller).

    Example:
        >>> renamed("regrow_fraction", None, "drop_fraction", 0.1, 0.0)
        (0.1, 'drop_fraction')
        >>> renamed("regrow_fraction", 0.2, "drop_fraction", 0.1, 0.0)
        Traceback (most recent call last):
        ...
        ValueError: Give `drop_fraction` (the new name of `regrow_fraction`), not both: got 0.1 and 0.2
    """
    if old_value is None:
        return new_value, new
    if new_value != default:
        raise ValueError(f"Give `{new}` (the new name of `{old}`), not both: got {new_value!r} and {old_value!r}")
    if warn:
        deprecated(f"`{old}` is now called `{new}`; the old name still works", stacklevel)
    return old_value, old


def renamed_choice(name: str, value: Any, renames: Mapping[str, str], *, why: str = "", stacklevel: int = 3) -> Any:
    """The one renaming helper for values: ``value``, or the new name of a renamed choice of argument ``name``, with
    a :class:`DeprecationWarning` naming both (``why``: what tells the two apart; ``stacklevel`` as in
    :func:`renamed`).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_choice("importance", "taylor", {"taylor": "group_taylor"})
        'group_taylor'
        >>> print(caught[0].message)
        importance='taylor' is now called 'group_taylor'; the old name still works
    """
    if not isinstance(value, str) or value not in renames:
        return value
    deprecated(f"{name}={value!r} is now called {renames[value]!r}{why}; the old name still works", stacklevel)
    return renames[value]


def deprecated(message: str, stacklevel: int = 2) -> None:
    """Warn that something is deprecated: a :class:`DeprecationWarning`, ``stacklevel`` as in a
    :func:`warnings.warn` called where ``deprecated`` is called (the one place the renaming helpers warn from)."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)
