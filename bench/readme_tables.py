"""Rewrite the README's generated blocks from the results files under bench/results.

A block sits between two marker comments and is replaced whole::

    <!-- BEGIN bench/readme_tables.py: overhead -->
    ...generated, do not edit...
    <!-- END bench/readme_tables.py: overhead -->

Blocks: ``demo`` (the table of bench/results/demo.md, `make demo` over 3 seeds, and the time each command took),
``overhead`` (the table of bench/results/overhead.md), ``accuracy-reading`` (the best method per sparsity and
Lightning ModelPruning's gap to it, computed from bench/results/accuracy.csv with the rounding of its table),
``pretrained`` and ``recovery`` (the table and the verdicts on the issue's targets of bench/results/pretrained.md
and recovery.md), ``minilm`` (the fidelity table and the verdicts on issue #31's targets of
bench/results/pretrained_minilm.md).

    python bench/readme_tables.py            # rewrite README.md
    python bench/readme_tables.py --check    # exit 1 if README.md differs from what the results files give

tests/bench/test_readme_tables.py runs the check, so a results file changed without the README fails the suite.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MARKER = "bench/readme_tables.py"
_BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN " + re.escape(MARKER) + r": (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
    r"(?P<end><!-- END " + re.escape(MARKER) + r": (?P=name) -->)",
    re.S,
)


def first_table(markdown: str) -> str:
    """The first markdown table (consecutive lines starting with ``|``) of a text.

    Example:
        >>> first_table("# t\\n\\nintro\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n\\nafter\\n| x |\\n")
        '| a | b |\\n|---|---|\\n| 1 | 2 |'
    """
    lines, table = markdown.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    if not table:
        raise ValueError("Expected a markdown table, but found no line starting with '|'")
    return "\n".join(table)


def bullets_after(markdown: str, heading: str) -> str:
    """The bullet list (lines starting with ``- ``) that follows the first line starting with ``heading``.

    Example:
        >>> bullets_after("# t\\n\\n## Targets\\n\\n- a: met\\n- b: missed\\n\\nafter\\n", "## Targets")
        '- a: met\\n- b: missed'
    """
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise ValueError(f"Expected a line starting with {heading!r}, but found none")
    found: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("- "):
            found.append(line)
        elif found:
            break
    if not found:
        raise ValueError(f"Expected a bullet list after {heading!r}, but found none")
    return "\n".join(found)


def _table_and_bullets(name: str, heading: str) -> Callable[[Path], str]:
    def block(results: Path) -> str:
        text = (results / name).read_text()
        return first_table(text) + "\n\n" + bullets_after(text, heading)

    return block


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd rounded to 0.1, as bench/accuracy.py's table shows them."""
    return round(statistics.mean(values), 1), round(statistics.stdev(values), 1) if len(values) > 1 else 0.0


def accuracy_cells(rows: list[dict[str, str]], model: str = "convbase") -> dict[tuple[str, float], tuple[float, float]]:
    """``(method, target) -> (mean, sd)`` of test accuracy, rounded as in bench/results/accuracy.md.

    Example:
        >>> rows = [{"method": "pat x", "model": "convbase", "target_sparsity": "0.9", "test_acc": a}
        ...         for a in ("80.0", "82.0")]
        >>> accuracy_cells(rows)
        {('pat x', 0.9): (81.0, 1.4)}
    """
    groups: dict[tuple[str, float], list[float]] = {}
    for row in rows:
        if row["model"] == model:
            groups.setdefault((row["method"], float(row["target_sparsity"])), []).append(float(row["test_acc"]))
    return {key: _mean_sd(values) for key, values in groups.items()}


PEER = "Lightning ModelPruning (cubic amounts)"


def accuracy_reading(rows: list[dict[str, str]], sparsities: tuple[float, ...] = (0.8, 0.9, 0.95)) -> str:
    """Two bullets: our best method at each sparsity, and ModelPruning's gap to it (from the rounded cells).

    Example:
        >>> rows = [{"method": m, "model": "convbase", "target_sparsity": "0.9", "test_acc": a}
        ...         for m, a in [("pat a", "88.0"), ("pat b", "85.0"), (PEER, "80.0")]]
        >>> print(accuracy_reading(rows, (0.9,)))
        - Best at 90%: pat a, 88.0 ± 0.0.
        - Lightning ModelPruning (same cubic amounts, at epoch ends) trails our best by 8.0 points at 90%.
    """
    cells = accuracy_cells(rows)
    best, gaps = [], []
    for target in sparsities:
        ours = {method: cell for (method, t), cell in cells.items() if t == target and method.startswith("pat ")}
        if not ours:
            raise ValueError(f"Expected `pat ...` rows at sparsity {target} in the accuracy results, but found none")
        method, (mean, sd) = max(ours.items(), key=lambda item: item[1][0])
        best.append(f"{target:.0%}: {method}, {mean:.1f} ± {sd:.1f}")
        if (PEER, target) in cells:
            gaps.append(f"{mean - cells[(PEER, target)][0]:.1f} points at {target:.0%}")
    lines = [f"- Best at {'; at '.join(best)}."]
    if gaps:
        lines.append(
            "- Lightning ModelPruning (same cubic amounts, at epoch ends) trails our best by " + ", ".join(gaps) + "."
        )
    return "\n".join(lines)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _demo(results: Path) -> str:
    text = (results / "demo.md").read_text()
    times = re.search(r"^The three commands .*$", text, re.M)  # the line, with the --note that follows it
    return first_table(text) + (f"\n\n{times.group(0)}" if times else "")


BLOCKS: dict[str, Callable[[Path], str]] = {
    "demo": _demo,
    "overhead": lambda results: first_table((results / "overhead.md").read_text()),
    "accuracy-reading": lambda results: accuracy_reading(_read_csv(results / "accuracy.csv")),
    "pretrained": _table_and_bullets("pretrained.md", "## Does the published ordering reproduce?"),
    "recovery": _table_and_bullets("recovery.md", "Targets (issue 23"),
    "minilm": _table_and_bullets("pretrained_minilm.md", "## Targets (issue #31)"),
}


def render(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with every generated block rewritten from ``results``; an unknown block name is an error.

    Example:
        >>> import tempfile
        >>> results = Path(tempfile.mkdtemp())
        >>> _ = (results / "overhead.md").write_text("# o\\n\\n| a |\\n|---|\\n| 2 |\\n")
        >>> block = "<!-- {} bench/readme_tables.py: overhead -->"
        >>> text = f"x\\n{block.format('BEGIN')}\\nold\\n{block.format('END')}\\n"
        >>> print(render(text, results))
        x
        <!-- BEGIN bench/readme_tables.py: overhead -->
        | a |
        |---|
        | 2 |
        <!-- END bench/readme_tables.py: overhead -->
        <BLANKLINE>
    """
    begins = re.findall(r"<!-- BEGIN " + re.escape(MARKER) + r": ([\w-]+) -->", readme)
    found = [match.group("name") for match in _BLOCK.finditer(readme)]
    if begins != found:
        missing = next(name for name in begins if name not in found or begins.count(name) != found.count(name))
        raise ValueError(f"README block {missing!r} has a BEGIN marker without its END marker")

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise ValueError(f"Unknown README block {name!r}; known: {', '.join(sorted(BLOCKS))}")
        return f"{match.group('begin')}{BLOCKS[name](results).rstrip()}\n{match.group('end')}"

    return _BLOCK.sub(replace, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not what the results give")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = render(text, args.results)
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date: run python bench/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    print(f"wrote {args.readme}: {len(_BLOCK.findall(new))} generated blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
