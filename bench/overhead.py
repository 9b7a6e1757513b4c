"""Cost of pruning-aware training per step, side by side with the tools users would otherwise pick.

Each variant trains in its own process (a fresh seeded model, its own Lightning Trainer) and the processes take
turns step by step: the parent lets one process make one training step, then the next, round-robin, so a shared
machine's slow moments hit every variant alike and the ratios hold to a percent or so where rounds of whole fits
moved by five. Each variant reports its median step (forward + backward + optimizer step + every callback hook)
outside the default accumulation window and its mean over every step as ratios to dense, the extra time of a
mask-update step as a fraction of a step, the extra memory held for pruning (masks, criterion state,
reparametrised copies) as a ratio of the dense parameter bytes, and its process's resident memory at its last step.

    python bench/overhead.py                    # full: MLP 784-2048-2048-10 and a 6M-param CNN
    python bench/overhead.py --quick            # fewer steps and rounds
    python bench/overhead.py --models mlp --rounds 3 --steps 60
    python bench/overhead.py --cpu-time --variants dense ...  # CPU time of the training thread, some rows only

Writes bench/results/overhead.{md,csv} (or --out DIR).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hook_cost import place  # noqa: E402
from pat_callbacks import DynamicSparseTraining, GradualPruning  # noqa: E402
from pat_callbacks.callbacks.base import PruningCallback  # noqa: E402

BATCH = 256
UPDATE_EVERY = 100
# wall time by default; --cpu-time: CPU seconds of the training thread (one torch thread, data loaded in it), which
# other processes of a shared machine do not inflate
CLOCK: list[Callable[[], float]] = [time.perf_counter]


# ----------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )


def cnn() -> nn.Module:
    """~6.0M parameters, small spatial size: a CNN of the MLP's size that still trains fast on a CPU."""
    layers: list[nn.Module] = []
    channels = [3, 64, 256, 512, 1024]
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(1024, 10))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {"mlp": (mlp, (784,)), "cnn": (cnn, (3, 16, 16))}


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


# ----------------------------------------------------------------------------- peers
class TorchAOSparsifier(Callback):
    """torch.ao.pruning: WeightNormSparsifier (unstructured) driven by CubicSL, stepped every UPDATE_EVERY steps."""

    def __init__(self, sparsity: float) -> None:
        self.sparsity = sparsity

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.ao.pruning import WeightNormSparsifier
        from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

        self.sparsifier = WeightNormSparsifier(
            sparsity_level=self.sparsity, sparse_block_shape=(1, 1), zeros_per_block=1
        )
        config = [
            {"tensor_fqn": f"{name}.weight"}
            for name, module in pl_module.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
        ]
        self.sparsifier.prepare(pl_module, config)
        self.scheduler = CubicSL(self.sparsifier, init_sl=0.5, init_t=0, delta_t=UPDATE_EVERY, total_t=10)
        self.sparsifier.step()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % UPDATE_EVERY == 0:
            self.sparsifier.step()
            self.scheduler.step()


def gradual(**options: Any) -> GradualPruning:
    """GradualPruning to 0.9 from 0.5 at step 0, updates every UPDATE_EVERY steps over a window longer than any run
    here (the sparsity keeps rising), with ``options`` (criterion, history) added."""
    return GradualPruning(
        sparsity=0.9, initial_sparsity=0.5, start_step=0, end_step=100_000, update_every=UPDATE_EVERY, **options
    )


def variants() -> dict[str, Callable[[], list[Callback]]]:
    return {
        "dense": lambda: [],
        # magnitude + uniform: like for like with ModelPruning's l1_unstructured (and with earlier runs)
        "pat GradualPruning (cubic)": lambda: [gradual(criterion="magnitude", allocation="uniform")],
        # the default before the window: Taylor scores keep one float32 history buffer per weight (+1.0x parameter
        # bytes) and accumulate |w*g| at every step (a control row)
        "pat GradualPruning (cubic, default taylor + global, before: every step, float32)": lambda: [
            gradual(accumulate_window=None, history_dtype="float32")
        ],
        # the default: |w*g| over the 40 steps before each update only, in a bfloat16 history (0.5x)
        "pat GradualPruning (cubic, default taylor + global)": lambda: [gradual()],
        "pat DynamicSparseTraining (rigl)": lambda: [
            DynamicSparseTraining(sparsity=0.9, regrowth="rigl", update_every=UPDATE_EVERY, end_step=100_000)
        ],
        "Lightning ModelPruning (l1_unstructured)": lambda: [
            ModelPruning("l1_unstructured", amount=lambda epoch: 0.5 if epoch == 0 else 0.0, verbose=0)
        ],
        "torch.ao WeightNormSparsifier + CubicSL": lambda: [TorchAOSparsifier(0.5)],
    }


