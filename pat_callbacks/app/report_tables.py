"""The markdown tables of ``pat-report``: one row per method and target sparsity (mean ± std over its runs), or one
row per run.

Example:
    >>> print(summary_table([{"method": "dense", "target_sparsity": 0.0, "test_acc": 0.9, "sparsity": 0.0}]))
    | method | target | runs | test acc % | reached sparsity | fit s |
    |---|---|---|---|---|---|
    | dense | 0 | 1 | 90.00 ± 0.00 | 0.0000 | n/a |
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pat_callbacks.app.report_runs import _mean_std, _scores, _target, collect_runs

__all__ = ["compare_runs", "summary_table"]


def _cell(value: Any) -> str:
    """``value`` as one markdown table cell: line breaks become spaces, ``|`` is escaped (no injected rows) and other
    control characters (a NUL byte) are written as escapes.

    Example:
        >>> _cell("cubic\\n| fake | row |")
        'cubic \\\\| fake \\\\| row \\\\|'
        >>> print(_cell("nul\\x00byte"))
        nul\\x00byte
    """
    text = " ".join(str(value).splitlines()).replace("|", "\\|")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _seconds(value: Any) -> str:
    return f"{float(value):.1f}" if isinstance(value, (int, float)) else "n/a"


def summary_table(runs: Sequence[Mapping[str, Any]], metric: str | None = None) -> str:
    """Markdown: one row per (method, target sparsity), accuracy mean ± std over its runs.

    Example:
        >>> runs = [{"method": "cubic", "target_sparsity": 0.9, "test_acc": a, "sparsity": 0.9, "fit_seconds": 10}
        ...         for a in (0.80, 0.84)]
        >>> print(summary_table(runs))
        | method | target | runs | test acc % | reached sparsity | fit s |
        |---|---|---|---|---|---|
        | cubic | 0.9 | 2 | 82.00 ± 2.83 | 0.9000 | 10.0 |
    """
    label, percent, scores = _scores(runs, metric)
    groups: dict[tuple[str, float], list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault((str(run.get("method", "?")), _target(run)), []).append(index)
    header = f"{label} %" if percent else label
    lines = [f"| method | target | runs | {header} | reached sparsity | fit s |", "|---|---|---|---|---|---|"]
    for (method, target), indices in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        values = [scores[i] for i in indices if scores[i] is not None]
        score = "n/a" if not values else "{:.2f} ± {:.2f}".format(*_mean_std(values))
        reached = statistics.mean(float(runs[i].get("sparsity") or 0.0) for i in indices)
        seconds = [
            float(runs[i]["fit_seconds"]) for i in indices if isinstance(runs[i].get("fit_seconds"), (int, float))
        ]
        lines.append(
            f"| {_cell(method)} | {target:g} | {len(indices)} | {score} | {reached:.4f} "
            f"| {_seconds(statistics.mean(seconds) if seconds else None)} |"
        )
    return "\n".join(lines)


def _runs_table(runs: Sequence[Mapping[str, Any]], metric: str | None = None) -> str:
    """A markdown table with one row per run."""
    label, percent, scores = _scores(runs, metric)
    header = f"{label} %" if percent else label
    lines = [f"| run | method | {header} | sparsity | target | steps | fit s |", "|---|---|---|---|---|---|---|"]
    for run, score in zip(runs, scores, strict=True):
        lines.append(
            f"| {_cell(run.get('name', Path(run['run_dir']).name))} | {_cell(run.get('method', '?'))} "
            f"| {'n/a' if score is None else f'{score:.4f}' if not percent else f'{score:.2f}'} "
            f"| {float(run.get('sparsity') or 0.0):.4f} | {_target(run):.4f} | {run.get('global_step', 'n/a')} "
            f"| {_seconds(run.get('fit_seconds'))} |"
        )
    return "\n".join(lines)


def compare_runs(paths: Sequence[str | Path], metric: str | None = None) -> str:
    """A markdown table with one row per run found at or below ``paths`` (used by ``make demo``).

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "metrics.json").write_text(json.dumps(
        ...     {"method": "cubic", "test_acc": 0.9, "sparsity": 0.8, "target_sparsity": 0.8,
        ...      "global_step": 10, "fit_seconds": 1.0}))
        >>> print(compare_runs([d]))  # doctest: +ELLIPSIS
        | run | method | test acc % | sparsity | target | steps | fit s |
        |---|---|---|---|---|---|---|
        | ... | cubic | 90.00 | 0.8000 | 0.8000 | 10 | 1.0 |
    """
    return _runs_table(collect_runs(paths), metric)
