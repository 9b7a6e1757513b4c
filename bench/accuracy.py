"""Accuracy vs sparsity on MNIST-1D ConvBase: pat-callbacks' methods and the peers, same data and step budget.

Every run: Adam lr 1e-2, batch 100, 6,000 steps (the MNIST-1D paper's protocol), seeds 0..N-1. Gradual methods
prune from 10% to 70% of training with updates every 100 steps; dynamic ones update every 100 steps until 75%.

    python bench/accuracy.py             # full grid (about 30 min on 2 cores)
    python bench/accuracy.py --quick     # 1 seed, sparsities 0.8 and 0.9, fewer steps (a few minutes)

Writes bench/results/accuracy.{csv,md,png} (or --out DIR). Rows already in the CSV are reused, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The former Taylor history (every step since the last update, float32): the rows measured with it before the
# windowed bfloat16 history became the default keep it, so their numbers stay as measured.
FORMER_HISTORY = ["pruning.accumulate_window=null", "pruning.history_dtype=float32"]
# Ours: extra Hydra overrides on top of `python train.py`.
OURS: dict[str, list[str]] = {
    "pat cubic magnitude": ["+pruning=cubic", "pruning.criterion=magnitude", "pruning.allocation=uniform"],
    "pat cubic taylor": ["+pruning=cubic", "pruning.criterion=taylor", "pruning.allocation=uniform", *FORMER_HISTORY],
    "pat cubic taylor + sensitivity": [
        "+pruning=cubic",
        "pruning.criterion=taylor",
        "pruning.allocation=sensitivity",
        *FORMER_HISTORY,
    ],
    "pat cubic magnitude + global": ["+pruning=cubic", "pruning.criterion=magnitude", "pruning.allocation=global"],
    "pat cubic taylor + global (default)": ["+pruning=cubic"],  # |w*g| over the 40 steps before each update, bf16
    "pat cubic taylor + global + window 20 bfloat16": ["+pruning=cubic", "pruning.accumulate_window=20"],
    # the former default's history (every step since the last update, float32) rerun beside the default: a control
    "pat cubic taylor + global + every step float32 (rerun)": ["+pruning=cubic", *FORMER_HISTORY],
    "pat cubic taylor + global + rewind 300": ["+pruning=cubic", "pruning.rewind_step=300", *FORMER_HISTORY],
    "pat odd/even": ["+pruning=odd_even"],
    "pat rigl": ["+pruning=rigl"],
    "pat set": ["+pruning=set"],
    "pat static random": ["+pruning=static"],
    "one-shot magnitude, no fine-tune": ["+pruning=one_shot", "pruning.start_fraction=1.0"],
    "one-shot magnitude + fine-tune": ["+pruning=one_shot", "pruning.start_fraction=0.5"],
}
PEERS = ("Lightning ModelPruning (cubic amounts)", "rigl-torch RigL")
# torch.ao.pruning's WeightNormSparsifier raises on Conv1d/Conv2d weights ("shape '[1, 1, 125]' is invalid for input
# of size 5"), so it cannot prune ConvBase's convolutions; it appears in bench/overhead.py (MLP) only.
NOT_RUN = {"torch.ao CubicSL": "fails on Conv1d weights (WeightNormSparsifier: shape '[1, 1, 125]' is invalid)"}
SPARSITY_KEY = "sparsity"  # one key for every pruning config (GradualPruning's former `final_sparsity` included)


def job(method: str, model: str, sparsity: float, seed: int, steps: int) -> dict[str, Any]:
    """One training run in a worker process (1 thread); returns a CSV row."""
    import torch

    torch.set_num_threads(1)
    from hydra import compose, initialize_config_dir

    from pat_callbacks.app.config import register_configs
    from pat_callbacks.app.run import CONF_DIR, run_training

    register_configs()
    overrides = [f"seed={seed}", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", "~logger"]
    overrides += [f"model={model}", "num_threads=1", "~callbacks.checkpoint"]
    start = time.perf_counter()
    if method == "dense" or method in OURS:
        if method in OURS:
            overrides += OURS[method] + [f"pruning.{SPARSITY_KEY}={sparsity}"]
        if method == "pat cubic taylor + sensitivity":
            overrides.append("pruning.max_sparsity=0.995")
    elif method == "Lightning ModelPruning (cubic amounts)":
        epochs = steps // 40
        overrides += [
            "+callbacks.peer._target_=bench.peers.ModelPruningToSparsity",
            f"+callbacks.peer.final_sparsity={sparsity}",
            f"+callbacks.peer.start_epoch={round(0.1 * epochs)}",
            f"+callbacks.peer.end_epoch={round(0.7 * epochs)}",
        ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "rigl-torch RigL":
            import lightning.pytorch as pl
            from hydra.utils import instantiate

            from bench.peers import rigl_torch_run

            pl.seed_everything(seed, verbose=False)
            module = instantiate(cfg.model)
            result = rigl_torch_run(module.net, instantiate(cfg.datamodule), sparsity, steps, lr=1e-2, seed=seed)
        else:
            result = run_training(cfg, output_dir=tmp)
    return {
        "method": method,
        "model": model,
        "target_sparsity": sparsity,
        "seed": seed,
        "test_acc": round(float(result["test_acc"]) * 100, 2),
        "sparsity": round(float(result["sparsity"]), 4),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def plan(args: argparse.Namespace) -> list[tuple[str, str, float, int, int]]:
    jobs = [("dense", "convbase", 0.0, seed, args.steps) for seed in range(args.seeds)]
    for sparsity in args.sparsities:
        for method in args.methods or [*OURS, *PEERS]:
            jobs += [(method, "convbase", sparsity, seed, args.steps) for seed in range(args.seeds)]
    if args.wide:
        jobs += [("dense", "convbase_wide", 0.0, seed, args.steps) for seed in range(args.seeds)]
        for method in ("pat cubic taylor", "pat rigl"):
            jobs += [(method, "convbase_wide", 0.9, seed, args.steps) for seed in range(args.seeds)]
    return jobs


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], tuple[float, float, float, int]]:
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["model"], float(row["target_sparsity"])), []).append(row)
    out = {}
    for key, items in groups.items():
        accs = [float(r["test_acc"]) for r in items]
        reached = statistics.mean(float(r["sparsity"]) for r in items)
        out[key] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, reached, len(accs))
    return out


def write_table(rows: list[dict[str, Any]], out: Path, command: str) -> str:
    stats = summarize(rows)
    sparsities = sorted({s for (_, model, s) in stats if model == "convbase" and s > 0})
    methods = ["dense", *OURS, *PEERS]
    lines = [
        "# Accuracy vs sparsity: MNIST-1D, ConvBase (5,210 parameters)",
        "",
        f"Command: `{command}`. Test accuracy %, mean ± std over seeds (n per cell in the CSV); "
        "reached sparsity of the conv/linear weights in brackets where it differs from the target by > 0.005.",
        "",
        "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    for method in methods:
        cells = []
        for s in sparsities:
            key = (method, "convbase", 0.0 if method == "dense" else s)
            if key not in stats:
                cells.append("")
                continue
            mean, std, reached, _ = stats[key]
            note = f" [{reached:.3f}]" if method != "dense" and abs(reached - s) > 0.005 else ""
            cells.append(f"{mean:.1f} ± {std:.1f}{note}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    wide = {k: v for k, v in stats.items() if k[1] == "convbase_wide"}
    if wide:
        lines += [
            "",
            "ConvBase with 100 channels (4x wider):",
            "",
            "| method | sparsity | test acc % |",
            "|---|---|---|",
        ]
        for (method, _, _target), (mean, std, reached, _) in sorted(wide.items(), key=lambda kv: kv[0][2]):
            lines.append(f"| {method} | {reached:.3f} | {mean:.1f} ± {std:.1f} |")
    lines += ["", *(f"Not run: {name}: {why}." for name, why in NOT_RUN.items())]
    text = "\n".join(lines) + "\n"
    (out / "accuracy.md").write_text(text)
    return text


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    dense = stats.get(("dense", "convbase", 0.0))
    if dense:
        ax.axhline(dense[0], color="black", linestyle=":", label=f"dense ({dense[0]:.1f}%)")
    for method in [*OURS, *PEERS]:
        points = sorted((s, v) for (m, model, s), v in stats.items() if m == method and model == "convbase")
        if not points:
            continue
        xs = [-math.log10(1 - s) for s, _ in points]
        style = "-o" if method.startswith("pat") else "--s"
        ax.errorbar(xs, [v[0] for _, v in points], yerr=[v[1] for _, v in points], fmt=style, capsize=3, label=method)
    ticks = sorted({s for (_, model, s) in stats if model == "convbase" and s > 0})
    ax.set_xticks([-math.log10(1 - s) for s in ticks], [f"{s:g}" for s in ticks])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D ConvBase: accuracy vs sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-wide", dest="wide", action="store_false", help="skip the 4x-wider ConvBase")
    parser.add_argument("--quick", action="store_true", help="1 seed, sparsities 0.8 0.9, 2,000 steps, no wide")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--methods", nargs="+", choices=[*OURS, *PEERS], help="only these rows (and dense)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.sparsities, args.steps, args.wide = 1, [0.8, 0.9], 2000, False
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "accuracy.csv"
    fields = ["method", "model", "target_sparsity", "seed", "test_acc", "sparsity", "steps", "seconds"]
    rows = []
    if csv_path.exists():
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
    done = {(r["method"], r["model"], float(r["target_sparsity"]), int(r["seed"]), int(r["steps"])) for r in rows}
    todo = [j for j in plan(args) if j not in done]
    print(f"{len(todo)} runs to do ({len(done)} reused from {csv_path})", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool, open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if not rows:
            writer.writeheader()
        for row in pool.map(job, *zip(*todo, strict=True)) if todo else []:
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            print(
                f"{row['method']:40s} {row['model']:14s} s={row['target_sparsity']:<5} seed={row['seed']} "
                f"acc={row['test_acc']:6.2f} reached={row['sparsity']:.4f} ({row['seconds']} s)",
                flush=True,
            )
    rows = [r for r in rows if int(r["steps"]) == args.steps]
    command = "python bench/accuracy.py " + " ".join(sys.argv[1:])
    print(write_table(rows, args.out, command.strip()))
    plot(rows, args.out)


if __name__ == "__main__":
    main()
