"""Every bench script answers ``--help`` (issue 32: ``bench/lm.py --help`` crashed on a ``%`` in a help text)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NOT_SCRIPTS = {"__init__.py", "peers.py"}  # modules the others import
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in NOT_SCRIPTS)


def test_the_bench_scripts_are_found():
    assert len(SCRIPTS) >= 12 and "lm.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_prints_its_help(script, monkeypatch, capsys):
    """``python bench/SCRIPT --help``, run in this process (the imports are shared, so it takes a moment)."""
    monkeypatch.setattr(sys, "argv", [f"bench/{script}", "--help"])
    monkeypatch.syspath_prepend(str(ROOT))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out
