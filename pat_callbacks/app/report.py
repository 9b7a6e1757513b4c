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

Example:
    >>> import torch
    >>> weight_sparsity({"w": torch.tensor([0.0, 1.0, 0.0, 2.0])})
    (0.5, {'w': 0.5})
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
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
    "run_score",
    "summary_table",
    "weight_sparsity",
]

# Accuracy metrics looked for, in order, when --metric is not given (then any name containing "acc").
PREFERRED_METRICS = (
    "test_acc",
    "test/acc",
    "test_accuracy",
    "test/accuracy",
    "val_acc",
    "val/acc",
    "val_accuracy",
    "val/accuracy",
)


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


# ---------------------------------------------------------------------------------------------------------- reading


# Keys of a metrics.json the report computes with: a string there is an error, not a value to guess at.
_NUMBER_KEYS = ("sparsity", "target_sparsity", "fit_seconds", "global_step")
# Accuracy-like keys: NaN or inf there (a diverged run) is reported as missing, with a warning.
_METRIC_KEYS = ("test_acc", "val_acc")


def _warn(message: str) -> None:
    print(f"pat-report: warning: {message}", file=sys.stderr)


def _shown(value: Any) -> str:
    """``repr`` of a bad value on one line, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(file: Path, key: str, value: Any) -> None:
    if value is None:
        return
    if not _is_number(value):
        raise ValueError(f"{file}: key '{key}' must be a number or null, but got {_shown(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{file}: key '{key}' is {value}, not a finite number")


def _finite_or_none(file: Path, key: str, value: Any) -> Any:
    """``value``, or None with a warning when it is NaN or infinite."""
    if _is_number(value) and not math.isfinite(value):
        _warn(f"{file}: key '{key}' is {'NaN' if math.isnan(value) else value}: reported as missing (n/a)")
        return None
    return value


def _check_run(data: dict[str, Any], file: Path) -> dict[str, Any]:
    """The run of a ``metrics.json`` after checking every value the report uses; names the file and key if bad.

    Example:
        >>> _check_run({"sparsity": "high"}, Path("run/metrics.json"))
        Traceback (most recent call last):
        ...
        ValueError: run/metrics.json: key 'sparsity' must be a number or null, but got 'high'
    """
    method = data.get("method")
    if method is not None and not isinstance(method, str):
        raise ValueError(f"{file}: key 'method' must be a string, but got {_shown(method)}")
    for key in _NUMBER_KEYS:
        _check_number(file, key, data.get(key))
    for key in _METRIC_KEYS:
        value = data.get(key)
        if value is not None and not _is_number(value):
            raise ValueError(f"{file}: key '{key}' must be a number or null, but got {_shown(value)}")
        if key in data:
            data[key] = _finite_or_none(file, key, value)
    for key in ("metrics", "layer_sparsity"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"{file}: key '{key}' must be an object, but got {_shown(data[key])}")
    for layer, value in (data.get("layer_sparsity") or {}).items():
        _check_number(file, f"layer_sparsity.{layer}", value)
        if value is None:
            raise ValueError(f"{file}: key 'layer_sparsity.{layer}' must be a number, but got None")
    if data.get("metrics"):
        data["metrics"] = {
            name: _finite_or_none(file, f"metrics.{name}", value) for name, value in data["metrics"].items()
        }
    return data


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error})") from None
    except OSError as error:
        raise ValueError(f"{file} cannot be read ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object of run metrics")
    return {**_check_run(data, file), "run_dir": str(file.parent), "source": "metrics.json"}


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _read_csv(file: Path) -> dict[str, Any] | None:
    """A run from a Lightning ``CSVLogger`` file: the last logged value of each column (None if it has no rows)."""
    try:
        with open(file, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not a readable CSV file ({error})") from None
    if not rows:
        return None
    last: dict[str, float] = {}
    steps = []
    for row in rows:
        step = _float(row.get("step"))
        if step is not None:
            steps.append(int(step))
        for name, text in row.items():
            value = _float(text)
            if name not in (None, "epoch", "step") and value is not None:
                last[name] = value
    layers = {k.removeprefix("pruning/sparsity/"): v for k, v in last.items() if k.startswith("pruning/sparsity/")}
    pruned = any(name.startswith("pruning/") for name in last)
    return {
        "method": "pruned" if pruned else "dense",
        "target_sparsity": last.get("pruning/target") if pruned else 0.0,
        "sparsity": last.get("pruning/sparsity", 0.0),
        "layer_sparsity": layers,
        "metrics": {k: v for k, v in last.items() if not k.startswith("pruning/")},
        "global_step": max(steps) if steps else None,
        "fit_seconds": None,
        "run_dir": str(file.parent),
        "source": "metrics.csv",
    }


def _run_files(root: Path) -> list[Path]:
    """Every ``metrics.json`` below ``root``; every ``metrics.csv`` without a ``metrics.json`` in or above its dir."""
    found = {name: sorted(root.rglob(name)) for name in ("metrics.json", "metrics.csv")}
    for path in (*found["metrics.json"], *found["metrics.csv"]):
        if not path.is_file():  # a folder named so: the rest of the sweep is still worth a report
            _warn(f"skipped {path}: a folder, not a file")
    jsons = [file for file in found["metrics.json"] if file.is_file()]
    owners = {file.parent for file in jsons}
    csvs = [f for f in found["metrics.csv"] if f.is_file() and not owners.intersection([f.parent, *f.parents])]
    return sorted([*jsons, *csvs])


def collect_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The runs at or below ``paths`` (run dirs, multirun dirs, or the files), each with ``run_dir`` and ``name``.

    Raises ``FileNotFoundError`` for a missing path or a folder with nothing to read and ``ValueError`` for a file
    that cannot be read; both name the path.

    Example:
        >>> import json, tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for i, acc in enumerate([0.9, 0.8]):
        ...     (root / str(i)).mkdir()
        ...     _ = (root / str(i) / "metrics.json").write_text(json.dumps({"method": "cubic", "test_acc": acc}))
        >>> [(r["name"], r["test_acc"]) for r in collect_runs([root])]
        [('0', 0.9), ('1', 0.8)]
        >>> collect_runs([root / "2"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: no such file or directory: .../2
    """
    runs: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        files = [path] if path.is_file() else _run_files(path)
        found = 0
        for file in files:
            if file.suffix == ".json":
                run = _read_json(file)
            elif file.suffix == ".csv":
                run = _read_csv(file)
            else:
                raise ValueError(f"{file} is neither a metrics.json nor a metrics.csv file")
            if run is not None:
                runs.append(run)
                found += 1
        if not found:
            raise FileNotFoundError(f"nothing to read at or below {path}: no metrics.json, no metrics.csv with rows")
    dirs = [Path(r["run_dir"]).resolve() for r in runs]
    common = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else None
    for run, directory in zip(runs, dirs, strict=True):
        relative = directory.relative_to(common).as_posix() if common is not None else "."
        run["name"] = directory.name if relative == "." else relative
    return runs


