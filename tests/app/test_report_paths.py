"""pat-report writes only into ``--out``: run methods and names that look like paths (``../x``, ``/tmp/x``, ``a/b``),
hold a NUL byte or run to thousands of characters are text in its tables and plots, never part of a path; a link
left in ``--out`` (or a ``report`` link in the sweep's folder) cannot send a write elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pat_callbacks.app.report import main

HOSTILE = ["../x", "/tmp/x", "a/b", "../../../../../../tmp/pat_report_escape", "nul\x00byte", "L" * 5000]
PNGS = ["accuracy_vs_sparsity.png", "layer_sparsity.png", "schedule.png"]


def _tree(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file and link below ``root`` with its size and modification time (links not followed)."""
    return {p: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*") if not p.is_dir()}


def _sweep(root: Path, methods: list[str], folders: list[str] | None = None) -> None:
    for i, method in enumerate(methods):
        run = root / (folders[i] if folders else f"r{i}")
        (run / "csv").mkdir(parents=True)
        metrics = {"method": method, "target_sparsity": 0.5, "sparsity": 0.5, "test_acc": 0.8}
        (run / "metrics.json").write_text(json.dumps(metrics | {"layer_sparsity": {f"fc.{method[:40]}": 0.5}}))
        (run / "csv" / "metrics.csv").write_text("step,pruning/target,pruning/sparsity\n0,0.1,0.1\n5,0.5,0.5\n")


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("pat-report: error: ") and "\n" not in message, message
    return message


def test_hostile_methods_and_run_names_are_text_and_every_write_lands_in_out(tmp_path, monkeypatch):
    runs, out, cwd = tmp_path / "runs", tmp_path / "out", tmp_path / "cwd"
    # run folders named like the methods where a folder can be: nested (a/b), dot-dot-like, 255 bytes long
    _sweep(runs, HOSTILE, ["r0", "r1", "a/b", "..x", "nul", "D" * 255])
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a write relative to the working folder would land here, under tmp_path, and be seen
    before = _tree(tmp_path)
    main([str(runs), "--out", str(out)])
    after = _tree(tmp_path)
    written = {p for p in after if before.get(p) != after[p]}
    assert written == {out / name for name in ["report.md", *PNGS]}
    assert not Path("/tmp/x").exists() and not Path("/tmp/pat_report_escape").exists()
    text = (out / "report.md").read_text()
    assert "\x00" not in text and "nul\\x00byte" in text and "L" * 5000 in text
    assert "| a/b |" in text and "| ../x |" in text  # the run names and methods are cells of the tables
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    assert [len(block.splitlines()) for block in tables] == [2 + len(HOSTILE)] * 2


@pytest.mark.parametrize("name", ["report.md", *PNGS])
def test_a_link_in_out_to_a_file_elsewhere_is_refused_naming_it_and_the_file_is_untouched(tmp_path, name):
    _sweep(tmp_path / "runs", ["cubic"])
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("mine")
    (out / name).symlink_to(victim)
    message = _error([str(tmp_path / "runs"), "--out", str(out)])
    assert message.startswith(f"pat-report: error: {out / name} leads to {victim}, outside --out {out}")
    assert victim.read_text() == "mine"


def test_a_dangling_link_in_out_is_refused_and_nothing_is_created_where_it_points(tmp_path):
    _sweep(tmp_path / "runs", ["cubic"])
    out, target = tmp_path / "out", tmp_path / "elsewhere" / "report.md"
    out.mkdir()
    target.parent.mkdir()
    (out / "report.md").symlink_to(target)
    assert "outside --out" in _error([str(tmp_path / "runs"), "--out", str(out)])
    assert not target.exists()


def test_the_default_out_may_not_be_a_link_out_of_the_sweep(tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    _sweep(runs, ["cubic"])
    elsewhere.mkdir()
    (runs / "report").symlink_to(elsewhere)
    message = _error([str(runs), "--no-plots"])
    assert message == (
        f"pat-report: error: {runs / 'report'} leads to {elsewhere}, outside {runs}: remove the link or give --out"
    )
    assert not any(elsewhere.iterdir())
    main([str(runs), "--no-plots", "--out", str(elsewhere)])  # named on the command line: the user's choice
    assert (elsewhere / "report.md").exists()


def test_a_link_to_a_folder_inside_the_sweep_is_followed(tmp_path):
    runs = tmp_path / "runs"
    _sweep(runs, ["cubic"])
    (runs / "reports").mkdir()
    (runs / "report").symlink_to(runs / "reports")
    main([str(runs), "--no-plots"])
    assert (runs / "reports" / "report.md").exists()
