"""`make demo`'s three runs over several seeds: dense, the default GradualPruning at 90%, Lightning ModelPruning at 90%.

Each run is the exact `python train.py ...` command of the Makefile's ``demo`` target plus ``seed=S`` (and its own
``hydra.run.dir``), started as a subprocess with the interpreter running this script, so the wall time of a row is
that of the command a user types (start-up, data generation, 6,000 steps, test).

    nice -n 10 python bench/demo.py                    # seeds 0, 1, 2 (about 9 runs of 1-3 min on 2 cores)
    python bench/demo.py --seeds 0 --runs-dir /tmp/demo

Writes bench/results/demo.{csv,md} (or --out DIR). Rows already in the CSV are reused, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The Makefile's demo target, run by run (tests/bench/test_demo.py checks that the two agree).
DEMO_PEER = [
    "+callbacks.peer._target_=bench.peers.ModelPruningToSparsity",
    "+callbacks.peer.final_sparsity=0.9",
    "+callbacks.peer.start_epoch=15",
    "+callbacks.peer.end_epoch=105",
    "+callbacks.peer.use_global_unstructured=true",
]
RUNS: dict[str, tuple[str, list[str]]] = {
    # method label -> (folder name in `make demo`'s outputs/demo/, train.py overrides)
    "dense": ("dense", []),
    "cubic/taylor/global (the default)": ("pat_cubic_taylor_global", ["+pruning=cubic", "pruning.sparsity=0.9"]),
    "Lightning ModelPruning (global L1)": ("lightning_modelpruning", DEMO_PEER),
}
TARGETS = {"dense": 0.0, "Lightning ModelPruning (global L1)": 0.9, "cubic/taylor/global (the default)": 0.9}
FIELDS = ["method", "seed", "test_acc", "sparsity", "wall_s", "cpu_s"]


def command(method: str, seed: int, runs_dir: Path) -> list[str]:
    """The `python train.py` command of one demo run with ``seed`` (output in ``runs_dir/<folder>/seed<S>``).

    Example:
        >>> command("dense", 1, Path("/tmp/d"))[2:]
        ['seed=1', 'hydra.run.dir=/tmp/d/dense/seed1']
    """
    if method not in RUNS:
        raise ValueError(f"Expected `method` to be one of {sorted(RUNS)}, but got {method!r}")
    folder, overrides = RUNS[method]
    return [
        sys.executable,
        "train.py",
        *overrides,
        f"seed={seed}",
        f"hydra.run.dir={runs_dir / folder / f'seed{seed}'}",
    ]


def run_one(method: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """Run one demo command; return its CSV row (test accuracy in %, reached sparsity, wall and CPU seconds).

    The CPU seconds (user + system of the command) are what the run costs whatever else the machine is doing; the
    wall seconds of a shared machine also hold the time other processes had the cores.
    """
    cmd = command(method, seed, runs_dir)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    metrics = json.loads((runs_dir / RUNS[method][0] / f"seed{seed}" / "metrics.json").read_text())
    return {
        "method": method,
        "seed": seed,
        "test_acc": round(100 * metrics["test_acc"], 2),
        "sparsity": round(metrics["sparsity"], 4),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
    }


def mean_sd(values: list[float], digits: int = 1) -> str:
    """``mean ± sd`` (sample standard deviation; the mean alone for one value).

    Example:
        >>> mean_sd([82.0, 84.0, 86.0])
        '84.0 ± 2.0'
        >>> mean_sd([5.0])
        '5.0'
    """
    if not values:
        raise ValueError("Expected at least one value, but got none")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _seconds(rows: list[dict[str, Any]], key: str) -> str:
    values = [float(row[key]) for row in rows if row.get(key) not in (None, "")]
    return mean_sd(values, digits=0) + ("" if len(values) == len(rows) else f" (n={len(values)})") if values else "n/a"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the rows: per method, test accuracy and CPU seconds as mean ± sd, wall seconds per seed.

    Example:
        >>> rows = [{"method": "dense", "seed": s, "test_acc": a, "sparsity": 0.0, "wall_s": w, "cpu_s": c}
        ...         for s, a, w, c in [(0, 92.0, 60.0, ""), (1, 93.0, 70.0, 110.0)]]
        >>> print(table(rows))
        | method | target | seeds | test acc % | per seed | reached sparsity | wall s per seed | CPU s |
        |---|---|---|---|---|---|---|---|
        | dense | 0 | 0, 1 | 92.5 ± 0.7 | 92.0, 93.0 | 0.0000 | 60 / 70 | 110 (n=1) |
    """
    lines = [
        "| method | target | seeds | test acc % | per seed | reached sparsity | wall s per seed | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in RUNS:
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: int(row["seed"]))
        if not mine:
            continue
        accs = [float(row["test_acc"]) for row in mine]
        walls = [f"{float(row['wall_s']):.0f}" for row in mine]  # per seed: runs of a shared machine differ in load
        lines.append(
            f"| {method} | {TARGETS[method]:g} | {', '.join(str(row['seed']) for row in mine)} | {mean_sd(accs)} | "
            f"{', '.join(f'{acc:.1f}' for acc in accs)} | {min(float(row['sparsity']) for row in mine):.4f} | "
            f"{' / '.join(walls)} | {_seconds(mine, 'cpu_s')} |"
        )
    return "\n".join(lines)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "demo_seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--note", default="", help="a sentence for demo.md on the conditions (e.g. machine load)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "demo.csv"
    rows = _read(csv_path)
    done = {(row["method"], int(row["seed"])) for row in rows}
    for seed in args.seeds:
        for method in RUNS:
            if (method, seed) in done:
                continue
            row = run_one(method, seed, args.runs_dir)
            print(f"{method} seed {seed}: {row['test_acc']}% at {row['sparsity']} in {row['wall_s']} s", flush=True)
            rows.append(row)
            _write(csv_path, rows)
    first = [row for row in rows if int(row["seed"]) == args.seeds[0]]
    walls = [f"{float(row['wall_s']):.0f}" for row in first]
    text = (
        "# `make demo` over seeds\n\n"
        f"Command: `python bench/demo.py --seeds {' '.join(map(str, args.seeds))}` (each row is the Makefile's "
        "`python train.py ...` plus `seed=S`, run as a subprocess on the 2 CPU cores of this machine). "
        "Test accuracy %, mean ± sample sd over the seeds; seconds per command, start-up and test included (wall: "
        "on a machine shared with other jobs, run under `nice -n 10`; CPU: user + system time of the command).\n\n"
        f"{table(rows)}\n\n"
        f"The three commands of seed {args.seeds[0]} took {' + '.join(walls)} = "
        f"{sum(float(row['wall_s']) for row in first):.0f} s wall.{' ' + args.note if args.note else ''}\n"
    )
    (args.out / "demo.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
