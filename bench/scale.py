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

    python bench/scale.py                         # 4M..268M weights; all variants and modes
    python bench/scale.py --sizes 4 16 --variants uniform global --modes pruner callback

Modes: ``pruner`` calls ``Pruner.prune_to`` / ``regrow`` directly; ``callback`` runs the same update through
``GradualPruning`` in a Lightning Trainer (the extra time of its hook at the update step over the same hook at
steps without one); ``sharded`` shards the model by rows over 2 CPU ranks (FSDP2 ``fully_shard``, gloo, one
thread each) and times one update on each rank (``--sharded-sizes``). Rows of other (mode, size, variant) keys
already in the CSV are kept.

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
MODES = ("pruner", "callback", "sharded")  # Pruner.prune_to in one process; GradualPruning in a Trainer; 2 FSDP2 ranks
CALLBACK_VARIANTS = ("uniform", "global")
SHARDED_VARIANTS = ("uniform", "global", "rigl")
FIELDS = (
    "mode",
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
    model = nn.Sequential(*_square_layers(weights_m))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    pass_s = _one_pass_seconds(params)
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
    row = _row("pruner", weights_m, variant, pass_s, update_s, (memory.peak - memory.before) / weight_bytes, mask_s)
    return {"module": pat_callbacks_file(), **row}


def _row(
    mode: str, weights_m: float, variant: str, pass_s: float, update_s: float, transient: float, mask_s: float
) -> dict[str, Any]:
    """One CSV row: seconds as ms, and the ratios to one pass."""
    return {
        "mode": mode,
        "weights_m": weights_m,
        "variant": variant,
        "pass_ms": round(pass_s * 1e3, 2),
        "update_ms": round(update_s * 1e3, 1),
        "update_per_pass": round(update_s / pass_s, 2),
        "transient_per_weight_bytes": round(transient, 3),
        "grad_mask_per_pass": round(mask_s / pass_s, 2),
    }


def _square_layers(weights_m: float) -> list[Any]:
    from torch import nn

    width = max(64, round((weights_m * 2**20 / 4) ** 0.5 / 64) * 64)  # a multiple of 64: N:M and blocks fit
    return [nn.Linear(width, width, bias=False) for _ in range(4)]


def _one_pass_seconds(params: list[Any]) -> float:
    def one_pass() -> float:
        start = time.perf_counter()
        for p in params:
            p.detach().abs()
        return time.perf_counter() - start

    return statistics.median(one_pass() for _ in range(5))


def _expected_zeros(sizes: list[int], variant: str) -> int:
    """Zeros at 80%: per layer (uniform, RigL keeps each layer's count), or over all layers (global)."""
    if variant == "global":
        return round(0.8 * sum(sizes))
    return sum(min(n, round(0.8 * n)) for n in sizes)


def measure_callback(weights_m: float, variant: str, threads: int) -> dict[str, Any]:
    """The same update through ``GradualPruning`` in a Lightning Trainer: the extra time of the hook that runs
    it (``on_before_optimizer_step`` at the update step to 80%, after one to 70%) over the same hook at the
    steps without an update, and the peak extra memory during that hook."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from pat_callbacks import GradualPruning

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = _square_layers(weights_m)
    width = layers[0].in_features

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*layers)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-6)

    seconds: dict[int, float] = {}
    extra_bytes: dict[int, int] = {}

    class TimedGradualPruning(GradualPruning):
        """Times the hook that runs mask updates and gradient masking (Lightning calls hooks on the class)."""

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            with PeakRSS() as memory:
                start = time.perf_counter()
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
                seconds[trainer.global_step] = time.perf_counter() - start
            extra_bytes[trainer.global_step] = memory.peak - memory.before

    # cubic from step 0 to 2, an update every step: 0.7 at step 1, 0.8 at step 2 (masks exist and shrink)
    pruning = TimedGradualPruning(
        sparsity=0.8, criterion="magnitude", allocation=variant, start_step=0, end_step=2, update_every=1
    )
    data = torch.utils.data.TensorDataset(torch.randn(6 * 4, width))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning],
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
    params = [layer.weight for layer in layers]
    pass_s = _one_pass_seconds(params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    plain = statistics.median(seconds[step] for step in (3, 4, 5))  # gradient masking only
    zeros = sum(int(p.numel() - p.count_nonzero()) for p in params)
    if zeros != _expected_zeros([p.numel() for p in params], variant):
        raise RuntimeError(f"the callback did not reach 0.8 on the real weights ({zeros} zeros)")
    extra = seconds[2] - plain
    return _row("callback", weights_m, variant, pass_s, extra, extra_bytes[2] / weight_bytes, plain)


def _sharded_rank(rank: int, weights_m: float, variant: str, port: int, queue: Any) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put(_sharded_update(rank, weights_m, variant))
    except BaseException as error:  # the parent waits on the queue: tell it
        queue.put((rank, repr(error)))
        raise
    finally:
        dist.destroy_process_group()


def _sharded_update(rank: int, weights_m: float, variant: str) -> tuple[Any, ...]:
    """One rank's half of an update of the row-sharded model: (rank, pass s, update s, transient / shard bytes,
    gradient-masking s)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from pat_callbacks import Pruner
    from pat_callbacks.core.sharding import local

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*_square_layers(weights_m))
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    params = list(model.parameters())
    for p in params:
        p.grad = distribute_tensor(torch.randn(p.shape), mesh, p.placements)
    shards = [local(p) for p in params]
    pass_s = _one_pass_seconds(shards)
    pruner = Pruner(model, allocation="global" if variant == "global" else "uniform")
    pruner.prune_to(0.7)
    if variant == "rigl":
        pruner.prune_to(0.8)
    dist.barrier()
    with PeakRSS() as memory:
        start = time.perf_counter()
        if variant == "rigl":
            pruner.regrow(0.3, "rigl")
        else:
            pruner.prune_to(0.8)
        update_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(5):
        pruner.mask_grads()
    mask_s = (time.perf_counter() - start) / 5
    shard_bytes = sum(t.numel() * t.element_size() for t in shards)
    # pruned entries: from the weights, or for RigL from the masks (regrown weights restart at exactly zero)
    pruned = [pruner.masks[n] for n in pruner.params] if variant == "rigl" else shards
    zeros = torch.tensor([sum(int(t.numel() - t.count_nonzero()) for t in pruned)])
    dist.all_reduce(zeros)
    if int(zeros) != _expected_zeros([p.numel() for p in params], variant):
        raise RuntimeError(f"rank {rank}: the sharded update did not reach 0.8 ({int(zeros)} zeros)")
    return rank, pass_s, update_s, (memory.peak - memory.before) / shard_bytes, mask_s


