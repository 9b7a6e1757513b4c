"""What pruning did, in numbers and pictures: sparsity measured on the weights, run tables and plots.

``pat-report DIR [DIR ...]`` reads the runs at or below the given run or multirun directories and writes into
``--out`` (default ``FIRST_DIR/report``):

- ``report.md``: method x target sparsity: accuracy mean ± std over runs, reached sparsity, fit time; one row per run;
- ``accuracy_vs_sparsity.png``: accuracy against reached sparsity, one line per method, dense runs as a dashed
  baseline;
- ``schedule.png``: reached sparsity over optimizer steps, from each run's CSV log;
- ``layer_sparsity.png``: per-layer sparsity of every run, one small panel per run.

A run is a ``metrics.json`` (written by ``train.py`` or by the :class:`~pat_callbacks.callbacks.summary.PruningSummary`
callback in any Lightning project) or, where a run has none, a Lightning ``CSVLogger`` ``metrics.csv`` (the last
logged value of each column; reached sparsity from ``pruning/sparsity``). The accuracy is ``--metric`` if given, else
the first of ``test_acc``, ``test/acc``, ... ``val/acc`` ... or any logged name holding ``acc``.

Reading runs: :mod:`~pat_callbacks.app.report_runs`; tables: :mod:`~pat_callbacks.app.report_tables`; plots:
:mod:`~pat_callbacks.app.report_plots`. This module holds the command line and :func:`weight_sparsity`, and
re-exports their public names.

Example:
    >>> import torch
    >>> weight_sparsity({"w": torch.tensor([0.0, 1.0, 0.0, 2.0])})
    (0.5, {'w': 0.5})
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from pat_callbacks.app.report_plots import plot_accuracy_vs_sparsity, plot_layer_sparsity, plot_schedule
from pat_callbacks.app.report_runs import PREFERRED_METRICS, collect_runs, run_score
from pat_callbacks.app.report_tables import _runs_table, compare_runs, summary_table

__all__ = [
    "PREFERRED_METRICS",
    "collect_runs",
    "compare_runs",
    "main",
    "plot_accuracy_vs_sparsity",
    "plot_layer_sparsity",
    "plot_schedule",
    "run_score",
    "summary_table",
    "weight_sparsity",
]


def weight_sparsity(params: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros, overall and per tensor (counts the weights, not the masks).

    Example:
        >>> import torch
        >>> weight_sparsity({"a": torch.tensor([0.0, 1.0]), "b": torch.zeros(2)})
        (0.75, {'a': 0.5, 'b': 1.0})"""
    zeros = {name: int((p.detach() == 0).sum()) for name, p in params.items()}
    total = sum(p.numel() for p in params.values())
    per_layer = {name: zeros[name] / p.numel() for name, p in params.items()}
    return sum(zeros.values()) / total, per_layer


def _out_folder(given: Path | None, first: str) -> Path:
    """``--out``, or ``FIRST/report``, which must then lie in ``FIRST`` once links are followed (a sweep's folder may
    hold a ``report`` link to anywhere); refused when it is a file."""
    out = given or Path(first) / "report"
    if out.exists() and not out.is_dir():
        raise SystemExit(f"pat-report: error: --out {out} is a file, not a folder")
    if given is None and not out.resolve().is_relative_to(Path(first).resolve()):
        raise SystemExit(
            f"pat-report: error: {out} leads to {out.resolve()}, outside {first}: remove the link or give --out"
        )
    return out


def _inside(out: Path, name: str) -> Path:
    """``out / name``, checked to be a file directly in ``out`` once links are followed: every file pat-report writes
    goes through here, so a link left in ``--out`` (or a name with a separator) cannot send a write elsewhere.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> _inside(out, "report.md") == out / "report.md"
        True
        >>> (out / "schedule.png").symlink_to("/etc/passwd")
        >>> _inside(out, "schedule.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: pat-report: error: .../schedule.png leads to /etc/passwd, outside --out ...: remove the link or ...
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or len(name.encode()) > 255:
        raise SystemExit(f"pat-report: error: {name!r} is not a plain file name to write into --out {out}")
    path = out / name
    if path.resolve().parent != out.resolve():
        raise SystemExit(
            f"pat-report: error: {path} leads to {path.resolve()}, outside --out {out}: remove the link or choose "
            "another --out"
        )
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``pat-report RUN_OR_MULTIRUN_DIR [...] [--out DIR] [--metric NAME]``: tables and plots of runs.

    Exits with status 1 and a one-line message naming the path when there is nothing to read.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 0"""
    parser = argparse.ArgumentParser(prog="pat-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run or multirun directories (or metrics.json / metrics.csv files)")
    parser.add_argument("--out", type=Path, help="where to write report.md and the PNGs (default: FIRST/report)")
    parser.add_argument("--metric", help="the accuracy metric to report (default: test_acc, test/acc, ... val/acc)")
    parser.add_argument("--no-plots", action="store_true", help="only print and write the tables")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.paths)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"pat-report: error: {error}") from None
    if args.metric and not any(run_score(run, args.metric) for run in runs):
        raise SystemExit(f"pat-report: error: no run at or below {', '.join(args.paths)} logged {args.metric!r}")
    out = _out_folder(args.out, args.paths[0])
    table = summary_table(runs, args.metric)
    per_run = _runs_table(runs, args.metric)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _inside(out, "report.md").write_text(f"# pat-callbacks report\n\n{table}\n\n## Runs\n\n{per_run}\n")
    except OSError as error:
        raise SystemExit(f"pat-report: error: cannot write into --out {out} ({error.strerror or error})") from None
    if not args.no_plots:
        written = [
            plot_accuracy_vs_sparsity(runs, _inside(out, "accuracy_vs_sparsity.png"), args.metric),
            plot_schedule(runs, _inside(out, "schedule.png")),
            plot_layer_sparsity(runs, _inside(out, "layer_sparsity.png")),
        ]
        print("\n".join(f"wrote {p}" for p in written if p is not None))
        if written[0] is None:
            print("no accuracy metric found: no accuracy_vs_sparsity.png (name one with --metric)", file=sys.stderr)
    print(f"wrote {out / 'report.md'}\n")
    print(table)  # last, so a console run (make demo) ends with the comparison


if __name__ == "__main__":
    main()
