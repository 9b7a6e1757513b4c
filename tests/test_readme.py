"""The README's plain-PyTorch loop runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_without_lightning_loop_runs_and_reaches_its_target():
    code = _block_after("## Without Lightning: the core")
    assert "import lightning" not in code and len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # ends with an assert on the reached sparsity
    model = namespace["model"]
    weights = [model[0].weight, model[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.8 * sum(w.numel() for w in weights))
