"""Former home of ``MaskedParameters``, now :class:`~pat_callbacks.core.masks.MaskStore`: one class owns masks.

``from pat_callbacks.core.masked import MaskedParameters`` still works, with a :class:`DeprecationWarning` naming the
new class; it is the same class (so ``isinstance`` agrees).

Example:
    >>> import warnings
    >>> from pat_callbacks.core.masks import MaskStore
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     from pat_callbacks.core.masked import MaskedParameters
    >>> MaskedParameters is MaskStore
    True
"""

from __future__ import annotations

import warnings
from typing import Any

from pat_callbacks.core.masks import MaskStore

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    if name == "MaskedParameters":
        warnings.warn(
            "`pat_callbacks.core.masked.MaskedParameters` is now `pat_callbacks.core.masks.MaskStore` (one class owns "
            "masks); the old name still works",
            DeprecationWarning,
            stacklevel=2,
        )
        return MaskStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
