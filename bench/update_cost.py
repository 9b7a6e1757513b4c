"""Per-step and per-update costs on a CPU, old and new side by side in one run (ratios of medians, interleaved).

- ``history``: one optimizer step's history accumulation of the gradient criteria (taylor, movement, fisher) on
  four 1024 x 1024 float32 layers: the formulas as written before (``state["sum"].add_((w * g).abs())``: two
  temporaries, a new count tensor per step), :meth:`Criterion.accumulate` now (one temporary, in place) and
  :meth:`Criterion.accumulate_many` (multi-tensor kernels over every parameter);
- ``selection``: ``Pruner.prune_to`` 0.7 -> 0.8 (uniform, global) and RigL's ``regrow(0.3)`` under the host
  strategy (the CPU's) and the device strategy (the GPU's, forced here), with one ``abs()`` pass as the unit;
- ``regrowth``: ``regrow(0.3)`` (rigl, set) from one selection per layer now vs the two streamed selections before;
- ``history dtype``: one step of ``Scorer.accumulate`` (taylor, fisher) into a float32 vs a bfloat16 history.

    python bench/update_cost.py                 # -> bench/results/update_cost.{md,csv}
    python bench/update_cost.py --width 512 --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _old_accumulate(name: str, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """The accumulation as it was written before (for the side-by-side timing)."""

    def add(key: str, value: torch.Tensor) -> None:
        if key in state:
            state[key].add_(value)
        else:
            state[key] = value.detach().float().clone()

    if name == "taylor":
        add("sum", (w * g).abs())
    elif name == "movement":
        add("sum", -(w * g))
    else:
        add("sum_sq_grad", g.float().square())
    if name != "movement":
        add("count", torch.ones(()))


def clock() -> float:
    """CPU seconds of this thread (user + system): with one torch thread the work runs here, and other processes
    on a shared machine do not count (wall time under a load of 10+ on 2 cores is mostly waiting)."""
    return time.thread_time()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median CPU seconds of each function, taking turns (order reversed every other round)."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    keys = list(fns)
    for round_ in range(repeats):
        for key in keys if round_ % 2 == 0 else reversed(keys):
            start = clock()
            fns[key]()
            times[key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def history_rows(width: int, repeats: int) -> list[dict[str, Any]]:
    from pat_callbacks.core.criteria import get_criterion

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(width, width, generator=generator) for _ in range(4)]
    grads = [torch.randn(width, width, generator=generator) for _ in range(4)]
    rows = []
    for name in ("taylor", "movement", "fisher"):
        criterion = get_criterion(name)
        old_states: list[dict[str, torch.Tensor]] = [{} for _ in params]
        new_states: list[dict[str, torch.Tensor]] = [{} for _ in params]

        def old(old_states: list[dict[str, torch.Tensor]] = old_states, name: str = name) -> None:
            for w, g, state in zip(params, grads, old_states, strict=True):
                _old_accumulate(name, w, g, state)

        def new(new_states: list[dict[str, torch.Tensor]] = new_states, criterion: Any = criterion) -> None:
            for w, g, state in zip(params, grads, new_states, strict=True):
                criterion.accumulate(w, g, state)

        many_states: list[dict[str, torch.Tensor]] = [{} for _ in params]

        def many(many_states: list[dict[str, torch.Tensor]] = many_states, criterion: Any = criterion) -> None:
            criterion.accumulate_many(params, grads, many_states)

        medians = interleaved({"before": old, "now": new, "many": many}, repeats)
        same = all(
            all(torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]) for key in a)
            for a, b, c in zip(old_states, new_states, many_states, strict=True)
        )
        rows.append(
            {
                "part": "history",
                "name": name,
                "before_ms": round(1e3 * medians["before"], 3),
                "now_ms": round(1e3 * medians["now"], 3),
                "now_over_before": round(medians["now"] / medians["before"], 3),
                "same_numbers": same,
                "many_ms": round(1e3 * medians["many"], 3),
                "many_over_before": round(medians["many"] / medians["before"], 3),
            }
        )
    return rows


def selection_rows(width: int, repeats: int) -> list[dict[str, Any]]:
    from pat_callbacks import Pruner
    from pat_callbacks.core import selection

    torch.manual_seed(0)
    reference = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator) for p in reference.parameters()]
    params = list(reference.parameters())
    one_pass = interleaved({"pass": lambda: [p.detach().abs() for p in params]}, 7)["pass"]
    rows = []
    for variant in ("uniform", "global", "rigl"):
        prepared: dict[str, tuple[Pruner, nn.Module]] = {}
        times: dict[str, list[float]] = {"host": [], "device": []}
        masks: dict[str, dict[str, torch.Tensor]] = {}
        for round_ in range(repeats):
            for strategy in ("host", "device") if round_ % 2 == 0 else ("device", "host"):
                model = _copy(reference)
                pruner = Pruner(model, allocation="global" if variant == "global" else "uniform")
                selection.STRATEGY = strategy
                try:
                    pruner.prune_to(0.7)
                    if variant == "rigl":
                        pruner.prune_to(0.8)
                        for p, g in zip(model.parameters(), grads, strict=True):
                            p.grad = g.clone()
                    start = clock()
                    if variant == "rigl":
                        pruner.regrow(0.3, "rigl")
                    else:
                        pruner.prune_to(0.8)
                    times[strategy].append(clock() - start)
                finally:
                    selection.STRATEGY = "auto"
                masks[strategy] = {n: m.clone() for n, m in pruner.masks.items()}
                prepared[strategy] = (pruner, model)
        host, device = statistics.median(times["host"]), statistics.median(times["device"])
        same = all(torch.equal(masks["host"][n], masks["device"][n]) for n in masks["host"])
        rows.append(
            {
                "part": "selection",
                "name": variant,
                "before_ms": round(1e3 * host, 2),
                "now_ms": round(1e3 * device, 2),
                "now_over_before": round(device / host, 3),
                "same_numbers": same,
                "host_passes": round(host / one_pass, 1),
                "device_passes": round(device / one_pass, 1),
            }
        )
    return rows


def regrowth_rows(width: int, repeats: int) -> list[dict[str, Any]]:
    """``regrow(0.3)`` at 80% sparsity: one selection per layer (now) vs a drop and a grow selection (before)."""
    from pat_callbacks import Pruner
    from pat_callbacks.core import regrowth

    torch.manual_seed(0)
    reference = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator) for p in reference.parameters()]
    limit = regrowth._ONE_SELECTION_LIMIT
    rows = []
    for rule in ("rigl", "set"):
        times: dict[str, list[float]] = {"before": [], "now": []}
        masks: dict[str, dict[str, torch.Tensor]] = {}
        for round_ in range(repeats):
            for variant in ("before", "now") if round_ % 2 == 0 else ("now", "before"):
                model = _copy(reference)
                pruner = Pruner(model)
                pruner.prune_to(0.8)
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.grad = g.clone()
                regrowth._ONE_SELECTION_LIMIT = 0 if variant == "before" else limit
                try:
                    start = clock()
                    pruner.regrow(0.3, rule, generator=torch.Generator().manual_seed(round_))
                    times[variant].append(clock() - start)
                finally:
                    regrowth._ONE_SELECTION_LIMIT = limit
                masks[variant] = {n: m.clone() for n, m in pruner.masks.items()}
        before, now = statistics.median(times["before"]), statistics.median(times["now"])
        rows.append(
            {
                "part": "regrowth",
                "name": rule,
                "before_ms": round(1e3 * before, 2),
                "now_ms": round(1e3 * now, 2),
                "now_over_before": round(now / before, 3),
                "same_numbers": all(torch.equal(masks["before"][n], masks["now"][n]) for n in masks["now"]),
            }
        )
    return rows


def history_dtype_rows(width: int, repeats: int) -> list[dict[str, Any]]:
    """One step's ``Scorer.accumulate`` into an existing float32 (before) vs bfloat16 (now) history."""
    from pat_callbacks.core.criteria import get_criterion
    from pat_callbacks.core.scoring import Scorer

    generator = torch.Generator().manual_seed(0)
    params = {f"{i}": nn.Parameter(torch.randn(width, width, generator=generator)) for i in range(4)}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=generator)
    rows = []
    for name in ("taylor", "fisher"):
        scorers = {
            label: Scorer(get_criterion(name), params, history_dtype=dtype)
            for label, dtype in (("before", "float32"), ("now", "bfloat16"))
        }
        for scorer in scorers.values():
            scorer.accumulate()  # the history exists: the timed steps add to it in place
        medians = interleaved({label: scorer.accumulate for label, scorer in scorers.items()}, repeats)
        history_bytes = {
            label: sum(t.numel() * t.element_size() for s in scorer.state.values() for t in s.values())
            for label, scorer in scorers.items()
        }
        rows.append(
            {
                "part": "history dtype",
                "name": name,
                "before_ms": round(1e3 * medians["before"], 3),
                "now_ms": round(1e3 * medians["now"], 3),
                "now_over_before": round(medians["now"] / medians["before"], 3),
                "same_numbers": round(history_bytes["now"] / history_bytes["before"], 3),
            }
        )
    return rows


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


