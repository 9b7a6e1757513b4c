"""Cost of pruning-aware training per step, side by side with the tools users would otherwise pick.

Variants run interleaved (round-robin, fresh seeded model each time) in one process, so machine noise hits them
alike; each reports the median step time (forward + backward + optimizer step + callback hooks) as a ratio to
dense, the extra time of a mask-update step as a fraction of a step, the extra memory held for pruning
(masks, criterion state, reparametrised copies) as a ratio of the dense parameter bytes, and the resident memory
of a separate short process per variant at its last training step.

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
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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


def variants() -> dict[str, Callable[[], list[Callback]]]:
    return {
        "dense": lambda: [],
        # magnitude + uniform: like for like with ModelPruning's l1_unstructured (and with earlier runs)
        "pat GradualPruning (cubic)": lambda: [
            GradualPruning(
                sparsity=0.9,
                initial_sparsity=0.5,
                start_step=0,
                end_step=100_000,
                update_every=UPDATE_EVERY,
                criterion="magnitude",
                allocation="uniform",
            )
        ],
        # the default before the window: Taylor scores keep one float32 history buffer per weight (+1.0x parameter
        # bytes) and accumulate |w*g| at every step (a control row)
        "pat GradualPruning (cubic, default taylor + global, before: every step, float32)": lambda: [
            GradualPruning(
                sparsity=0.9,
                initial_sparsity=0.5,
                start_step=0,
                end_step=100_000,
                update_every=UPDATE_EVERY,
                accumulate_window=None,
                history_dtype="float32",
            )
        ],
        # the default: |w*g| over the 40 steps before each update only, in a bfloat16 history (0.5x)
        "pat GradualPruning (cubic, default taylor + global)": lambda: [
            GradualPruning(
                sparsity=0.9, initial_sparsity=0.5, start_step=0, end_step=100_000, update_every=UPDATE_EVERY
            )
        ],
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
    holds its state (ModelPruning, for one, removes its reparametrisation when training ends)."""

    def __init__(self, warmup: int, last_step: int, callbacks: list[Callback]) -> None:
        self.warmup = warmup
        self.last_step = last_step
        self.callbacks = callbacks
        self.times: list[float] = []
        self.update_times: list[float] = []
        self.all_times: list[float] = []  # every timed step, the update and the accumulation window included
        self.extra_bytes = 0
        self.window_extra_bytes = 0  # at the step before an update: criterion history at its fullest
        self.rss_mib = 0.0
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = CLOCK[0]()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        elapsed = CLOCK[0]() - self._start
        step = trainer.global_step - 1
        if step == UPDATE_EVERY - 1:
            self.window_extra_bytes = extra_bytes(pl_module, self.callbacks)
        if step == self.last_step:
            self.extra_bytes = extra_bytes(pl_module, self.callbacks)
            self.rss_mib = current_rss_mib()
        if step < self.warmup:
            return
        self.all_times.append(elapsed)
        where = place(step, UPDATE_EVERY)
        if where is None:
            self.update_times.append(elapsed)
        elif where == "outside":  # the same step indices for every variant, dense included
            self.times.append(elapsed)


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


def fit(model_name: str, variant: str, steps: int, warmup: int, seed: int) -> tuple[StepTimer, int]:
    make_net, shape = MODELS[model_name]
    torch.manual_seed(seed)
    data = TensorDataset(torch.randn(BATCH * 10, *shape), torch.randint(0, 10, (BATCH * 10,)))
    module = Module(make_net())
    callbacks = variants()[variant]()
    timer = StepTimer(warmup, warmup + steps - 1, callbacks)
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=True))
    return timer, timer.extra_bytes


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def end_rss(model_name: str, variant: str) -> float:
    """Resident memory (MiB) at the last training step of a separate process that trains only this variant."""
    done = subprocess.run(
        [sys.executable, __file__, "--single", model_name, variant],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)  # one update cycle: its window and update
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 90 steps (one mask update each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cpu-time", action="store_true", help="time the training thread's CPU time (1 thread)")
    parser.add_argument("--variants", nargs="+", choices=list(variants()), help="only these rows (dense always)")
    parser.add_argument("--single", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
        CLOCK[0] = time.thread_time
    torch.set_num_threads(args.threads)
    if args.single:
        timer, _ = fit(args.single[0], args.single[1], steps=10, warmup=12, seed=0)
        print(timer.rss_mib)
        return
    if args.quick:
        args.rounds, args.steps = 2, 90
    chosen = ["dense", *(v for v in variants() if v in (args.variants or variants()) and v != "dense")]
    rows = []
    for model_name in args.models:
        times: dict[str, list[float]] = {v: [] for v in chosen}
        all_times: dict[str, list[float]] = {v: [] for v in chosen}
        update_times: dict[str, list[float]] = {v: [] for v in chosen}
        extra: dict[str, int] = {}
        window_extra: dict[str, int] = {}
        failed: dict[str, str] = {}
        for round_index in range(args.rounds):
            for variant in chosen:
                if variant in failed:
                    continue
                try:
                    timer, extra[variant] = fit(model_name, variant, args.steps, args.warmup, seed=round_index)
                except Exception as error:  # a peer that cannot handle this model: report, do not hide
                    failed[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
                    continue
                window_extra[variant] = timer.window_extra_bytes
                times[variant] += timer.times
                all_times[variant] += timer.all_times
                update_times[variant] += timer.update_times
                print(f"{model_name} round {round_index} {variant}: {statistics.median(timer.times) * 1e3:.2f} ms")
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
                    "update_step_extra_fraction": round((update - step) / step, 2) if update == update else "",
                    "extra_memory_ratio": round(extra[variant] / param_bytes, 3),
                    "extra_memory_before_update_ratio": round(window_extra[variant] / param_bytes, 3),
                    "rss_at_end_mib": round(end_rss(model_name, variant), 1),
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
        f"Command: `{command.strip()}` ({args.rounds} interleaved rounds x {args.steps} timed steps, batch {BATCH}, "
        f"SGD momentum, {args.threads} threads, {'CPU time of the training thread' if args.cpu_time else 'wall time'}, "
        f"torch {torch.__version__}, lightning {pl.__version__}, "
        f"{platform.processor() or platform.machine()}).",
        "Ratios are measured side by side in one run; absolute times move with machine load. "
        f"'update step extra': the extra time of a mask-update step, in normal steps (updates every {UPDATE_EVERY} "
        f"steps, so it adds that / {UPDATE_EVERY} to the average step). 'extra memory': masks, criterion state and "
        "reparametrised copies over the dense parameter bytes, at the last step and at the step before an update "
        "(a windowed history at its fullest). 'step ms' and 'x dense' are medians over the steps outside the "
        "default accumulation window (the 40 steps up to each update; the same step indices for every variant); "
        "'mean x dense' compares the means over every timed step, the update and the steps of the accumulation "
        "window before it included.",
        "",
        "| model | variant | step ms | x dense | mean x dense | update step extra | extra memory / param bytes "
        "| before an update | RSS at end MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r.get(k, "") for k in ("step_ms", "ratio_to_dense", "mean_ratio_to_dense", "update_step_extra_fraction")
        ]
        cells += [r.get(k, "") for k in ("extra_memory_ratio", "extra_memory_before_update_ratio", "rss_at_end_mib")]
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(str(c) for c in cells) + " |")
    (args.out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"written": str(args.out / "overhead.md")}))


if __name__ == "__main__":
    main()
