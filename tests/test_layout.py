"""The package's layout holds: Lightning only in callbacks/ and app/, and the import paths of 0.2 still work."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pat_callbacks
from pat_callbacks import _compat

PACKAGE = Path(pat_callbacks.__file__).parent
LIGHTNING_FREE = ("core", "structured", "export", "oneshot", "recovery")


def _modules(subpackage: str) -> list[str]:
    package = importlib.import_module(f"pat_callbacks.{subpackage}")
    return [info.name for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]


def test_no_lightning_import_outside_callbacks_and_the_app():
    pattern = re.compile(r"^\s*(import|from)\s+(lightning|pytorch_lightning)\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in ("callbacks", "app") and pattern.search(path.read_text())
    ]
    assert not offenders, offenders


def test_the_trainer_free_packages_import_without_lightning():
    names = [m for sub in LIGHTNING_FREE if (PACKAGE / sub).is_dir() for m in _modules(sub)]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in names)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        + "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert len(names) > 20


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_module_paths_are_the_new_modules(old, monkeypatch):
    monkeypatch.delitem(sys.modules, f"pat_callbacks.{old}", raising=False)  # warned on first import only
    with pytest.warns(DeprecationWarning, match=f"`pat_callbacks.{old}` moved to"):
        module = importlib.import_module(f"pat_callbacks.{old}")
    assert module is importlib.import_module(_compat.new_name(f"pat_callbacks.{old}"))


def test_old_public_imports_still_work():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pat_callbacks.data.text import ShakespeareDataModule
        from pat_callbacks.models import CharGPT  # noqa: F401
        from pat_callbacks.pruner import Pruner, PruningOptions  # noqa: F401

        from pat_callbacks.export import load_sparse, main, save_sparse, to_semi_structured  # noqa: F401
        from pat_callbacks.structured import StructuredPruner, shrink  # noqa: F401

    from pat_callbacks.app.data.text import ShakespeareDataModule as New

    assert ShakespeareDataModule is New