FIELDS = (
    "part",
    "name",
    "before_ms",
    "now_ms",
    "now_over_before",
    "same_numbers",
    "many_ms",
    "many_over_before",
    "host_passes",
    "device_passes",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024, help="four width x width float32 layers")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = history_rows(args.width, args.repeats) + selection_rows(args.width, max(3, args.repeats // 4))
    rows += regrowth_rows(args.width, max(3, args.repeats // 4)) + history_dtype_rows(args.width, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "update_cost.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    weights = 4 * args.width * args.width
    lines = [
        "# Per-step and per-update costs on a CPU (bench/update_cost.py)",
        "",
        f"`python bench/update_cost.py --width {args.width} --repeats {args.repeats} --threads {args.threads}`: "
        f"4 x {args.width}x{args.width} float32 ({weights / 1e6:.1f}M weights), torch {torch.__version__}, "
        f"{args.threads} thread(s); medians of interleaved repeats of this thread's CPU time (user + system), ratios "
        f"within this one run; load average {os.getloadavg()[0]:.1f} at the end (a shared machine).",
        "",
        "## History accumulation per optimizer step",
        "",
        "before: the formulas as written before; now: `accumulate` per parameter, in place; together: "
        "`accumulate_many` over the 4 parameters (multi-tensor kernels). Same numbers: all three histories equal.",
        "",
        "| criterion | before ms | now ms | now / before | together ms | together / before | same numbers |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['before_ms']} | {r['now_ms']} | {r['now_over_before']} | {r['many_ms']} | "
        f"{r['many_over_before']} | {r['same_numbers']} |"
        for r in rows
        if r["part"] == "history"
    ]
    lines += [
        "",
        "## One mask update: host strategy (CPU default) vs device strategy (the GPU's, forced on the CPU here)",
        "",
        "| update | host ms | device ms | device / host | host passes | device passes | same masks |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['before_ms']} | {r['now_ms']} | {r['now_over_before']} | {r['host_passes']} | "
        f"{r['device_passes']} | {r['same_numbers']} |"
        for r in rows
        if r["part"] == "selection"
    ]
    lines += [
        "",
        "## Drop and grow: one selection per layer (now) vs a drop and a grow selection (before)",
        "",
        "| regrowth | before ms | now ms | now / before | same masks |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['before_ms']} | {r['now_ms']} | {r['now_over_before']} | {r['same_numbers']} |"
        for r in rows
        if r["part"] == "regrowth"
    ]
    lines += [
        "",
        "## One step of Scorer.accumulate into a float32 (before) vs a bfloat16 (now) history",
        "",
        "| criterion | float32 ms | bfloat16 ms | bfloat16 / float32 | history bytes bfloat16 / float32 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['before_ms']} | {r['now_ms']} | {r['now_over_before']} | {r['same_numbers']} |"
        for r in rows
        if r["part"] == "history dtype"
    ]
    (args.out / "update_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
