"""pat-report on files and folders that are not what it expects: one-line errors naming the path or key, exit 1,
or a skip with a one-line warning where the rest of a sweep is still worth reporting (issue #24)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pat_callbacks.app.report import collect_runs, main, summary_table


def _run(root: Path, name: str, **metrics) -> Path:
    (root / name).mkdir(parents=True)
    file = root / name / "metrics.json"
    file.write_text(json.dumps({"method": "cubic", "target_sparsity": 0.9, "sparsity": 0.9, **metrics}))
    return file


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("pat-report: error: ") and "\n" not in message, message
    return message


def test_a_folder_named_metrics_json_is_skipped_with_a_warning(tmp_path, capsys):
    _run(tmp_path, "0", test_acc=0.9)
    (tmp_path / "1" / "metrics.json").mkdir(parents=True)  # a folder, not a run's file
    runs = collect_runs([tmp_path])
    assert [run["name"] for run in runs] == ["0"]
    warning = capsys.readouterr().err.strip()
    assert warning == f"pat-report: warning: skipped {tmp_path / '1' / 'metrics.json'}: a folder, not a file"


def test_a_folder_named_metrics_json_alone_is_nothing_to_read(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    assert _error([str(tmp_path)]).endswith(
        f"nothing to read at or below {tmp_path}: no metrics.json, no metrics.csv with rows"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sparsity", "high"),
        ("sparsity", float("nan")),
        ("target_sparsity", "0.9"),
        ("test_acc", "0.9"),
        ("fit_seconds", [1]),
        ("global_step", "ten"),
        ("method", 3),
    ],
)
def test_a_string_or_nan_where_a_number_belongs_exits_1_naming_file_and_key(tmp_path, key, value):
    file = _run(tmp_path, "0", test_acc=0.9)
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, key: value}))  # json writes NaN as the bare token NaN, as train.py would
    message = _error([str(tmp_path), "--no-plots"])
    assert message.startswith(f"pat-report: error: {file}: key '{key}' ")


def test_a_bad_layer_sparsity_value_exits_1_naming_the_layer(tmp_path):
    file = _run(tmp_path, "0", test_acc=0.9, layer_sparsity={"fc1": 0.9, "fc2": "x"})
    assert _error([str(tmp_path)]).startswith(f"pat-report: error: {file}: key 'layer_sparsity.fc2' ")


def test_a_nan_accuracy_counts_as_missing_with_a_warning(tmp_path, capsys):
    _run(tmp_path, "0", test_acc=0.8)
    _run(tmp_path, "1", test_acc=float("nan"), metrics={"test_loss": float("inf")})
    runs = collect_runs([tmp_path])
    assert "pat-report: warning: " in capsys.readouterr().err
    assert not any(isinstance(v, float) and math.isnan(v) for run in runs for v in run.values())
    table = summary_table(runs)
    assert "| cubic | 0.9 | 2 | 80.00 ± 0.00 |" in table, table  # the NaN run is counted, its accuracy is not


def test_nan_warning_names_the_file_and_key(tmp_path, capsys):
    bad = _run(tmp_path, "1", test_acc=float("nan"))
    collect_runs([tmp_path])
    assert capsys.readouterr().err.strip() == (
        f"pat-report: warning: {bad}: key 'test_acc' is NaN: reported as missing (n/a)"
    )


def test_out_an_existing_file_exits_1_naming_it(tmp_path):
    _run(tmp_path, "0", test_acc=0.9)
    out = tmp_path / "report.md"
    out.write_text("mine")
    assert _error([str(tmp_path), "--out", str(out)]) == f"pat-report: error: --out {out} is a file, not a folder"
    assert out.read_text() == "mine"


def test_method_names_with_newlines_or_pipes_do_not_add_table_rows(tmp_path):
    _run(tmp_path, "0", test_acc=0.9, method="cubic\n| injected | 0 | 1 | 100.00 ± 0.00 | 0 | 0 |")
    _run(tmp_path, "a|b\nc", test_acc=0.8, method="x\r\ny")
    main([str(tmp_path), "--no-plots", "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    lines = text.splitlines()
    assert not any(line.startswith("| injected") for line in lines), text
    # the summary and the per-run tables each keep header + rule + one line per group / run
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    assert [len(block.splitlines()) for block in tables] == [4, 4], text
    assert all(line.count("|") - line.count("\\|") == 7 for line in tables[0].splitlines()), tables[0]
