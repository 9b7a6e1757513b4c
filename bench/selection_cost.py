"""The k-lowest selections before and after they became one (core/radix.py), side by side in one run on a CPU.

The old code is read from a git revision (default: a4b5bc9, the last commit before the change) and run next to
the current one, interleaved, on the same scores; each row is the median of this thread's CPU time, and whether
both chose the same entries (old tie orders were unspecified for ``topk``: ``same`` may then be False on ties only).

    python bench/selection_cost.py                  # 4M scores, 1 thread
    python bench/selection_cost.py --numel 65536 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pat_callbacks.core import patterns, selection  # noqa: E402
from pat_callbacks.oneshot import wanda  # noqa: E402


def old_module(revision: str, path: str) -> types.ModuleType:
    """The module at ``path`` as of ``revision`` (its imports resolve to the current package)."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True)
    module = types.ModuleType(f"old_{Path(path).stem}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.stdout, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median CPU seconds of this thread per variant, taking turns (order reversed every other round), and each
    variant's last result."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for round_ in range(repeats):
        for name in list(fns) if round_ % 2 == 0 else reversed(list(fns)):
            start = time.thread_time()
            results[name] = fns[name]()
            times[name].append(time.thread_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def same(a: Any, b: Any) -> bool:
    a, b = (x if isinstance(x, (list, tuple)) else [x] for x in (a, b))
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def rows(numel: int, repeats: int, revision: str) -> list[tuple[str, float, float, bool]]:
    old_sel = old_module(revision, "pat_callbacks/core/selection.py")
    old_pat = old_module(revision, "pat_callbacks/core/patterns.py")
    old_wanda = old_module(revision, "pat_callbacks/oneshot/wanda.py")
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(numel, generator=generator)
    k = int(0.7 * numel)
    small = scores[:4096].clone()
    width = 1 << max(2, (numel.bit_length() - 1) // 2)
    matrix = scores[: (numel // width) * width].view(-1, width).abs()
    old_sel.STRATEGY = selection.STRATEGY = "host"  # the CPU's default, spelt out

    def streamed(module: types.ModuleType) -> Callable[[], Any]:
        return lambda: module.select_lowest_streamed([module.ScoredLayer.of(scores)], k)

    cases: dict[str, dict[str, Callable[[], Any]]] = {
        f"exact select_lowest, {numel} scores": {
            "old": lambda: old_sel.select_lowest([scores], k),
            "new": lambda: selection.select_lowest([scores], k),
        },
        "exact select_lowest, 4096 scores": {
            "old": lambda: old_sel.select_lowest([small], 2867),
            "new": lambda: selection.select_lowest([small], 2867),
        },
        f"streamed (sampled bracket), {numel} scores": {"old": streamed(old_sel), "new": streamed(selection)},
        f"lowest_k, {numel} scores": {
            "old": lambda: old_pat.lowest_k(scores, k),
            "new": lambda: patterns.lowest_k(scores, k),
        },
        "lowest_k, 4096 scores": {
            "old": lambda: old_pat.lowest_k(small, 2867),
            "new": lambda: patterns.lowest_k(small, 2867),
        },
        f"nm_mask 2:4, {tuple(matrix.shape)}": {
            "old": lambda: old_pat.nm_mask(matrix, 2, 4),
            "new": lambda: patterns.nm_mask(matrix, 2, 4),
        },
        f"Wanda row_mask 0.7, {tuple(matrix.shape)}": {
            "old": lambda: old_wanda.row_mask(matrix, 0.7),
            "new": lambda: wanda.row_mask(matrix, 0.7),
        },
    }
    out = []
    for name, fns in cases.items():
        times, results = interleaved(fns, repeats)
        out.append((name, 1e3 * times["old"], 1e3 * times["new"], same(results["old"], results["new"])))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--revision", default="a4b5bc9")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats} interleaved repeats")
    print("| selection | old ms | new ms | new / old | same entries |")
    print("|---|---|---|---|---|")
    for name, old, new, equal in rows(args.numel, args.repeats, args.revision):
        print(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f} | {equal} |")


if __name__ == "__main__":
    main()
