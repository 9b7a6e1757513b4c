"""One registry pattern for every extension point: a name used in configs -> the object it stands for.

Each extension point is one :class:`Registry` instance, and adding to it from user code is one decorator:

- :data:`~pat_callbacks.core.criteria.CRITERIA`: what scores an entry (``Criterion`` classes);
- :data:`~pat_callbacks.core.schedules.SCHEDULES`: how much, when (``Schedule`` classes);
- :data:`~pat_callbacks.core.allocation.ALLOCATIONS`: how a target splits over layers (``Allocation``: a function
  and what it needs);
- :data:`~pat_callbacks.structured.importance.STRUCTURED_IMPORTANCES`: one score per channel
  (``StructuredImportance`` classes);
- :data:`~pat_callbacks.oneshot.prune.ONE_SHOT_METHODS`: one-shot algorithms (``OneShotMethod`` classes).

A registry is a read-mostly mapping (``REGISTRY[name]``, ``name in REGISTRY``, ``sorted(REGISTRY)``): an unknown
name raises a ``ValueError`` (also a ``KeyError``) listing the valid names, and a name is registered once unless
``replace=True``. See ``docs/extending.md`` for an example of each.

Example:
    >>> COLOURS = Registry("colour")
    >>> @COLOURS.register("red")
    ... def red():
    ...     return "#f00"
    >>> COLOURS["red"](), COLOURS.names()
    ('#f00', ['red'])
    >>> COLOURS["blue"]
    Traceback (most recent call last):
    ...
    pat_callbacks.core.registry.UnknownNameError: Unknown `colour` 'blue'; expected one of: 'red'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered: a ``ValueError`` (a bad config value) and a ``KeyError`` (a missing key), so
    both ``except ValueError`` and the ``dict`` habits (``registry.get(name)``, ``except KeyError``) work.

    Example:
        >>> error = UnknownNameError("Unknown `criterion` 'magnitud'; expected one of: 'magnitude'")
        >>> isinstance(error, ValueError) and isinstance(error, KeyError), str(error)
        (True, "Unknown `criterion` 'magnitud'; expected one of: 'magnitude'")
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_name_message(kind: str, value: Any, names: list[str]) -> str:
    """The one message for an unknown name: the argument, the value and every valid name.

    Example:
        >>> unknown_name_message("criterion", "magnitud", ["magnitude", "taylor"])
        "Unknown `criterion` 'magnitud'; expected one of: 'magnitude', 'taylor'"
    """
    return f"Unknown `{kind}` {value!r}; expected one of: " + ", ".join(repr(n) for n in sorted(names))


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> objects for one extension point (``kind``, e.g. ``"criterion"``, named in every error).

    Args:
        kind: the argument the names are given as (``criterion``, ``allocation``, ...), for messages.
        base: when given, only subclasses of ``base`` are accepted (a clear error instead of a late one).
        wrap: when given, ``register`` stores ``wrap(obj, name, **needs)`` instead of ``obj`` (e.g. a plain
            function and the needs it declares, as an :class:`~pat_callbacks.core.allocation.Allocation`).

    Example:
        >>> SHAPES = Registry("shape")
        >>> class Square:
        ...     name = "square"
        >>> SHAPES.register(Square) is Square
        True
        >>> SHAPES.register(Square)
        Traceback (most recent call last):
        ...
        ValueError: shape 'square' is already registered (Square); pass replace=True to replace it
        >>> _ = SHAPES.register(Square, replace=True)
        >>> "square" in SHAPES, SHAPES.check("square")
        (True, 'square')
    """

    def __init__(self, kind: str, *, base: type | None = None, wrap: Callable[..., T] | None = None) -> None:
        self.kind = kind
        self._base = base
        self._wrap = wrap
        self._entries: dict[str, T] = {}

    def register(self, obj: Any = None, /, *, name: str | None = None, replace: bool = False, **needs: Any) -> Any:
        """Register ``obj`` under ``name`` (default: its ``name`` attribute); usable as a decorator, bare
        (``@REGISTRY.register``), with a name (``@REGISTRY.register("mine")``) or with options
        (``@REGISTRY.register(replace=True)``). Returns ``obj`` itself, so a decorated class or function is
        unchanged. ``needs``: what the entry declares (for registries that ``wrap`` their entries).

        Example:
            >>> NUMBERS = Registry("number")
            >>> NUMBERS.register(1, name="one"), NUMBERS["one"]
            (1, 1)
            >>> NUMBERS.register(2)
            Traceback (most recent call last):
            ...
            ValueError: Expected a `name` to register 2 as a number, but got none (give name=... or a `name` attribute)
        """
        if isinstance(obj, str) and name is None:
            name, obj = obj, None
        if obj is None:

            def decorator(target: Any) -> Any:
                return self.register(target, name=name, replace=replace, **needs)

            return decorator
        key = name if name is not None else getattr(obj, "name", "")
        if not isinstance(key, str) or not key:
            label = obj.__name__ if isinstance(obj, type) else repr(obj)
            raise ValueError(
                f"Expected a `name` to register {label} as a {self.kind}, but got none (give name=... or a `name` "
                "attribute)"
            )
        if self._base is not None and not (isinstance(obj, type) and issubclass(obj, self._base)):
            raise TypeError(
                f"Expected a subclass of {self._base.__name__} to register as a {self.kind}, but got {obj!r}"
            )
        if needs and self._wrap is None:
            raise TypeError(f"A {self.kind} declares no needs at registration, but got {sorted(needs)}")
        if key in self._entries and not replace:
            held = self._entries[key]
            label = getattr(held, "__name__", None) or repr(held)
            raise ValueError(f"{self.kind} {key!r} is already registered ({label}); pass replace=True to replace it")
        self._entries[key] = self._wrap(obj, key, **needs) if self._wrap is not None else obj
        return obj

    def names(self) -> list[str]:
        """The registered names, sorted (for configs, docs and messages)."""
        return sorted(self._entries)

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else a ``ValueError`` listing the valid names.

        Example:
            >>> LEVELS = Registry("level")
            >>> LEVELS.register("low", name="low") and LEVELS.check("high")
            Traceback (most recent call last):
            ...
            ValueError: Unknown `level` 'high'; expected one of: 'low'
        """
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(unknown_name_message(self.kind, name, self.names()))
        return name

    def __getitem__(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        return self._entries[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self.register(obj, name=name, replace=True)

    def __delitem__(self, name: str) -> None:
        if name not in self._entries:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
