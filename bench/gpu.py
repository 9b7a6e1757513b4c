"""What pruning costs on one GPU: training steps, mask updates, mask equality, 2:4 kernels, shrunk-model latency.

One script, under 5 minutes on one H200, each part under its own time limit; results are written as each part ends:

- ``steps``: HF GPT-2 small (from its config, no download), bf16-mixed, batch 8 x 512 (AdamW), in a Lightning
  Trainer: dense / default (``GradualPruning()``: taylor + global) / magnitude-uniform / RigL
  (``DynamicSparseTraining``) / Lightning ``ModelPruning`` (l1, at epoch ends). Variants interleaved, two
  repetitions. Per run: the steady step (median interval between batch starts, update intervals excluded) as a
  ratio to dense's, and the *update extra*: the median interval at the update phase minus the steady step, in ms
  and in steady steps. Peak memory as a ratio to dense's.
- ``updates``: ``Pruner.prune_to`` 0.7 -> 0.8 (uniform, global) and RigL's ``regrow(0.3)`` on 16 square bf16 Linear
  layers (268M and 1.07B weights): time in *passes* (the update's time over one ``abs()`` pass over the weights)
  and the extra peak memory over the weights' bytes.
- ``equality``: masks from the GPU (device strategy) equal to those of a CPU copy (host strategy), per variant.
- ``kernels``: cuSPARSELt 2:4 vs dense ``F.linear`` (bf16) by weight shape and tokens, and
  ``export.to_semi_structured`` (timed mode) on 2:4-pruned GPT-2 small: its per-layer choices, end-to-end speed-up.
- ``shrink``: GPT-2 small with 50% of heads and MLP neurons removed (``structured.shrink_transformer``): latency of
  the transformer body and of the whole model (with the lm_head) against the dense one, by batch.

    python bench/gpu.py                  # on the GPU machine -> bench/results/gpu.{md,csv}
    python bench/gpu.py --smoke          # CPU, tiny sizes, seconds: the code paths only (tests/bench runs it)
    python bench/gpu.py --parts steps updates --out /tmp/gpu

It imports torch, lightning, transformers and pat_callbacks only (no hydra, no torch-pruning). In ``--smoke`` the
device strategy is forced on the CPU for the ``updates`` and ``equality`` parts (so both strategies run), timings
are of tiny CPU models and mean nothing for a GPU; the file says so, and lists the CUDA rows as not run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

PARTS = ("steps", "updates", "equality", "kernels", "shrink")
FIELDS = ("part", "device", "name", "metric", "value", "note")
STEP_VARIANTS = ("dense", "default", "magnitude-uniform", "rigl", "modelpruning")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    gpt2: dict[str, int]
    batch: int
    context: int
    steps: int
    every: int
    repetitions: int
    update_layers: list[tuple[int, int]]  # (layers, width) per size
    equality_width: int
    kernel_shapes: list[tuple[int, int]]
    kernel_tokens: list[int]
    shrink_batches: list[int]
    limits: dict[str, int]  # seconds per part


GPU = Sizes(
    gpt2={},  # GPT-2 small: the config's defaults
    batch=8,
    context=512,
    steps=40,
    every=10,
    repetitions=2,
    update_layers=[(16, 4096), (16, 8192)],  # 268M, 1.07B weights
    equality_width=1024,  # 4 layers: 4M weights
    kernel_shapes=[(4096, 4096), (16384, 4096), (4096, 16384), (28672, 8192), (8192, 28672)],
    kernel_tokens=[2048, 8192, 32768],
    shrink_batches=[1, 8, 32],
    limits={"steps": 120, "updates": 60, "equality": 30, "kernels": 60, "shrink": 30},
)
SMOKE = Sizes(
    gpt2={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16, "vocab_size": 64},
    batch=2,
    context=16,
    steps=6,
    every=2,
    repetitions=2,
    update_layers=[(4, 128)],
    equality_width=64,
    kernel_shapes=[(64, 64)],
    kernel_tokens=[16],
    shrink_batches=[1, 2],
    limits={"steps": 120, "updates": 30, "equality": 30, "kernels": 30, "shrink": 30},
)


# --------------------------------------------------------------------------------------------------------- helpers
class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the block after ``seconds`` (SIGALRM; the main thread only)."""

    def expire(*_: Any) -> None:
        raise PartTimeout(f"over its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()``, synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(device: torch.device) -> Callable[[], int] | None:
    """Reset the peak counter; returns a reader of the peak allocated bytes since (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return lambda: torch.cuda.max_memory_allocated(device)


def gpt2(config_overrides: dict[str, int], seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**config_overrides))


class Rows:
    """The CSV rows, and the markdown written after every part."""

    def __init__(self, out: Path, smoke: bool, device: torch.device) -> None:
        self.out, self.smoke, self.device = out, smoke, device
        self.rows: list[dict[str, Any]] = []
        self.sections: dict[str, list[str]] = {}

    def add(self, part: str, name: str, metric: str, value: Any, note: str = "") -> None:
        self.rows.append(
            {"part": part, "device": self.device.type, "name": name, "metric": metric, "value": value, "note": note}
        )

    def section(self, part: str, lines: list[str]) -> None:
        self.sections[part] = lines
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        stem = "gpu"
        with open(self.out / f"{stem}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        (self.out / f"{stem}.md").write_text(self.markdown())

    def markdown(self) -> str:
        today = datetime.date.today().isoformat()
        where = _describe(self.device)
        lines = ["# bench/gpu.py", ""]
        if self.smoke:
            lines += [
                f"**CPU smoke run ({today}, `python bench/gpu.py --smoke`): tiny models on {where}.** It checks that "
                "every part of the benchmark runs; its timings are of tiny CPU models and say nothing about a GPU.",
                "",
                f"**CUDA rows: not run (no GPU lent on {today}).** Every table below that needs a GPU (GPT-2 small "
                "steps in bf16, updates at 268M and 1.07B weights, CUDA-vs-CPU masks, cuSPARSELt kernels, shrunk "
                "latency) is not run; run `python bench/gpu.py` on one.",
                "",
            ]
        else:
            lines += [f"Run on {today} on {where} (`python bench/gpu.py`).", ""]
        for part in PARTS:
            if part in self.sections:
                lines += self.sections[part] + [""]
        return "\n".join(lines)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (capability {torch.cuda.get_device_capability(device)}), torch {torch.__version__}"
    return f"a CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------------------- steps
def _lm_module(model: nn.Module, lr: float = 1e-4) -> Any:
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=lr)

    return LM()


def _pruning_callback(variant: str, sizes: Sizes, model: nn.Module) -> Any:
    from pat_callbacks import DynamicSparseTraining, GradualPruning

    window = {"start_step": sizes.every, "end_step": sizes.steps, "update_every": sizes.every}
    if variant == "default":
        return GradualPruning(sparsity=0.8, **window, verbose=False, prog_bar=False)
    if variant == "magnitude-uniform":
        return GradualPruning(
            sparsity=0.8, criterion="magnitude", allocation="uniform", **window, verbose=False, prog_bar=False
        )
    if variant == "rigl":
        return DynamicSparseTraining(
            sparsity=0.8, update_every=sizes.every, stop_step=10 * sizes.steps, verbose=False, prog_bar=False
        )
    if variant == "modelpruning":
        from lightning.pytorch.callbacks import ModelPruning

        convs = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
        return ModelPruning(
            "l1_unstructured", parameters_to_prune=[(m, "weight") for m in convs], amount=0.2, verbose=0
        )
    return None


class _StepClock:
    """Batch-start times (synchronised) and the time spent in a callback's hooks per interval."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []
        self.hook_time: list[float] = []

    def callback(self) -> Any:
        import lightning.pytorch as pl

        clock = self

        class Clock(pl.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                sync(clock.device)
                clock.starts.append(time.perf_counter())
                clock.hook_time.append(0.0)

        return Clock()

    def wrap(self, callback: Any) -> None:
        """Add the host time of every ``on_*`` hook ``callback`` overrides to the current interval (not synchronised:
        hooks that only launch work stay cheap to time; an update reads the device, so its time shows)."""
        import lightning.pytorch as pl

        for name in dir(type(callback)):
            if not name.startswith("on_") or getattr(type(callback), name) is getattr(pl.Callback, name, None):
                continue
            original = getattr(callback, name)

            def timed_hook(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    if self.hook_time:
                        self.hook_time[-1] += time.perf_counter() - start

            setattr(callback, name, timed_hook)


def _one_fit(variant: str, sizes: Sizes, state: dict[str, Any], device: torch.device, smoke: bool) -> dict[str, Any]:
    import lightning.pytorch as pl

    model = gpt2(sizes.gpt2)
    model.load_state_dict(state)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    data = [torch.randint(0, vocab, (sizes.batch, sizes.context), generator=generator) for _ in range(sizes.every)]
    clock = _StepClock(device)
    callbacks = [clock.callback()]
    pruning = _pruning_callback(variant, sizes, model)
    if pruning is not None:
        clock.wrap(pruning)
        callbacks.append(pruning)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=sizes.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    measure = peak_bytes(device)
    trainer.fit(_lm_module(model), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    peak = measure() if measure else None
    intervals = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]
    hooks = clock.hook_time[: len(intervals)]
    first = sizes.every  # the first "epoch" warms up (allocator, autotuning, compile of nothing)
    phases = list(range(sizes.every))
    by_phase = {p: [intervals[i] for i in range(first, len(intervals)) if i % sizes.every == p] for p in phases}
    hook_by_phase = {
        p: statistics.median([hooks[i] for i in range(first, len(hooks)) if i % sizes.every == p] or [0])
        for p in phases
    }
    update_phase = max(phases, key=lambda p: hook_by_phase[p]) if pruning is not None else None
    steady = [t for p in phases if p != update_phase for t in by_phase[p]]
    steady_s = statistics.median(steady)
    update_s = (
        statistics.median(by_phase[update_phase]) if update_phase is not None and by_phase[update_phase] else None
    )
    sparsity = _model_sparsity(model)
    return {"steady_s": steady_s, "update_s": update_s, "peak": peak, "sparsity": sparsity}


def _model_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if type(m).__name__ == "Conv1D"]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def part_steps(rows: Rows, sizes: Sizes, device: torch.device, smoke: bool) -> None:
    state = {k: v.clone() for k, v in gpt2(sizes.gpt2).state_dict().items()}
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in STEP_VARIANTS}
    try:
        for repetition in range(sizes.repetitions):
            order = STEP_VARIANTS if repetition % 2 == 0 else tuple(reversed(STEP_VARIANTS))
            for variant in order:
                results[variant].append(_one_fit(variant, sizes, state, device, smoke))
    finally:  # what finished is written even if the part runs out of time
        _steps_table(rows, sizes, device, smoke, results)


def _steps_table(
    rows: Rows, sizes: Sizes, device: torch.device, smoke: bool, results: dict[str, list[dict[str, Any]]]
) -> None:
    dense = results["dense"]
    lines = [
        f"## Training steps: GPT-2{' (tiny config)' if smoke else ' small'}, batch {sizes.batch} x {sizes.context}, "
        f"{'bf16-mixed' if device.type == 'cuda' else 'fp32'}, {sizes.steps} steps, an update every {sizes.every}",
        "",
        "| variant | rep | steady step ms | step / dense | update extra ms | extra / steady step | peak mem / dense "
        "| Conv1D sparsity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in STEP_VARIANTS:
        for rep, r in enumerate(results[variant][: len(dense)]):
            steady = r["steady_s"]
            ratio = steady / dense[rep]["steady_s"]
            extra = None if r["update_s"] is None else r["update_s"] - r["steady_s"]
            peak = None if r["peak"] is None or dense[rep]["peak"] is None else r["peak"] / dense[rep]["peak"]
            rows.add("steps", variant, f"rep{rep}_steady_ms", round(1e3 * r["steady_s"], 3))
            rows.add("steps", variant, f"rep{rep}_step_ratio", round(ratio, 3))
            if extra is not None:
                rows.add("steps", variant, f"rep{rep}_update_extra_ms", round(1e3 * extra, 2))
            if peak is not None:
                rows.add("steps", variant, f"rep{rep}_peak_ratio", round(peak, 3))
            lines.append(
                f"| {variant} | {rep + 1} | {1e3 * r['steady_s']:.2f} | {ratio:.3f} | "
                f"{'-' if extra is None else f'{1e3 * extra:.1f}'} | "
                f"{'-' if extra is None else f'{extra / steady:.2f}'} | "
                f"{'-' if peak is None else f'{peak:.3f}'} | {r['sparsity']:.3f} |"
            )
    rows.section("steps", lines)


# --------------------------------------------------------------------------------------------------------- updates
def _linear_stack(layers: int, width: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(*[nn.Linear(width, width, bias=False, dtype=dtype) for _ in range(layers)])
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _update_once(variant: str, model: nn.Module) -> tuple[Callable[[], Any], Any]:
    """A pruner prepared for the measured update, and the update itself."""
    from pat_callbacks import Pruner

    pruner = Pruner(model, allocation="global" if variant == "global" else "uniform")
    pruner.prune_to(0.7)
    if variant == "rigl":
        pruner.prune_to(0.8)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        return (lambda: pruner.regrow(0.3, "rigl")), pruner
    return (lambda: pruner.prune_to(0.8)), pruner


def measure_update(
    variant: str, layers: int, width: int, device: torch.device, dtype: torch.dtype, strategy: str, chunk: int
) -> tuple[float, float, float | None]:
    """``(pass seconds, update seconds, extra peak memory / weight bytes)`` of one update of a fresh Linear stack
    under a selection ``strategy`` and device chunk size (the extra memory only on CUDA)."""
    from pat_callbacks.core import selection

    saved = selection.STRATEGY, selection.DEVICE_CHUNK_SIZE
    selection.STRATEGY, selection.DEVICE_CHUNK_SIZE = strategy, chunk
    try:
        model = _linear_stack(layers, width, device, dtype)
        params = list(model.parameters())
        pass_s = timed(lambda ps=params: [p.detach().abs() for p in ps], device)
        update, _pruner = _update_once(variant, model)
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        measure = peak_bytes(device)
        start = time.perf_counter()
        update()
        sync(device)
        update_s = time.perf_counter() - start
        extra = None if measure is None or before is None else (measure() - before) / weight_bytes
    finally:
        selection.STRATEGY, selection.DEVICE_CHUNK_SIZE = saved
    del model, update, _pruner, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return pass_s, update_s, extra


def part_updates(rows: Rows, sizes: Sizes, device: torch.device, smoke: bool) -> None:
    from pat_callbacks.core import selection

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    strategies = ["auto", "host"] if device.type == "cuda" else ["host", "device"]  # side by side
    chunk = selection.DEVICE_CHUNK_SIZE
    lines = [
        f"## Mask updates on square {str(dtype).replace('torch.', '')} Linear stacks ({device.type})",
        "",
        "passes = update time / one `abs()` pass over every weight; extra memory = peak allocated during the update "
        "minus before, over the weights' bytes.",
        "",
        "| weights | variant | strategy | pass ms | update ms | passes | extra memory / weight bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for layers, width in sizes.update_layers:
        weights = layers * width * width
        for variant in ("uniform", "global", "rigl"):
            for strategy in strategies if weights < 5e8 or device.type != "cuda" else ["auto"]:  # host: seconds
                pass_s, update_s, extra = measure_update(variant, layers, width, device, dtype, strategy, chunk)
                name = f"{weights / 1e6:.0f}M {variant}"
                rows.add("updates", name, f"{strategy}_passes", round(update_s / pass_s, 1))
                rows.add("updates", name, f"{strategy}_update_ms", round(1e3 * update_s, 2))
                if extra is not None:
                    rows.add("updates", name, f"{strategy}_extra_memory", round(extra, 3))
                lines.append(
                    f"| {weights / 1e6:.2f}M | {variant} | {strategy} | {1e3 * pass_s:.3f} | {1e3 * update_s:.2f} | "
                    f"{update_s / pass_s:.1f} | {'-' if extra is None else f'{extra:.3f}'} |"
                )
    layers, width = sizes.update_layers[0]
    lines += [
        "",
        f"### The device strategy's chunk size (uniform, {layers * width * width / 1e6:.2f}M weights)",
        "",
        "| DEVICE_CHUNK_SIZE | update ms | passes | extra memory / weight bytes |",
        "|---|---|---|---|",
    ]
    for size in (1 << 21, 1 << 22, 1 << 23, 1 << 24):
        pass_s, update_s, extra = measure_update("uniform", layers, width, device, dtype, "device", size)
        rows.add("updates", f"chunk 2**{size.bit_length() - 1}", "device_passes", round(update_s / pass_s, 1))
        lines.append(
            f"| 2**{size.bit_length() - 1} | {1e3 * update_s:.2f} | {update_s / pass_s:.1f} | "
            f"{'-' if extra is None else f'{extra:.3f}'} |"
        )
    rows.section("updates", lines)


# -------------------------------------------------------------------------------------------------------- equality
def _masks(variant: str, model: nn.Module, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    from pat_callbacks import Pruner

    options = {"uniform": {}, "global": {"allocation": "global"}, "2:4": {"pattern": "2:4"}, "rigl": {}}[variant]
    pruner = Pruner(model, **options)
    pruner.prune_to(0.5 if variant == "2:4" else 0.8)
    if variant == "rigl":
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.to(p.device)
        pruner.regrow(0.3, "rigl")
    return {name: mask.cpu() for name, mask in pruner.masks.items()}


def part_equality(rows: Rows, sizes: Sizes, device: torch.device, smoke: bool) -> None:
    from pat_callbacks.core import selection

    width = sizes.equality_width
    reference = _linear_stack(4, width, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=generator) for p in reference.parameters()]
    if device.type == "cuda":
        label, other = "CUDA (auto: device strategy) vs CPU (host strategy)", ("auto", device)
    else:
        label, other = "CPU, device strategy forced vs host strategy", ("device", torch.device("cpu"))
    lines = [
        f"## Mask equality, 4 x {width}x{width} fp32 weights: {label}",
        "",
        "| variant | equal | entries differing |",
        "|---|---|---|",
    ]
    for variant in ("uniform", "global", "2:4", "rigl"):
        previous = selection.STRATEGY
        try:
            selection.STRATEGY = "host"
            host = _masks(variant, copy.deepcopy(reference), grads)
            selection.STRATEGY = other[0]
            moved = copy.deepcopy(reference).to(other[1])
            theirs = _masks(variant, moved, grads)
        finally:
            selection.STRATEGY = previous
        differing = sum(int((host[n] != theirs[n]).sum()) for n in host)
        rows.add("equality", variant, "equal", differing == 0, label)
        rows.add("equality", variant, "differing", differing, label)
        lines.append(f"| {variant} | {'yes' if differing == 0 else 'no'} | {differing} |")
    rows.section("equality", lines)


# --------------------------------------------------------------------------------------------------------- kernels
def _two_four(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    weight = torch.randn(shape, device=device, dtype=dtype)
    keep = (torch.arange(shape[1], device=device) % 4) < 2
    return weight * keep


def part_kernels(rows: Rows, sizes: Sizes, device: torch.device, smoke: bool) -> None:
    from pat_callbacks.export.semi_structured import semi_structured_unavailable, to_semi_structured

    reason = semi_structured_unavailable()
    lines = ["## 2:4 kernels (cuSPARSELt) vs dense `F.linear`, bf16", ""]
    if reason is None:
        from torch.sparse import to_sparse_semi_structured

        lines += ["| weight out x in | tokens | dense ms | 2:4 ms | dense / 2:4 |", "|---|---|---|---|---|"]
        for shape in sizes.kernel_shapes:
            weight = _two_four(shape, device, torch.bfloat16)
            sparse = to_sparse_semi_structured(weight)
            for tokens in sizes.kernel_tokens:
                x = torch.randn(tokens, shape[1], device=device, dtype=torch.bfloat16)
                dense_s = timed(lambda x=x, w=weight: nn.functional.linear(x, w), device, repeats=10, warmup=3)
                sparse_s = timed(lambda x=x, w=sparse: nn.functional.linear(x, w), device, repeats=10, warmup=3)
                rows.add("kernels", f"{shape[0]}x{shape[1]}@{tokens}", "speedup", round(dense_s / sparse_s, 3))
                lines.append(
                    f"| {shape[0]}x{shape[1]} | {tokens} | {1e3 * dense_s:.3f} | {1e3 * sparse_s:.3f} | "
                    f"{dense_s / sparse_s:.2f}x |"
                )
                del x
            del weight, sparse
        kernel, timer, what = None, None, "cuSPARSELt"
    else:
        lines += [f"Not run: {reason}.", ""]
        rows.add("kernels", "table", "not run", reason)
        # the export's decision logic still runs, with a stand-in kernel (a dense copy) and the CPU clock
        kernel, timer, what = (lambda w: w.clone()), None, "a stand-in kernel (dense copy; CPU smoke: the code path)"
    model = gpt2(sizes.gpt2).eval().to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                module.weight.mul_(((torch.arange(module.weight.shape[0], device=device) % 4) < 2).view(-1, 1))
    tokens = torch.randint(0, model.config.vocab_size, (sizes.batch, sizes.context), device=device)
    report = to_semi_structured(model, tokens, kernel=kernel, timer=timer)
    rows.add("kernels", "gpt2 export", "converted_layers", report.converted, what)
    rows.add("kernels", "gpt2 export", "end_to_end_speedup", round(report.speedup or 1.0, 3), what)
    lines += [
        "",
        f"### `to_semi_structured(model, tokens)` on 2:4 GPT-2{' (tiny)' if smoke else ' small'}, batch "
        f"{sizes.batch} x {sizes.context}, with {what}",
        "",
        str(report),
    ]
    rows.section("kernels", lines)


# ---------------------------------------------------------------------------------------------------------- shrink
def part_shrink(rows: Rows, sizes: Sizes, device: torch.device, smoke: bool) -> None:
    from pat_callbacks.structured.attention import shrink_transformer, transformer_groups

    dense = gpt2(sizes.gpt2).eval()
    heads, ffn = transformer_groups(dense)
    pruned = {group.root: list(range(group.n_channels // 2)) for group in heads + ffn}  # half of each
    small = shrink_transformer(copy.deepcopy(dense), pruned)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense, small = dense.to(device, dtype), small.to(device, dtype)
    params = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in small.parameters())
    lines = [
        f"## Shrunk GPT-2{' (tiny)' if smoke else ' small'}: 50% of heads and MLP neurons removed "
        f"({params[0] / 1e6:.2f}M -> {params[1] / 1e6:.2f}M parameters), {str(dtype).replace('torch.', '')}, "
        f"context {sizes.context}",
        "",
        "| batch | body dense ms | body shrunk ms | body shrunk / dense | whole dense ms | whole shrunk ms "
        "| whole shrunk / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for batch in sizes.shrink_batches:
            tokens = torch.randint(0, dense.config.vocab_size, (batch, sizes.context), device=device)
            times = [
                timed(lambda m=m, t=tokens: m.transformer(input_ids=t), device, repeats=5, warmup=2)
                for m in (dense, small)
            ]
            times += [timed(lambda m=m, t=tokens: m(input_ids=t), device, repeats=5, warmup=2) for m in (dense, small)]
            rows.add("shrink", f"batch {batch}", "body_ratio", round(times[1] / times[0], 3))
            rows.add("shrink", f"batch {batch}", "whole_ratio", round(times[3] / times[2], 3))
            lines.append(
                f"| {batch} | {1e3 * times[0]:.2f} | {1e3 * times[1]:.2f} | {times[1] / times[0]:.2f} | "
                f"{1e3 * times[2]:.2f} | {1e3 * times[3]:.2f} | {times[3] / times[2]:.2f} |"
            )
    rows.section("shrink", lines)


RUNNERS = {
    "steps": part_steps,
    "updates": part_updates,
    "equality": part_equality,
    "kernels": part_kernels,
    "shrink": part_shrink,
}


def run(parts: list[str], smoke: bool, out: Path) -> Rows:
    """Run ``parts`` (each under its own time limit), writing ``out/gpu.{md,csv}`` after each; returns the rows."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    sizes = SMOKE if smoke else GPU
    rows = Rows(out, smoke, device)
    for part in parts:
        start = time.perf_counter()
        try:
            with time_limit(sizes.limits[part]):
                RUNNERS[part](rows, sizes, device, smoke)
        except Exception as error:  # one part failing must not lose the others' results
            rows.add(part, "part", "failed", f"{type(error).__name__}: {error}")
            done = rows.sections.get(part, [f"## {part}"])  # a part may have written what it finished
            failure = [f"Failed: `{type(error).__name__}: {error}`", "", "```", traceback.format_exc(limit=4), "```"]
            rows.section(part, [*done, "", *failure])
        rows.add(part, "part", "seconds", round(time.perf_counter() - start, 1))
        rows.write()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (seconds): the code paths only")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.smoke else torch.get_num_threads())
    rows = run(args.parts, args.smoke, args.out)
    print((args.out / "gpu.md").read_text())
    failed = [r for r in rows.rows if r["metric"] == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} part(s) failed: {[r['part'] for r in failed]}")


if __name__ == "__main__":
    main()
