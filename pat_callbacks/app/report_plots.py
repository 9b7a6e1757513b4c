"""The pictures of ``pat-report`` (matplotlib, headless): accuracy against reached sparsity, sparsity over training
steps, per-layer sparsity of every run. Each function returns the PNG's path, or ``None`` when no run has what it
draws.

Example:
    >>> plot_layer_sparsity([{"method": "dense", "run_dir": "/r/0"}], "unused.png") is None
    True
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pat_callbacks.app.report_runs import _float, _mean_std, _scores, _target

__all__ = ["plot_accuracy_vs_sparsity", "plot_layer_sparsity", "plot_schedule"]


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


def _text(value: Any, limit: int = 60) -> str:
    """``value`` as a plot label: control characters (a NUL byte, line breaks) escaped, at most ``limit`` characters
    (a run's method or name is free text: the tables hold it whole).

    Example:
        >>> _text("nul\\x00byte"), len(_text("L" * 80)), _text("L" * 80)[-4:]
        ('nul\\\\x00byte', 60, 'L...')
    """
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(run: Mapping[str, Any]) -> str:
    return f"{_text(run.get('method', '?'))} {_target(run):g}"


def plot_accuracy_vs_sparsity(
    runs: Sequence[Mapping[str, Any]], path: str | Path, metric: str | None = None
) -> Path | None:
    """Accuracy (mean ± std over runs) against reached sparsity, one line per method; dense runs as a dashed line.

    Returns None when no run has an accuracy to draw.

    Example:
        >>> import tempfile, pathlib
        >>> runs = [{"method": "dense", "test_acc": 0.9}, {"method": "cubic", "target_sparsity": 0.8,
        ...         "test_acc": 0.85, "sparsity": 0.8}]
        >>> plot_accuracy_vs_sparsity(runs, pathlib.Path(tempfile.mkdtemp()) / "a.png").exists()
        True"""
    label, percent, scores = _scores(runs, metric)
    groups: dict[str, dict[float, list[tuple[float, float]]]] = {}
    dense: list[float] = []
    for run, score in zip(runs, scores, strict=True):
        if score is None:
            continue
        if run.get("method") == "dense":
            dense.append(score)
        else:
            reached = 100 * float(run.get("sparsity") or 0.0)
            groups.setdefault(str(run.get("method", "?")), {}).setdefault(_target(run), []).append((reached, score))
    if not dense and not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    if dense:
        mean = statistics.mean(dense)
        shown = f"{mean:.2f}%" if percent else f"{mean:.4g}"
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.5, label=f"dense baseline ({shown})")
    for method, by_target in sorted(groups.items()):
        points = []
        for items in by_target.values():
            score, std = _mean_std([s for _, s in items])
            points.append((statistics.mean(r for r, _ in items), score, std))
        points.sort()
        xs, ys, errors = ([p[i] for p in points] for i in range(3))
        ax.errorbar(xs, ys, yerr=errors, fmt="-o", capsize=3, label=_text(method))
    count = sum(s is not None for s in scores)
    ax.set_title(f"{label.capitalize()} vs reached sparsity ({count} run{'s' * (count != 1)})")
    ax.set_xlabel("reached sparsity (% of targeted weights exactly zero)")
    ax.set_ylabel(f"{label} (%)" if percent else label)
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _logged_sparsity(run_dir: str | Path) -> list[tuple[int, float, float]]:
    """(step, target, reached) rows of ``pruning/target`` and ``pruning/sparsity`` in a run's CSV logs."""
    rows = []
    for metrics_csv in sorted(Path(run_dir).rglob("metrics.csv")):
        with open(metrics_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                target, reached, step = (_float(row.get(k)) for k in ("pruning/target", "pruning/sparsity", "step"))
                if target is not None and reached is not None and step is not None:
                    rows.append((int(step), target, reached))
    return sorted(set(rows))


def plot_schedule(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Sparsity over optimizer steps for every run whose CSV log holds pruning metrics (None if none does).

    Example:
        >>> import tempfile
        >>> plot_schedule([{"method": "dense", "run_dir": tempfile.mkdtemp()}], "unused.png") is None
        True"""
    curves = [(run, rows) for run in runs if (rows := _logged_sparsity(run["run_dir"]))]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, rows in curves:
        steps, reached = [r[0] for r in rows], [100 * r[2] for r in rows]
        end = run.get("global_step")
        if isinstance(end, int) and end > steps[-1]:  # hold the last value to the end of training
            steps, reached = [*steps, end], [*reached, reached[-1]]
        name = _text(run.get("name", Path(run["run_dir"]).name))
        ax.step(steps, reached, where="post", label=f"{_label(run)} ({name})")
    ax.set_title("Sparsity during training (at each mask update)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sparsity (% of targeted weights masked)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_layer_sparsity(runs: Sequence[Mapping[str, Any]], path: str | Path, columns: int = 3) -> Path | None:
    """Per-layer sparsity of every run with per-layer numbers, one small panel per run (None if no run has them).

    Example:
        >>> import tempfile, pathlib
        >>> runs = [{"method": "cubic", "target_sparsity": t, "run_dir": f"/r/{i}",
        ...          "layer_sparsity": {"fc1": t - 0.1, "fc2": t + 0.05}} for i, t in enumerate((0.5, 0.9))]
        >>> plot_layer_sparsity(runs, pathlib.Path(tempfile.mkdtemp()) / "l.png").exists()
        True"""
    chosen = sorted(
        (run for run in runs if run.get("layer_sparsity")),
        key=lambda r: (r.get("method") != "dense", str(r.get("method")), _target(r), str(r.get("name", r["run_dir"]))),
    )
    if not chosen:
        return None
    plt = _pyplot()
    columns = max(1, min(columns, len(chosen)))
    rows = math.ceil(len(chosen) / columns)
    layer_lists = [list(run["layer_sparsity"]) for run in chosen]
    shared = all(layers == layer_lists[0] for layers in layer_lists)
    height = 0.28 * max(len(layers) for layers in layer_lists) + 1.3
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.3 * columns + 1.5, height * rows + 0.6), squeeze=False, sharey=shared
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = sorted({str(run.get("method")) for run in chosen})
    for index, (ax, run) in enumerate(zip(axes.flat, chosen, strict=False)):  # extra panels are hidden below
        layers = list(run["layer_sparsity"])
        values = [100 * float(v) for v in run["layer_sparsity"].values()]
        color = colors[methods.index(str(run.get("method"))) % len(colors)]
        ax.barh(range(len(layers)), values, color=color)
        ticks = [_text(layer) for layer in layers] if (not shared or index % columns == 0) else []
        ax.set_yticks(range(len(layers)), ticks, fontsize=7)
        if not shared or index == 0:  # first layer on top (shared y axes invert together)
            ax.invert_yaxis()
        ax.axvline(100 * _target(run), color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{_label(run)} · {float(run.get('sparsity') or 0):.3f}\n{_text(run.get('name', ''))}", fontsize=8)
        ax.set_xlabel("sparsity (%)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.suptitle("Per-layer sparsity of every run (title: method target · reached; dashed: target)", fontsize=10)
    return _save(plt, fig, path)
