"""Enumerated values of the Hydra schemas, so a bad value fails when the config is composed, naming the key and the
allowed values (kept apart from :mod:`pat_callbacks.app.config`, which must stay under the module size limit).

Example:
    >>> from dataclasses import dataclass
    >>> from omegaconf import OmegaConf
    >>> @dataclass
    ... class Conf:
    ...     history_dtype: HistoryDtype = HistoryDtype.bfloat16
    >>> OmegaConf.merge(OmegaConf.structured(Conf), {"history_dtype": "float16"})
    Traceback (most recent call last):
    ...
    omegaconf.errors.ValidationError: Invalid value 'float16', expected one of [bfloat16, float32]
        full_key: history_dtype
        object_type=Conf
"""

from enum import Enum

__all__ = ["HistoryDtype"]


class HistoryDtype(str, Enum):
    """``pruning.history_dtype``: the dtype of the Taylor / Fisher history (a ``str``, as the callbacks take it).

    Example:
        >>> HistoryDtype("float32") == "float32"
        True
    """

    bfloat16 = "bfloat16"
    float32 = "float32"
