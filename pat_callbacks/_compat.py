"""Module paths of pat-callbacks 0.2 (``pat_callbacks.pruner``, ``pat_callbacks.models``, ...) keep importing.

The package was split into ``core/``, ``structured/``, ``export/``, ``callbacks/`` and ``app/``. Each old flat module
is the same module object as its new home (so ``monkeypatch``, ``isinstance`` and pickled objects agree), imported on
first use with a :class:`DeprecationWarning` that names the new path.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     import pat_callbacks.masks as old
    >>> import pat_callbacks.core.masks as new
    >>> old is new
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

# old module (below pat_callbacks.) -> new module (below pat_callbacks.); submodules follow their package.
MOVED: dict[str, str] = {
    **{
        name: f"core.{name}"
        for name in (
            "_rng",
            "_validation",
            "allocation",
            "criteria",
            "masks",
            "patterns",
            "pruner",
            "regrowth",
            "schedules",
            "selection",
            "sharding",
            "targets",
            "windows",
        )
    },
    **{name: f"structured.{name}" for name in ("attention", "channels", "recurrent")},
    "progress": "callbacks.progress",
    "config": "app.config",
    "run": "app.run",
    "report": "app.report",
    "data": "app.data",
    "models": "app.models",
}


def new_name(fullname: str) -> str | None:
    """The module that an old ``pat_callbacks.X[.Y]`` path now names, or ``None`` if the path did not move.

    Example:
        >>> new_name("pat_callbacks.data.text"), new_name("pat_callbacks.callbacks")
        ('pat_callbacks.app.data.text', None)
    """
    package, _, rest = fullname.partition(".")
    if package != "pat_callbacks" or not rest:
        return None
    head, _, tail = rest.partition(".")
    if head not in MOVED:
        return None
    return f"pat_callbacks.{MOVED[head]}" + (f".{tail}" if tail else "")


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path (see :data:`MOVED`)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        if new_name(fullname) is None:
            return None  # type: ignore[return-value]
        return importlib.util.spec_from_loader(fullname, self)  # type: ignore[return-value]

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        target = new_name(spec.name)
        warnings.warn(
            f"`{spec.name}` moved to `{target}`; the old path keeps working but will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(target)  # type: ignore[arg-type]
        spec.loader_state = module.__spec__  # importlib overwrites __spec__ with the alias's: exec_module restores it
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state  # type: ignore[union-attr]


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # first: the path finder would load a second copy of a submodule
