"""What pruning did, in numbers and pictures: sparsity measured on the weights, run tables and plots.

``pat-report DIR [DIR ...]`` reads every ``metrics.json`` below the given run or multirun directories (what
``train.py`` writes) and writes into ``--out`` (default ``DIR/report``):

- ``report.md``: method x target sparsity: test accuracy mean ± std over runs, reached sparsity, fit time;
- ``accuracy_vs_sparsity.png``: one line per method;
- ``schedule.png``: target and reached sparsity over optimizer steps, from each run's CSV log;
- ``layer_sparsity.png``: per-layer sparsity bars for each method at its highest target.

Example:
    >>> import torch
    >>> weight_sparsity({"w": torch.tensor([0.0, 1.0, 0.0, 2.0])})
    (0.5, {'w': 0.5})
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "collect_runs",
    "compare_runs",
    "main",
    "plot_accuracy_vs_sparsity",
    "plot_layer_sparsity",
    "plot_schedule",
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


def collect_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every ``metrics.json`` at or below ``paths`` (run dirs, multirun dirs, or the files), with its ``run_dir``.

    Example:
        >>> import json, tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for i, acc in enumerate([0.9, 0.8]):
        ...     (root / str(i)).mkdir()
        ...     _ = (root / str(i) / "metrics.json").write_text(json.dumps({"method": "cubic", "test_acc": acc}))
        >>> [r["test_acc"] for r in collect_runs([root])]
        [0.9, 0.8]
    """
    runs = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("metrics.json"))
        if not files:
            raise FileNotFoundError(f"No metrics.json at or below {path}")
        for file in files:
            runs.append({**json.loads(file.read_text()), "run_dir": str(file.parent)})
    return runs


