"""The README's generated blocks match bench/results (bench/readme_tables.py), and bench/demo.py runs exactly the
commands of the Makefile's `make demo` (issue #24)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bench import demo, readme_tables

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_matches_the_results_files():
    text = (ROOT / "README.md").read_text()
    names = re.findall(r"<!-- BEGIN bench/readme_tables.py: ([\w-]+) -->", text)
    assert sorted(names) == ["accuracy-reading", "demo", "minilm", "overhead", "pretrained", "recovery"]
    assert readme_tables.render(text) == text, "README.md is out of date: run python bench/readme_tables.py"


def test_a_changed_results_file_changes_its_block(tmp_path):
    for name in ("demo.md", "overhead.md", "accuracy.csv", "pretrained.md", "recovery.md", "pretrained_minilm.md"):
        (tmp_path / name).write_text((ROOT / "bench" / "results" / name).read_text())
    overhead = (tmp_path / "overhead.md").read_text()
    (tmp_path / "overhead.md").write_text(overhead.replace("| mlp | dense |", "| mlp | dense (edited) |", 1))
    text = (ROOT / "README.md").read_text()
    rendered = readme_tables.render(text, tmp_path)
    assert "| mlp | dense (edited) |" in rendered and rendered.replace(" (edited)", "", 1) == text
    recovery = (tmp_path / "recovery.md").read_text()
    (tmp_path / "recovery.md").write_text(recovery.replace(": met", ": met (edited)", 1))
    assert ": met (edited)" in readme_tables.render(text, tmp_path)  # the targets' verdicts come along


def test_a_begin_marker_without_its_end_and_an_unknown_block_are_errors(tmp_path):
    begin = "<!-- BEGIN bench/readme_tables.py: {} -->\n"
    end = "<!-- END bench/readme_tables.py: {} -->"
    with pytest.raises(ValueError, match="README block 'overhead' has a BEGIN marker without its END marker"):
        readme_tables.render(begin.format("overhead") + "x\n", tmp_path)
    with pytest.raises(
        ValueError,
        match="Unknown README block 'nope'; known: accuracy-reading, demo, minilm, overhead, pretrained, recovery",
    ):
        readme_tables.render(begin.format("nope") + "x\n" + end.format("nope"), tmp_path)


def test_the_reading_bullets_use_the_rounded_cells_of_the_accuracy_table():
    text = (ROOT / "bench" / "results" / "accuracy.md").read_text()
    table = readme_tables.first_table(text)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    header = rows[0]
    cell = {(row[0], float(t)): row[i] for row in rows[2:] for i, t in enumerate(header[1:], 1)}
    reading = readme_tables.accuracy_reading(readme_tables._read_csv(ROOT / "bench" / "results" / "accuracy.csv"))
    for target in (0.8, 0.9, 0.95):
        best = re.search(rf"{target:.0%}: ([^,]+), (\d+\.\d ± \d+\.\d)", reading)
        assert best and cell[(best.group(1), target)].startswith(best.group(2)), (target, reading)
        peer = float(cell[(readme_tables.PEER, target)].split(" ± ")[0])
        gap = float(re.search(rf"([\d.]+) points at {target:.0%}", reading).group(1))
        assert gap == pytest.approx(float(best.group(2).split(" ± ")[0]) - peer, abs=1e-9)


def _makefile_demo() -> list[tuple[str, list[str]]]:
    """(folder, train.py overrides) of each `train.py` line of the Makefile's demo target, $(DEMO_PEER) expanded."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    peer = shlex.split(re.search(r"^DEMO_PEER := (.*)$", text, re.M).group(1))
    target = text[text.index("\ndemo:") :].split("\n\n")[0]
    runs = []
    for line in target.splitlines():
        if "train.py" not in line:
            continue
        args = shlex.split(line.split("train.py", 1)[1].replace("$(DEMO_PEER)", " ".join(peer)))
        folder = next(a for a in args if a.startswith("hydra.run.dir=")).removeprefix("hydra.run.dir=outputs/demo/")
        runs.append((folder, [a for a in args if not a.startswith("hydra.run.dir=")]))
    return runs


def test_bench_demo_runs_the_commands_of_make_demo():
    assert sorted(_makefile_demo()) == sorted(demo.RUNS.values())
    command = demo.command("cubic/taylor/global (the default)", 2, Path("/tmp/x"))
    assert command[1:] == [
        "train.py",
        "+pruning=cubic",
        "pruning.sparsity=0.9",
        "seed=2",
        "hydra.run.dir=/tmp/x/pat_cubic_taylor_global/seed2",
    ]
    with pytest.raises(ValueError, match="Expected `method` to be one of"):
        demo.command("dense ", 0, Path("/tmp/x"))


def test_demo_md_is_the_table_of_demo_csv():
    rows = demo._read(ROOT / "bench" / "results" / "demo.csv")
    keys = [(row["method"], int(row["seed"])) for row in rows]
    assert len(keys) == len(set(keys)) and {method for method, _ in keys} <= set(demo.RUNS)
    assert {seed for _, seed in keys} <= {0, 1, 2}
    assert demo.table(rows) in (ROOT / "bench" / "results" / "demo.md").read_text()