# ----------------------------------------------------------------------------- measuring
class StepTimer(Callback):
    """Times every batch after ``warmup``; measures the extra memory at the last step, while every tool still
    holds its state (ModelPruning, for one, removes its reparametrisation when training ends). With ``turns`` (a
    pipe to the parent) each step waits for the parent's go and reports its time back: put :class:`TakeTurn`
    first in the callback list and the timer last, so the clock covers every callback's hooks."""

    def __init__(self, warmup: int, last_step: int, callbacks: list[Callback], turns: Connection | None = None) -> None:
        self.warmup = warmup
        self.last_step = last_step
        self.callbacks = callbacks
        self.turns = turns
        self.times: list[float] = []
        self.update_times: list[float] = []
        self.all_times: list[float] = []  # every timed step, the update and the accumulation window included
        self.extra_bytes = 0
        self.window_extra_bytes = 0  # at the step before an update: criterion history at its fullest
        self.rss_mib = 0.0
        self._start = 0.0

    def start(self) -> None:
        self._start = CLOCK[0]()

    def on_train_batch_start(self, *args: Any) -> None:
        if self.turns is None:
            self.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        elapsed = CLOCK[0]() - self._start
        step = trainer.global_step - 1
        if step == UPDATE_EVERY - 1:
            self.window_extra_bytes = extra_bytes(pl_module, self.callbacks)
        if step == self.last_step:
            self.extra_bytes = extra_bytes(pl_module, self.callbacks)
            self.rss_mib = current_rss_mib()
        if self.turns is not None:
            self.turns.send(("step", elapsed))
        if step < self.warmup:
            return
        self.all_times.append(elapsed)
        where = place(step, UPDATE_EVERY)
        if where is None:
            self.update_times.append(elapsed)
        elif where == "outside":  # the same step indices for every variant, dense included
            self.times.append(elapsed)


class TakeTurn(Callback):
    """First in the callback list: waits for the parent's go before each step, then starts the step's clock."""

    def __init__(self, turns: Connection, timer: StepTimer) -> None:
        self.turns = turns
        self.timer = timer

    def on_train_batch_start(self, *args: Any) -> None:
        self.turns.recv()
        self.timer.start()


def extra_bytes(module: nn.Module, callbacks: list[Callback]) -> int:
    """Bytes held beyond the dense parameters: extra params/buffers, tensors cached on modules, callback state."""
    dense = sum(p.numel() * p.element_size() for p in module.parameters())
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        tensors = list(sub._parameters.values()) + list(sub._buffers.values())
        tensors += [v for k, v in vars(sub).items() if isinstance(v, torch.Tensor) and not k.startswith("_")]
        for tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    for callback in callbacks:
        if isinstance(callback, PruningCallback) and callback.store is not None:
            total += sum(m.numel() * m.element_size() for m in callback.store.masks.values())
            total += sum(
                t.numel() * t.element_size() for state in callback.criterion_state.values() for t in state.values()
            )
    return total - dense


