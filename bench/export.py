"""What export buys: checkpoint size and CPU inference latency of pruned weights.

    python bench/export.py            # sparsities 0.5 0.8 0.9 0.95 0.98
    python bench/export.py --quick    # fewer repeats

- Checkpoint size: a 3x2048x2048 Linear stack pruned (random unstructured mask) to each sparsity, saved with
  `pat_callbacks.export.save_sparse`, as a ratio of the same state dict saved densely with `torch.save`.
- Latency: the same stack, batch 64, dense `nn.Linear` vs `to_sparse_inference` (CSR), interleaved repeats,
  median. Writes bench/results/export.{md,csv}.

- Shrink: a CNN with BatchNorm and a residual block, 50% of every conv's filters removed (L2 group norm, couplings
  from Torch-Pruning) and physically shrunk; dense vs shrunk latency at batch 32, 3x32x32.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pat_callbacks.export import save_sparse, to_sparse_inference  # noqa: E402
from pat_callbacks.structured import channel_groups, channel_scores, shrink  # noqa: E402


class ResidualCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block (two conv-BN with an identity add), strided conv, pool, linear."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        h = torch.relu(self.down(h))
        return self.head(h.mean((2, 3)))


def shrink_row(repeats: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    x = torch.randn(32, 3, 32, 32)
    example = torch.randn(1, 3, 32, 32)
    params = dict(model.named_parameters())
    groups = channel_groups(model, example, ignore=["head.weight"])
    pruned = {}
    for group in groups:
        scores = channel_scores(group, params, "l2")
        pruned[group.root] = torch.topk(scores, group.n_channels // 2, largest=False).indices.tolist()
    small = shrink(ResidualCNN().eval(), example, pruned)
    small.load_state_dict(shrink(model, example, pruned).state_dict())
    dense = ResidualCNN().eval()
    dense_ms, small_ms = [], []
    for _ in range(rounds):
        dense_ms.append(median_ms(dense, x, repeats))
        small_ms.append(median_ms(small, x, repeats))
    n_dense = sum(p.numel() for p in dense.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    d, s = statistics.median(dense_ms), statistics.median(small_ms)
    return {
        "params_dense": n_dense,
        "params_shrunk": n_small,
        "dense_ms": round(d, 2),
        "shrunk_ms": round(s, 2),
        "speedup": round(d / s, 2),
    }


def stack(sparsity: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(3)))
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(torch.rand_like(layer.weight) >= sparsity).add_(0.0)  # +0.0 zeros, as MaskStore leaves
    return model.eval()


def median_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rounds = 10, 1
    torch.set_num_threads(args.threads)
    x = torch.randn(64, 2048)
    rows = []
    for sparsity in args.sparsities:
        dense = stack(sparsity)
        sparse = to_sparse_inference(stack(sparsity))
        assert torch.allclose(dense(x), sparse(x), atol=1e-3)
        with tempfile.TemporaryDirectory() as tmp:
            report = save_sparse(dense.state_dict(), Path(tmp) / "w.pt")
        dense_ms, sparse_ms = [], []
        for _ in range(args.rounds):  # interleaved
            dense_ms.append(median_ms(dense, x, args.repeats))
            sparse_ms.append(median_ms(sparse, x, args.repeats))
        d, s = statistics.median(dense_ms), statistics.median(sparse_ms)
        rows.append(
            {
                "sparsity": sparsity,
                "checkpoint_ratio": round(report.ratio, 3),
                "dense_ms": round(d, 2),
                "csr_ms": round(s, 2),
                "speedup": round(d / s, 2),
            }
        )
        print(rows[-1], flush=True)
    shrunk = shrink_row(args.repeats, args.rounds)
    print(shrunk, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "export.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Export: checkpoint size and CPU inference latency",
        "",
        f"Command: `{' '.join(['python bench/export.py', *sys.argv[1:]])}` (3x Linear 2048x2048, batch 64, "
        f"{args.threads} threads, median of {args.repeats} x {args.rounds} interleaved, torch {torch.__version__}).",
        "",
        "| sparsity | sparse checkpoint / dense | dense ms | CSR ms | CSR speed-up |",
        "|---|---|---|---|---|",
        *(
            f"| {r['sparsity']} | {r['checkpoint_ratio']} | {r['dense_ms']} | {r['csr_ms']} | {r['speedup']}x |"
            for r in rows
        ),
        "",
        "Structured: a CNN with BatchNorm and a residual block (width 128), 50% of every conv's filters removed and "
        "the model shrunk (`pat_callbacks.structured.shrink`), batch 32 x 3x32x32:",
        "",
        "| parameters dense | parameters shrunk | dense ms | shrunk ms | speed-up |",
        "|---|---|---|---|---|",
        f"| {shrunk['params_dense']} | {shrunk['params_shrunk']} | {shrunk['dense_ms']} | {shrunk['shrunk_ms']} "
        f"| {shrunk['speedup']}x |",
    ]
    (args.out / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
