"""Reading what pruning did: sparsity measured on the weights themselves, and run summaries.

Example:
    >>> import torch
    >>> weight_sparsity({"w": torch.tensor([0.0, 1.0, 0.0, 2.0])})
    (0.5, {'w': 0.5})
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["compare_runs", "main", "weight_sparsity"]


def weight_sparsity(params: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros, overall and per tensor (counts the weights, not the masks)."""
    zeros = {name: int((p.detach() == 0).sum()) for name, p in params.items()}
    total = sum(p.numel() for p in params.values())
    per_layer = {name: zeros[name] / p.numel() for name, p in params.items()}
    return sum(zeros.values()) / total, per_layer


def compare_runs(paths: Sequence[str | Path]) -> str:
    """A markdown table of ``metrics.json`` files (one row per run).

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "metrics.json").write_text(json.dumps(
        ...     {"method": "cubic", "test_acc": 0.9, "sparsity": 0.8, "target_sparsity": 0.8,
        ...      "global_step": 10, "fit_seconds": 1.0}))
        >>> print(compare_runs([d]))  # doctest: +ELLIPSIS
        | run | method | test acc | sparsity | target | steps | fit s |
        |---|---|---|---|---|---|---|
        | ... | cubic | 0.9000 | 0.8000 | 0.8000 | 10 | 1.0 |
    """
    lines = ["| run | method | test acc | sparsity | target | steps | fit s |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        path = Path(path)
        metrics_file = path / "metrics.json" if path.is_dir() else path
        m = json.loads(metrics_file.read_text())
        name = metrics_file.parent.name
        lines.append(
            f"| {name} | {m['method']} | {m['test_acc']:.4f} | {m['sparsity']:.4f} | {m['target_sparsity']:.4f} "
            f"| {m['global_step']} | {m['fit_seconds']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``pat-report RUN_DIR [RUN_DIR ...]``: print the comparison table of the runs' ``metrics.json``."""
    parser = argparse.ArgumentParser(prog="pat-report", description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.json files)")
    args = parser.parse_args(argv)
    print(compare_runs(args.runs))


if __name__ == "__main__":
    main()