def fit(
    model_name: str, variant: str, steps: int, warmup: int, seed: int, turns: Connection | None = None
) -> tuple[StepTimer, int]:
    make_net, shape = MODELS[model_name]
    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(BATCH * 10, *shape), torch.randint(0, 10, (BATCH * 10,)))
    module = Module(make_net())
    callbacks = variants()[variant]()
    timer = StepTimer(warmup, warmup + steps - 1, callbacks, turns)
    first = [] if turns is None else [TakeTurn(turns, timer)]
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*first, *callbacks, timer],
    )
    trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=True))
    return timer, timer.extra_bytes


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def worker(turns: Connection, model_name: str, variant: str, args: dict[str, Any]) -> None:
    """One variant's training in its own process, a step each time the parent says go; sends its timings (or the
    error that stopped it) when done."""
    torch.set_num_threads(args["threads"])
    if args["cpu_time"]:
        CLOCK[0] = time.thread_time
    try:
        timer, extra = fit(model_name, variant, args["steps"], args["warmup"], args["seed"], turns)
    except Exception as error:  # a peer that cannot handle this model: report, do not hide
        turns.send(("error", f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"))
        return
    fields = ("times", "all_times", "update_times", "window_extra_bytes", "rss_mib")
    turns.send(("done", {"extra_bytes": extra, **{name: getattr(timer, name) for name in fields}}))


def take_turns(model_name: str, chosen: list[str], args: dict[str, Any]) -> dict[str, dict[str, Any] | str]:
    """Train every variant of ``chosen`` in its own process, one step each in turn until all are done: each
    variant's timings, or the error (a string) that stopped it."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP pool forked mid-use
    running: dict[str, tuple[Any, Connection]] = {}
    for variant in chosen:
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(child, model_name, variant, args), daemon=True)
        process.start()
        running[variant] = (process, parent)
    results: dict[str, dict[str, Any] | str] = {}
    while running:
        for variant, (process, turns) in list(running.items()):
            try:
                if not turns.poll():  # nothing waiting: the process waits for its turn (or is finishing its run)
                    turns.send("go")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it sent its results and ended: they wait in the pipe
            try:
                kind, payload = turns.recv()
            except (EOFError, ConnectionResetError):
                kind, payload = "error", f"its process ended without its results (exit code {process.exitcode})"
            if kind == "step":
                continue
            results[variant] = payload
            process.join(timeout=60)
            del running[variant]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)  # one update cycle: its window and update
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 90 steps (one mask update each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cpu-time", action="store_true", help="time the training thread's CPU time (1 thread)")
    parser.add_argument("--variants", nargs="+", choices=list(variants()), help="only these rows (dense always)")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
    if args.quick:
        args.rounds, args.steps = 2, 90
    chosen = ["dense", *(v for v in variants() if v in (args.variants or variants()) and v != "dense")]
    rows = []
    for model_name in args.models:
        times: dict[str, list[float]] = {v: [] for v in chosen}
        all_times: dict[str, list[float]] = {v: [] for v in chosen}
        update_times: dict[str, list[float]] = {v: [] for v in chosen}
        by_round: dict[str, list[float]] = {v: [] for v in chosen}  # each round's median over dense's
        last: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for round_index in range(args.rounds):
            settings = {
                "steps": args.steps,
                "warmup": args.warmup,
                "seed": round_index,
                "threads": args.threads,
                "cpu_time": args.cpu_time,
            }
            results = take_turns(model_name, [v for v in chosen if v not in failed], settings)
            for variant, result in results.items():
                if isinstance(result, str):
                    failed[variant] = result
                    print(f"{model_name} round {round_index} {variant}: fails: {result}")
                    continue
                last[variant] = result
                times[variant] += result["times"]
                all_times[variant] += result["all_times"]
                update_times[variant] += result["update_times"]
                print(f"{model_name} round {round_index} {variant}: {statistics.median(result['times']) * 1e3:.2f} ms")
            dense_result = results.get("dense")
            for variant, result in results.items():
                if isinstance(result, dict) and isinstance(dense_result, dict):
                    ratio = statistics.median(result["times"]) / statistics.median(dense_result["times"])
                    by_round[variant].append(round(ratio, 3))
        if "dense" in failed:
            raise RuntimeError(f"dense training failed on {model_name}: {failed['dense']}")
        param_bytes = sum(p.numel() * p.element_size() for p in MODELS[model_name][0]().parameters())
        dense = statistics.median(times["dense"])
        dense_mean = statistics.fmean(all_times["dense"])
        for variant in chosen:
            if variant in failed:
                rows.append({"model": model_name, "variant": variant, "step_ms": "fails: " + failed[variant]})
                continue
            step = statistics.median(times[variant])
            update = statistics.median(update_times[variant]) if update_times[variant] else float("nan")
            rows.append(
                {
                    "model": model_name,
                    "variant": variant,
                    "step_ms": round(step * 1e3, 2),
                    "ratio_to_dense": round(step / dense, 3),
                    "mean_ratio_to_dense": round(statistics.fmean(all_times[variant]) / dense_mean, 3),
                    "ratio_each_round": " / ".join(f"{r:.3f}" for r in by_round[variant]),
                    "update_step_extra_fraction": round((update - step) / step, 2) if update == update else "",
                    "extra_memory_ratio": round(last[variant]["extra_bytes"] / param_bytes, 3),
                    "extra_memory_before_update_ratio": round(last[variant]["window_extra_bytes"] / param_bytes, 3),
                    "rss_at_end_mib": round(last[variant]["rss_mib"], 1),
                }
            )
    write(rows, args)


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "overhead.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(max(rows, key=len)))
        writer.writeheader()
        writer.writerows(rows)
    command = "python bench/overhead.py " + " ".join(sys.argv[1:])
    lines = [
        "# Pruning overhead per training step",
        "",
        f"Command: `{command.strip()}` ({args.rounds} rounds x {args.steps} timed steps, each variant in its own "
        f"process, the processes taking turns step by step; batch {BATCH}, "
        f"SGD momentum, {args.threads} threads, {'CPU time of the training thread' if args.cpu_time else 'wall time'}, "
        f"torch {torch.__version__}, lightning {pl.__version__}, "
        f"{platform.processor() or platform.machine()}).",
        "Ratios are measured side by side in one run; absolute times move with machine load. 'RSS at end': the "
        "variant's process at its last step. "
        f"'update step extra': the extra time of a mask-update step, in normal steps (updates every {UPDATE_EVERY} "
        f"steps, so it adds that / {UPDATE_EVERY} to the average step). 'extra memory': masks, criterion state and "
        "reparametrised copies over the dense parameter bytes, at the last step and at the step before an update "
        "(a windowed history at its fullest). 'step ms' and 'x dense' are medians over the steps outside the "
        "default accumulation window (the 40 steps up to each update; the same step indices for every variant); "
        "'mean x dense' compares the means over every timed step, the update and the steps of the accumulation "
        "window before it included. 'x dense, each round': that ratio within each round (fresh processes and "
        "seeds): its spread is this machine's noise.",
        "",
        "| model | variant | step ms | x dense | x dense, each round | mean x dense | update step extra "
        "| extra memory / param bytes | before an update | RSS at end MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keys = ("step_ms", "ratio_to_dense", "ratio_each_round", "mean_ratio_to_dense", "update_step_extra_fraction")
        keys += ("extra_memory_ratio", "extra_memory_before_update_ratio", "rss_at_end_mib")
        cells = [r.get(k, "") for k in keys]
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(str(c) for c in cells) + " |")
    (args.out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"written": str(args.out / "overhead.md")}))


if __name__ == "__main__":
    main()