def run_score(run: Mapping[str, Any], metric: str | None = None) -> tuple[str, float] | None:
    """(metric name, value) of the run's accuracy: ``metric`` if given, else the first preferred name it has.

    Example:
        >>> run_score({"test_acc": 0.9})
        ('test_acc', 0.9)
        >>> run_score({"metrics": {"train/loss": 0.3, "val/acc": 0.8, "test/acc": 0.85}})
        ('test/acc', 0.85)
        >>> run_score({"metrics": {"valid_top1_accuracy": 0.7}}), run_score({"metrics": {"loss": 1.0}}, "loss")
        (('valid_top1_accuracy', 0.7), ('loss', 1.0))
    """
    values: dict[str, float] = {}
    for name, value in (run.get("metrics") or {}).items():
        if _is_number(value) and math.isfinite(value):
            values[name] = float(value)
    for name in ("test_acc", "val_acc"):  # train.py's metrics.json keeps them at the top level
        if _is_number(run.get(name)) and math.isfinite(run[name]):
            values.setdefault(name, float(run[name]))
    if metric is not None:
        return (metric, values[metric]) if metric in values else None
    for name in PREFERRED_METRICS:
        if name in values:
            return name, values[name]
    candidates = sorted(n for n in values if "acc" in n.lower())
    candidates.sort(key=lambda n: 0 if "test" in n else 1 if "val" in n else 2)
    return (candidates[0], values[candidates[0]]) if candidates else None