def measure_sharded(weights_m: float, variant: str) -> dict[str, Any]:
    """One update of the whole model sharded by rows over 2 CPU ranks (FSDP2 ``fully_shard``, gloo, one thread
    each): the slower rank's time, as a ratio to its own pass over its shards; memory per byte of its shards."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = 29_700 + os.getpid() % 1000
    ranks = [context.Process(target=_sharded_rank, args=(r, weights_m, variant, port, queue)) for r in range(2)]
    for process in ranks:
        process.start()
    results = [queue.get(timeout=1800) for _ in ranks]
    failed = [r for r in results if len(r) == 2]
    if failed:
        raise RuntimeError(f"sharded ranks failed: {failed}")
    for process in ranks:
        process.join(timeout=60)
    slowest = max(results, key=lambda r: r[2] / r[1])
    _, pass_s, update_s, _, mask_s = slowest
    return _row("sharded", weights_m, variant, pass_s, update_s, max(r[3] for r in results), mask_s)


def pat_callbacks_file() -> str:
    import pat_callbacks

    return str(Path(pat_callbacks.__file__).parent)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "pruner": ("-", "o", ""),
        "callback": (":", "s", " (GradualPruning)"),
        "sharded": ("--", "^", " (2 ranks)"),
    }
    colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for mode, (line, marker, suffix) in styles.items():
        for variant in VARIANTS:
            points = sorted(
                (
                    (float(r["weights_m"]), r)
                    for r in rows
                    if r["variant"] == variant and r.get("mode", "pruner") == mode
                ),
                key=lambda point: point[0],
            )
            if not points:
                continue
            sizes = [p[0] for p in points]
            style = {"linestyle": line, "marker": marker, "color": colours[variant], "label": variant + suffix}
            left.plot(sizes, [float(p[1]["update_per_pass"]) for p in points], **style)
            right.plot(sizes, [float(p[1]["transient_per_weight_bytes"]) for p in points], **style)
    left.axhline(8, linestyle="--", color="grey", linewidth=0.8, label="targets: 8x uniform, 10x global")
    left.axhline(10, linestyle="--", color="grey", linewidth=0.8)
    for axis, title, ylabel, target in (
        (left, "Mask update time", "update time / one pass over the weights", None),
        (right, "Transient memory of an update", "peak extra RSS / weight bytes", 0.6),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log" if axis is left else "linear")
        axis.set_xlabel("weights (millions)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        if target is not None:
            axis.axhline(target, linestyle="--", color="grey", label=f"target {target}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.suptitle("pat-callbacks mask updates vs model size (4 square Linear layers, 1 CPU thread)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _run_single(mode: str, size: float, variant: str, threads: int) -> dict[str, Any]:
    if mode == "callback":
        return measure_callback(size, variant, threads)
    if mode == "sharded":
        return measure_sharded(size, variant)
    return measure(size, variant, threads)


def plan(args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """(mode, size, variant) of every row, each run in a fresh process."""
    jobs = [("pruner", size, v) for size in args.sizes for v in args.variants] if "pruner" in args.modes else []
    if "callback" in args.modes:
        jobs += [("callback", size, v) for size in args.sizes for v in args.variants if v in CALLBACK_VARIANTS]
    if "sharded" in args.modes:
        jobs += [("sharded", size, v) for size in args.sharded_sizes for v in args.variants if v in SHARDED_VARIANTS]
    return jobs


def _merged(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's rows, plus the rows of ``path`` measured for other (mode, size, variant) keys (so the pruner
    and sharded rows can be measured in separate invocations)."""

    def key(row: dict[str, Any]) -> tuple[str, float, str]:
        return row.get("mode") or "pruner", float(row["weights_m"]), row["variant"]

    new = {key(row) for row in rows}
    old = []
    if path.exists():
        with open(path, newline="") as handle:
            old = [row for row in csv.DictReader(handle) if row.get("mode") and key(row) not in new]
    return sorted(old + rows, key=lambda row: (MODES.index(key(row)[0]), key(row)[1], VARIANTS.index(row["variant"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[4, 16, 67, 268], help="millions of weights")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--sharded-sizes", nargs="+", type=float, default=[16, 67], help="for the 2-rank rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--single", nargs=3, metavar=("MODE", "SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        mode, size, variant = args.single
        print(json.dumps(_run_single(mode, float(size), variant, args.threads)))
        return
    rows, failures = [], []
    for mode, size, variant in plan(args):
        command = [sys.executable, __file__, "--single", mode, f"{size:g}", variant, "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # reported at the end; the rows measured so far are still written
            failures.append(f"{mode} {size:g} {variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            print(failures[-1], file=sys.stderr, flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.pop("module", None)
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = _merged(args.out / "scale.csv", rows)
    with open(args.out / "scale.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.csv'} and {args.out / 'scale.png'}")
    if failures:
        raise SystemExit(f"{len(failures)} measurement(s) failed (above)")


if __name__ == "__main__":
    main()
