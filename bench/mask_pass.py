"""What one gradient-mask pass per step costs, by kernel, in a plain PyTorch loop (no Lightning, no callbacks).

The models and optimizer of ``bench/overhead.py`` (MLP 784-2048-2048-10 and the 6M-parameter CNN, SGD momentum,
batch 256), 90% of every weight matrix masked. The variants take turns step by step (dense, then each variant, then
dense again...), so a shared machine's slow moments hit them alike; each reports its median step and mean step
over dense's.

- ``dense``: no mask.
- ``uint8 multiply``: ``torch._foreach_mul_(grads, masks viewed as uint8)``, the pass before ``core.elementwise``.
- ``pieces (the library)``: ``core.elementwise.multiply_by_masks_``, the pass ``MaskStore.mask_grads`` makes.
- ``float32 mask``: ``torch._foreach_mul_`` by float32 masks, the same kernel with 4x the mask bytes (a reference
  for what a same-dtype multiply costs, not an option the library takes).

    python bench/mask_pass.py                    # both models
    python bench/mask_pass.py --models mlp --steps 100

Writes bench/results/mask_pass.{md,csv} (or --out DIR).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import BATCH, MODELS  # noqa: E402
from pat_callbacks.core.elementwise import multiply_by_masks_  # noqa: E402

VARIANTS = ("dense", "uint8 multiply", "pieces (the library)", "float32 mask")


def make_step(model_name: str, variant: str, seed: int = 0) -> Callable[[], float]:
    """One training step of ``model_name`` with ``variant``'s gradient-mask pass, on fixed random data; returns the
    seconds the pass itself took (0 for dense).

    Example:
        >>> step = make_step("mlp", "pieces (the library)")
        >>> step() > 0
        True
    """
    make_net, shape = MODELS[model_name]
    torch.manual_seed(seed)
    net = make_net()
    inputs, labels = torch.randn(BATCH, *shape), torch.randint(0, 10, (BATCH,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    weights = [p for p in net.parameters() if p.dim() > 1]
    masks = [torch.rand_like(p) > 0.9 for p in weights]
    with torch.no_grad():
        for weight, mask in zip(weights, masks, strict=True):
            weight.mul_(mask)
    as_uint8 = [m.view(torch.uint8) for m in masks]
    as_float = [m.float() for m in masks]

    def step() -> float:
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(inputs), labels).backward()
        grads = [w.grad for w in weights]
        start = time.perf_counter()
        if variant == "uint8 multiply":
            torch._foreach_mul_(grads, as_uint8)
        elif variant == "pieces (the library)":
            multiply_by_masks_(grads, masks)
        elif variant == "float32 mask":
            torch._foreach_mul_(grads, as_float)
        elapsed = time.perf_counter() - start if variant != "dense" else 0.0
        optimizer.step()
        return elapsed

    return step


def measure(model_name: str, steps: int, warmup: int, rounds: int) -> list[dict[str, object]]:
    """Median and mean step of every variant, taking turns step by step; ``rounds`` times with fresh models."""
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    passes: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    by_round: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_index in range(rounds):
        runners = {variant: make_step(model_name, variant, seed=round_index) for variant in VARIANTS}
        these: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for index in range(warmup + steps):
            for variant, step in runners.items():
                start = time.perf_counter()
                pass_seconds = step()
                if index >= warmup:
                    these[variant].append(time.perf_counter() - start)
                    passes[variant].append(pass_seconds)
        for variant in VARIANTS:
            times[variant] += these[variant]
            by_round[variant].append(statistics.median(these[variant]) / statistics.median(these["dense"]))
    dense_median, dense_mean = statistics.median(times["dense"]), statistics.fmean(times["dense"])
    return [
        {
            "model": model_name,
            "variant": variant,
            "step_ms": round(statistics.median(times[variant]) * 1e3, 2),
            "pass_ms": round(statistics.median(passes[variant]) * 1e3, 2),
            "ratio_to_dense": round(statistics.median(times[variant]) / dense_median, 3),
            "ratio_each_round": " / ".join(f"{r:.3f}" for r in by_round[variant]),
            "mean_ratio_to_dense": round(statistics.fmean(times[variant]) / dense_mean, 3),
        }
        for variant in VARIANTS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="fresh models each round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for model_name in args.models for row in measure(model_name, args.steps, args.warmup, args.rounds)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "mask_pass.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python bench/mask_pass.py " + " ".join(sys.argv[1:])
    lines = [
        "# One gradient-mask pass per step, by kernel",
        "",
        f"Command: `{command.strip()}` (plain PyTorch loop, {args.rounds} rounds with fresh models x {args.steps} "
        f"timed steps per variant, the variants taking turns step by step, batch {BATCH}, SGD momentum, 90% of "
        f"each weight matrix masked, {args.threads} threads, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}). Ratios: median / mean step over "
        "dense's in the same run; 'each round': within each round, its spread (this machine's noise); 'the pass "
        "alone': the median wall time of the mask multiply itself, between backward and the optimizer step.",
        "",
        "| model | variant | step ms | the pass alone, ms | x dense | x dense, each round | mean x dense |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['variant']} | {r['step_ms']} | {r['pass_ms']} | {r['ratio_to_dense']} "
        f"| {r['ratio_each_round']} "
        f"| {r['mean_ratio_to_dense']} |"
        for r in rows
    ]
    (args.out / "mask_pass.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
