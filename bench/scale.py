"""How mask updates scale: time and transient memory of one update, as ratios to one pass over the weights.

Four square Linear layers of N/4 weights each (4M to 268M weights in all), float32, one CPU thread by default. Every
(size, variant) runs in a fresh process, so its resident-memory peak is its own. For each it measures:

- ``pass``: one ``abs()`` pass over every weight (the unit of time), the median of 5;
- the update: ``Pruner.prune_to`` (the call GradualPruning / DynamicSparseTraining make at an update step) to 80%
  after a first update to 70% (so masks exist and only shrink, as during a schedule), or RigL's drop-and-grow at 80%;
  its extra time over nothing, as ``update / pass``;
- transient memory: the peak resident memory during the update minus the resident memory before it (sampled every
  millisecond in a thread), as a fraction of the weights' bytes;
- ``mask_grads``: the per-step gradient masking, as a ratio to one pass.

    python bench/scale.py                         # 4M, 16M, 67M, 268M weights; all variants
    python bench/scale.py --sizes 4 16 --variants uniform global

Writes bench/results/scale.{csv,md,png} (or --out DIR).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("uniform", "global", "erk", "rigl", "2:4")
FIELDS = (
    "weights_m",
    "variant",
    "pass_ms",
    "update_ms",
    "update_per_pass",
    "transient_per_weight_bytes",
    "grad_mask_per_pass",
)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident memory seen while the block runs (sampled every millisecond)."""

    def __enter__(self) -> PeakRSS:
        self.before = _rss()
        self.peak = self.before
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(weights_m: float, variant: str, threads: int) -> dict[str, Any]:
    """One (size, variant) in this process."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from pat_callbacks import Pruner

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    width = max(64, round((weights_m * 2**20 / 4) ** 0.5 / 64) * 64)  # a multiple of 64: N:M and blocks fit
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(4)))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)

    def one_pass() -> float:
        start = time.perf_counter()
        for p in params:
            p.detach().abs()
        return time.perf_counter() - start

    pass_s = statistics.median(one_pass() for _ in range(5))
    options: dict[str, Any] = {"allocation": "uniform"}
    if variant == "global":
        options["allocation"] = "global"
    elif variant == "erk":
        options["allocation"] = "erk"
    elif variant == "2:4":
        options["pattern"] = "2:4"
    pruner = Pruner(model, **options)
    if variant == "2:4":
        pruner.prune_to(0.25)
        target = 0.5
    else:
        pruner.prune_to(0.7)
        target = 0.8
    if variant == "rigl":
        pruner.prune_to(0.8)
    with PeakRSS() as memory:
        start = time.perf_counter()
        if variant == "rigl":
            pruner.regrow(0.3, "rigl")
        else:
            pruner.prune_to(target)
        update_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(5):
        pruner.mask_grads()
    mask_s = (time.perf_counter() - start) / 5
    return {
        "module": pat_callbacks_file(),
        "weights_m": weights_m,
        "variant": variant,
        "pass_ms": round(pass_s * 1e3, 2),
        "update_ms": round(update_s * 1e3, 1),
        "update_per_pass": round(update_s / pass_s, 2),
        "transient_per_weight_bytes": round((memory.peak - memory.before) / weight_bytes, 3),
        "grad_mask_per_pass": round(mask_s / pass_s, 2),
    }


def pat_callbacks_file() -> str:
    import pat_callbacks

    return str(Path(pat_callbacks.__file__).parent)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        points = sorted((r["weights_m"], r) for r in rows if r["variant"] == variant)
        if not points:
            continue
        sizes = [p[0] for p in points]
        left.plot(sizes, [float(p[1]["update_per_pass"]) for p in points], marker="o", label=variant)
        right.plot(sizes, [float(p[1]["transient_per_weight_bytes"]) for p in points], marker="o", label=variant)
    for axis, title, ylabel, target in (
        (left, "Mask update time", "update time / one pass over the weights", None),
        (right, "Transient memory of an update", "peak extra RSS / weight bytes", 0.6),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("weights (millions)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        if target is not None:
            axis.axhline(target, linestyle="--", color="grey", label=f"target {target}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("pat-callbacks mask updates vs model size (4 square Linear layers, 1 CPU thread)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[4, 16, 67, 268], help="millions of weights")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--single", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(float(args.single[0]), args.single[1], args.threads)))
        return
    rows = []
    for size in args.sizes:
        for variant in args.variants:
            command = [sys.executable, __file__, "--single", f"{size:g}", variant, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.pop("module")
            rows.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "scale.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.csv'} and {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