def _target(run: Mapping[str, Any]) -> float:
    """The run's target sparsity; where unknown (several pruning callbacks, CSV logs), its reached one to 2 digits."""
    target = run.get("target_sparsity")
    if isinstance(target, (int, float)):
        return float(target)
    return round(float(run.get("sparsity") or 0.0), 2)


def _scores(runs: Sequence[Mapping[str, Any]], metric: str | None) -> tuple[str, bool, list[float | None]]:
    """(label, shown in percent, one value per run or None): accuracies in [0, 1] are shown as percentages."""
    found = [run_score(run, metric) for run in runs]
    names = [f[0] for f in found if f is not None]
    label = max(set(names), key=names.count) if names else (metric or "accuracy")
    if len(set(names)) > 1:
        label = "accuracy"
    values = [f[1] if f is not None else None for f in found]
    percent = "acc" in label.lower() and all(v is None or 0.0 <= v <= 1.0 for v in values)
    return (
        label.replace("_", " ").replace("/", " "),
        percent,
        [100 * v if percent and v is not None else v for v in values],
    )


# ---------------------------------------------------------------------------------------------------------- tables


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(value: Any) -> str:
    """``value`` as one markdown table cell: line breaks become spaces and ``|`` is escaped (no injected rows).

    Example:
        >>> _cell("cubic\\n| fake | row |")
        'cubic \\\\| fake \\\\| row \\\\|'
    """
    return " ".join(str(value).splitlines()).replace("|", "\\|")


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


# ---------------------------------------------------------------------------------------------------------- plots


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


def _label(run: Mapping[str, Any]) -> str:
    return f"{run.get('method', '?')} {_target(run):g}"


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
        ax.errorbar(xs, ys, yerr=errors, fmt="-o", capsize=3, label=method)
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
        ax.step(steps, reached, where="post", label=f"{_label(run)} ({run.get('name', Path(run['run_dir']).name)})")
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
        ax.set_yticks(range(len(layers)), layers if (not shared or index % columns == 0) else [], fontsize=7)
        if not shared or index == 0:  # first layer on top (shared y axes invert together)
            ax.invert_yaxis()
        ax.axvline(100 * _target(run), color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{_label(run)} · {float(run.get('sparsity') or 0):.3f}\n{run.get('name', '')}", fontsize=8)
        ax.set_xlabel("sparsity (%)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.suptitle("Per-layer sparsity of every run (title: method target · reached; dashed: target)", fontsize=10)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------------------- CLI


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
    out = args.out or Path(args.paths[0]) / "report"
    if out.exists() and not out.is_dir():
        raise SystemExit(f"pat-report: error: --out {out} is a file, not a folder")
    table = summary_table(runs, args.metric)
    per_run = _runs_table(runs, args.metric)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# pat-callbacks report\n\n{table}\n\n## Runs\n\n{per_run}\n")
    except OSError as error:
        raise SystemExit(f"pat-report: error: cannot write into --out {out} ({error.strerror or error})") from None
    if not args.no_plots:
        written = [
            plot_accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png", args.metric),
            plot_schedule(runs, out / "schedule.png"),
            plot_layer_sparsity(runs, out / "layer_sparsity.png"),
        ]
        print("\n".join(f"wrote {p}" for p in written if p is not None))
        if written[0] is None:
            print("no accuracy metric found: no accuracy_vs_sparsity.png (name one with --metric)", file=sys.stderr)
    print(f"wrote {out / 'report.md'}\n")
    print(table)  # last, so a console run (make demo) ends with the comparison


if __name__ == "__main__":
    main()
