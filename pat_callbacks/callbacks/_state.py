"""Finding a callback's saved state in a checkpoint when its arguments, hence its ``state_key``, changed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def saved_state_key(callback: Any, callbacks: Sequence[Any], states: dict[str, Any]) -> str | None:
    """The key of ``callback``'s state in a checkpoint's ``states``: its own ``state_key`` if present, else the
    state saved by the same class at the same position among the instances whose keys are not found.

    Example:
        >>> class C:
        ...     def __init__(self, key): self.state_key = key
        >>> new = C("C{'sparsity': 0.9}")
        >>> saved_state_key(new, [new], {"C{'sparsity': 0.8}": {}})
        "C{'sparsity': 0.8}"
    """
    if callback.state_key in states:
        return callback.state_key
    prefix = f"{type(callback).__qualname__}{{"
    claimed = {cb.state_key for cb in callbacks if cb is not callback}
    candidates = [key for key in states if isinstance(key, str) and key.startswith(prefix) and key not in claimed]
    unmatched = [cb for cb in callbacks if type(cb) is type(callback) and cb.state_key not in states]
    position = next(i for i, cb in enumerate(unmatched) if cb is callback)
    return candidates[position] if position < len(candidates) else None
