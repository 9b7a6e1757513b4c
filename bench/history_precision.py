"""Does a cheaper Taylor history rank weights as the float32 one does? Masks chosen side by side on one training run.

ConvBase on MNIST-1D (the model and data of ``bench/accuracy.py``; ``--channels 100``: its 4x-wider variant), Adam
lr 1e-2, batch 100, pruned with the default ``criterion="taylor", allocation="global"`` at updates every 100 steps
from a float32 history of every step since the last update (the former default, which drives the run). At each
update, the same weights and gradients also fed histories kept in bfloat16 and/or over only the last ``window`` steps
(:meth:`~pat_callbacks.core.scoring.Scorer.accumulate` with the step), and each history's scores choose the masks of
the same update; the table gives the fraction of mask entries identical to the float32 full history's, and the
fraction of the reference's pruned entries the variant prunes too, at each target.

    python bench/history_precision.py                      # -> bench/results/history_precision.{md,csv}
    python bench/history_precision.py --quick              # a smoke run (tests/bench)
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pat_callbacks.core.pruner import Pruner  # noqa: E402

UPDATE_EVERY = 100


def data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pat_callbacks.app.data.datamodules import MNIST1DDataModule

    module = MNIST1DDataModule(num_samples=samples)
    x, y, _, _ = module._load()
    return x, y


def masks_from(scores: dict[str, torch.Tensor], params: dict[str, nn.Parameter], target: float) -> dict[str, Any]:
    copies = {name: nn.Parameter(p.detach().clone()) for name, p in params.items()}
    chooser = Pruner(copies, criterion="magnitude", allocation="global")
    chooser.prune_to(target, scores=scores)
    return {name: mask.clone() for name, mask in chooser.masks.items()}


def compare(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> tuple[float, float]:
    same = sum(int((reference[n] == other[n]).sum()) for n in reference)
    total = sum(m.numel() for m in reference.values())
    pruned = sum(int((~reference[n]).sum()) for n in reference)
    both = sum(int((~reference[n] & ~other[n]).sum()) for n in reference)
    return same / total, both / max(pruned, 1)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pat_callbacks.app.models.nets import ConvBase

    torch.manual_seed(args.seed)
    x, y = data(args.samples)
    model = ConvBase(channels=args.channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    driver = Pruner(model, criterion="taylor", allocation="global", accumulate_window=None, history_dtype="float32")
    variants = {
        (history_dtype, window): Pruner(
            dict(driver.params),
            criterion="taylor",
            allocation="global",
            # "all": every step since the last update, as a window of UPDATE_EVERY + 1 steps (the first update's
            # history starts UPDATE_EVERY steps before it): a bounded window, so bfloat16 stays bfloat16
            accumulate_window=window or UPDATE_EVERY + 1,
            history_dtype=history_dtype,
        )
        for history_dtype in ("float32", "bfloat16")
        for window in (None, *args.windows)
    }
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(args.seed)
    start, end = args.steps // 10, args.steps * 7 // 10
    for step in range(args.steps):
        batch = torch.randint(0, len(x), (100,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        next_update = start + -(-max(step - start, 0) // UPDATE_EVERY) * UPDATE_EVERY
        if start - UPDATE_EVERY <= step <= end:
            driver.accumulate()
            for pruner in variants.values():
                pruner.accumulate(step, next_update)
        if step >= start and step <= end and (step - start) % UPDATE_EVERY == 0:
            reference = driver.scores()
            for target in args.targets:
                ref_masks = masks_from(reference, driver.params, target)
                for (history_dtype, window), pruner in variants.items():
                    same, overlap = compare(ref_masks, masks_from(pruner.scores(), driver.params, target))
                    rows.append(
                        {
                            "step": step,
                            "target": target,
                            "history_dtype": history_dtype,
                            "window": window or "all",
                            "identical": same,
                            "pruned_overlap": overlap,
                        }
                    )
            progress = (step - start) / max(end - start, 1)
            driver.prune_to(args.final * (1 - (1 - progress) ** 3), optimizers=[optimizer])
            for pruner in (driver, *variants.values()):
                pruner.reset_history()
        driver.mask_grads()
        optimizer.step()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--channels", type=int, default=25)
    parser.add_argument("--final", type=float, default=0.9)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.samples, args.windows, args.targets = 250, 500, [20], [0.9]
    rows = run(args)
    write(rows, args)


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "history_precision.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = ("python bench/history_precision.py " + " ".join(sys.argv[1:])).strip()
    lines = [
        "# Taylor history: bfloat16 and windowed vs float32 over every step",
        "",
        f"Command: `{command}` (ConvBase channels={args.channels}, {args.steps} steps, updates every {UPDATE_EVERY} "
        f"from step {args.steps // 10} to {args.steps * 7 // 10}, seed {args.seed}). Per update and target: the "
        "fraction of mask entries identical to those the float32 history of every step since the last update "
        "chooses, and the fraction of its pruned entries the variant prunes too; mean and minimum over updates.",
        "",
        "| history dtype | window | target | identical (mean) | identical (min) | pruned overlap (mean) |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["history_dtype"], str(r["window"]), r["target"]) for r in rows})
    for history_dtype, window, target in keys:
        cell = [
            r for r in rows if (r["history_dtype"], str(r["window"]), r["target"]) == (history_dtype, window, target)
        ]
        same = [r["identical"] for r in cell]
        overlap = [r["pruned_overlap"] for r in cell]
        lines.append(
            f"| {history_dtype} | {window} | {target} | {statistics.mean(same):.5f} | {min(same):.5f} | "
            f"{statistics.mean(overlap):.5f} |"
        )
    (args.out / "history_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
