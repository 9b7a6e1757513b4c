"""Reading runs for ``pat-report``: the ``metrics.json`` / ``metrics.csv`` files at or below run and multirun folders,
every value the report computes with checked (a bad one is an error naming the file and key), and each run's accuracy.

Example:
    >>> run_score({"metrics": {"train/loss": 0.3, "val/acc": 0.8}})
    ('val/acc', 0.8)
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PREFERRED_METRICS", "collect_runs", "run_score"]

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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
