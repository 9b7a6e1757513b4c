"""Every public class and function carries a runnable example (run by --doctest-modules in this suite)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pat_callbacks


def _public_objects():
    for info in pkgutil.walk_packages(pat_callbacks.__path__, "pat_callbacks."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj


def test_every_public_class_and_function_has_an_example():
    missing = [name for name, obj in _public_objects() if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"no runnable example in: {missing}"


def test_the_public_api_is_exported_from_the_package():
    for name in ("GradualPruning", "DynamicSparseTraining", "MaskStore", "CubicSchedule", "make_schedule"):
        assert name in pat_callbacks.__all__ and hasattr(pat_callbacks, name)