def summary_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per (method, target sparsity), accuracy mean ± std over its runs.

    Example:
        >>> runs = [{"method": "cubic", "target_sparsity": 0.9, "test_acc": a, "sparsity": 0.9, "fit_seconds": 10}
        ...         for a in (0.80, 0.84)]
        >>> print(summary_table(runs))
        | method | target | runs | test acc % | reached sparsity | fit s |
        |---|---|---|---|---|---|
        | cubic | 0.9 | 2 | 82.00 ± 2.83 | 0.9000 | 10.0 |
    """
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], float(run.get("target_sparsity", 0.0))), []).append(run)
    lines = ["| method | target | runs | test acc % | reached sparsity | fit s |", "|---|---|---|---|---|---|"]
    for (method, target), items in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [100 * float(r["test_acc"]) for r in items]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        reached = statistics.mean(float(r.get("sparsity", 0.0)) for r in items)
        seconds = statistics.mean(float(r.get("fit_seconds", 0.0)) for r in items)
        lines.append(
            f"| {method} | {target:g} | {len(items)} | {statistics.mean(accs):.2f} ± {std:.2f} | {reached:.4f} "
            f"| {seconds:.1f} |"
        )
    return "\n".join(lines)


def compare_runs(paths: Sequence[str | Path]) -> str:
    """A markdown table with one row per run (used by ``make demo``).

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
    for m in collect_runs(paths):
        lines.append(
            f"| {Path(m['run_dir']).name} | {m['method']} | {m['test_acc']:.4f} | {m['sparsity']:.4f} "
            f"| {m['target_sparsity']:.4f} | {m['global_step']} | {m['fit_seconds']} |"
        )
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_sparsity(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Accuracy (mean ± std over runs) against reached sparsity, one line per method; dense as a line.

    Example:
        >>> import tempfile, pathlib
        >>> runs = [{"method": "dense", "test_acc": 0.9}, {"method": "cubic", "target_sparsity": 0.8,
        ...         "test_acc": 0.85, "sparsity": 0.8}]
        >>> plot_accuracy_vs_sparsity(runs, pathlib.Path(tempfile.mkdtemp()) / "a.png").exists()
        True"""
    plt = _pyplot()
    groups: dict[str, dict[float, list[Mapping[str, Any]]]] = {}
    for run in runs:
        groups.setdefault(run["method"], {}).setdefault(float(run.get("target_sparsity", 0.0)), []).append(run)
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, by_target in sorted(groups.items()):
        points = []
        for items in by_target.values():
            accs = [100 * float(r["test_acc"]) for r in items]
            reached = statistics.mean(float(r.get("sparsity", 0.0)) for r in items)
            points.append((reached, statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0))
        points.sort()
        if method == "dense":
            ax.axhline(points[0][1], color="black", linestyle=":", label=f"dense ({points[0][1]:.1f}%)")
            continue
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            fmt="-o",
            capsize=3,
            label=method,
        )
    ax.set_xlabel("reached sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _logged_sparsity(run_dir: str | Path) -> list[tuple[int, float, float]]:
    """(step, target, reached) rows of ``pruning/target`` and ``pruning/sparsity`` in a run's CSV logs."""
    rows = []
    for metrics_csv in sorted(Path(run_dir).rglob("metrics.csv")):
        with open(metrics_csv) as handle:
            for row in csv.DictReader(handle):
                if row.get("pruning/target") and row.get("pruning/sparsity"):
                    rows.append((int(row["step"]), float(row["pruning/target"]), float(row["pruning/sparsity"])))
    return sorted(set(rows))


def plot_schedule(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Sparsity over optimizer steps for every run whose CSV log holds pruning metrics (None if none does).

    Example:
        >>> import tempfile
        >>> plot_schedule([{"method": "dense", "run_dir": tempfile.mkdtemp()}], "unused.png") is None
        True"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = 0
    for run in runs:
        rows = _logged_sparsity(run["run_dir"])
        if not rows:
            continue
        label = f"{run['method']} {float(run.get('target_sparsity', 0)):g} ({Path(run['run_dir']).name})"
        steps, reached = [r[0] for r in rows], [r[2] for r in rows]
        if int(run.get("global_step", 0)) > steps[-1]:  # hold the last value to the end of training
            steps, reached = [*steps, int(run["global_step"])], [*reached, reached[-1]]
        ax.step(steps, reached, where="post", label=label)
        plotted += 1
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sparsity (masks)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_layer_sparsity(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Per-layer sparsity bars, one group per layer and one bar per method (its highest-target run).

    Example:
        >>> import tempfile, pathlib
        >>> runs = [{"method": "cubic", "target_sparsity": 0.9, "layer_sparsity": {"fc1": 0.8, "fc2": 0.95}}]
        >>> plot_layer_sparsity(runs, pathlib.Path(tempfile.mkdtemp()) / "l.png").exists()
        True"""
    plt = _pyplot()
    chosen: dict[str, Mapping[str, Any]] = {}
    for run in runs:
        if run.get("layer_sparsity") and run["method"] != "dense":
            best = chosen.get(run["method"])
            if best is None or float(run.get("target_sparsity", 0)) > float(best.get("target_sparsity", 0)):
                chosen[run["method"]] = run
    if not chosen:
        return None
    layers = list(next(iter(chosen.values()))["layer_sparsity"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(layers)), 4.5))
    width = 0.8 / len(chosen)
    for index, (method, run) in enumerate(sorted(chosen.items())):
        values = [float(run["layer_sparsity"].get(layer, 0.0)) for layer in layers]
        xs = [i + index * width for i in range(len(layers))]
        ax.bar(xs, values, width=width, label=f"{method} {float(run.get('target_sparsity', 0)):g}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, rotation=20, fontsize=8)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    """``pat-report RUN_OR_MULTIRUN_DIR [...] [--out DIR]``: tables and plots of ``train.py`` runs.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 0"""
    parser = argparse.ArgumentParser(prog="pat-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run or multirun directories (or metrics.json files)")
    parser.add_argument("--out", type=Path, help="where to write report.md and the PNGs (default: FIRST/report)")
    parser.add_argument("--no-plots", action="store_true", help="only print and write the tables")
    args = parser.parse_args(argv)
    runs = collect_runs(args.paths)
    out = args.out or Path(args.paths[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    per_run = compare_runs([r["run_dir"] for r in runs])
    (out / "report.md").write_text(f"# pat-callbacks report\n\n{table}\n\n## Runs\n\n{per_run}\n")
    print(table)
    if not args.no_plots:
        written = [
            plot_accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png"),
            plot_schedule(runs, out / "schedule.png"),
            plot_layer_sparsity(runs, out / "layer_sparsity.png"),
        ]
        print("\n".join(f"wrote {p}" for p in written if p is not None))
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
