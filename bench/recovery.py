"""Recovery after pruning from a pretrained CharGPT: PAT with and without distillation, 2:4 + int8, teacher cost.

Starting point: a pretrained dense CharGPT (``--checkpoint PATH``: a Lightning checkpoint of a ``LanguageModel``
or a ``CharGPT`` state_dict, e.g. from bench/pretrain.py; without it, one is pretrained here with bench/lm.py's
budget and cached in the output folder). Every row then trains the same number of steps from it (same data
order per seed, AdamW, warm-up then cosine) and reports validation bits/char:

- ``dense (pretrained)``: the starting point, evaluated;
- ``dense (same budget)``: the starting point trained the same steps without pruning (the reference of the gaps:
  a short pretraining leaves the start under-trained, and every row trains further);
- ``one-shot magnitude`` / ``one-shot wanda`` / ``one-shot sparsegpt``: the pretrained model pruned at once
  (``one_shot_prune``; uniform per layer, Wanda per output row, SparseGPT blocks of 128; 2:4 per row), Wanda and
  SparseGPT calibrated on the first 4 training batches of the seed, not trained: the starts to beat;
- ``<method> + recovery`` / ``<method> + recovery + kd``: ``OneShotPruning(<method>)`` at step 0 (the same
  calibration), then every step trains with the masks kept, without / with distillation from the dense start;
- ``pat``: GradualPruning from the pretrained model (cubic, 0 -> target over the first half of the steps, taylor
  scores with global allocation; 2:4 by magnitude), the second half to recover;
- ``pat + kd``: the same with Distillation from the dense pretrained model (T=2, alpha=1, teacher copied at
  step 0);
- ``pat 2:4 + int8 + kd``: 2:4 as above, then fake-quantized int8 training (per channel) from the end of the
  pruning window, with distillation; the final weights are the dequantized int8 values.

Every row counts its sparsity on the final weights and checks that every masked weight is exactly zero. Export
sizes (bytes on disk, ``torch.save``) of each final model: dense fp32, sparse only (``save_sparse``), int8 only,
sparse + int8 and sparse + int4 (group 32). The teacher's cost is measured in one process, side by side: median
time of a training step (forward, backward, AdamW) of the pruned student alone, with distillation from an fp32
teacher and from a bf16 teacher, interleaved so drift hits all three alike; the teacher's memory is its
parameters' bytes.

    python bench/recovery.py                          # full grid: 3 seeds, 50% / 2:4 / 70% / 80%
    python bench/recovery.py --checkpoint pre.ckpt    # from a given pretrained model
    python bench/recovery.py --smoke                  # tiny model, a few steps, 1 seed (outputs/bench_recovery)

Writes bench/results/recovery.{csv,md} (or --out DIR).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lm import BATCH, LR, MODEL, parse_model  # noqa: E402

PRETRAIN_STEPS = 800  # bench/lm.py's dense budget
STEPS = 400  # recovery budget of every row
RECOVERY_LR = 3e-3
TARGETS = ("0.5", "2:4", "0.7", "0.8")
DENSE = ("dense (pretrained)", "dense (same budget)")
METHODS = ("magnitude", "wanda", "sparsegpt")  # the one-shot starts
ONE_SHOT = tuple(f"one-shot {m}" for m in METHODS)
RECOVERED = tuple(f"{m} + recovery{kd}" for m in METHODS for kd in ("", " + kd"))
GRADUAL = ("pat", "pat + kd", "pat 2:4 + int8 + kd")
ROWS = (*DENSE, *ONE_SHOT, *RECOVERED, *GRADUAL)
CALIBRATION_BATCHES = 4  # 4 x 32 = 128 windows, as bench/pretrained.py
PRUNE_FRACTION = 0.5  # the pruning window: the first half of the recovery steps
TEMPERATURE, ALPHA = 2.0, 1.0

FIELDS = [
    "row",
    "target",
    "seed",
    "model",
    "batch",
    "steps",
    "val_bpc",
    "test_bpc",
    "sparsity",
    "zeros_exact",
    "bytes_dense",
    "bytes_sparse",
    "bytes_int8",
    "bytes_sparse_int8",
    "bytes_sparse_int4",
    "export_exact",
    "seconds",
    "checkpoint",
    "end_time",
    "lr",
]


# ---------------------------------------------------------------------------------------------------- the model
def _net(model: str) -> Any:
    from pat_callbacks.app.models import CharGPT

    spec = parse_model(model)
    return CharGPT(vocab_size=96, context=spec["context"], dim=spec["dim"], layers=spec["layers"], heads=spec["heads"])


def _data(model: str, batch: int, seed: int) -> Any:
    from pat_callbacks.app.data import ShakespeareDataModule

    return ShakespeareDataModule(context=parse_model(model)["context"], batch_size=batch, seed=seed)


def _trainer(steps: int, callbacks: list[Any]) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if steps else None,
    )


def load_pretrained(path: str | Path, model: str) -> Any:
    """A CharGPT from a Lightning checkpoint of a LanguageModel (``state_dict`` with ``net.`` keys) or a plain
    CharGPT state_dict (with or without the ``net.`` prefix)."""
    import torch

    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # bench/pretrain.py's record
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain values and tensors: no code runs
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("net."): v for k, v in state.items()}
    net = _net(model)
    net.load_state_dict(state)
    return net


def checkpoint_model(path: str | Path) -> str | None:
    """The ``dD-lL-hH-cC`` spec a checkpoint names (bench/pretrain.py stores ``{"model": {...}}``), else None."""
    import torch

    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # bench/pretrain.py's record
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain values and tensors: no code runs
    spec = state.get("model") if isinstance(state, dict) else None
    if isinstance(spec, dict) and {"dim", "layers", "heads", "context"} <= set(spec):
        return f"d{spec['dim']}-l{spec['layers']}-h{spec['heads']}-c{spec['context']}"
    return None


def pretrain(model: str, batch: int, steps: int, out: Path) -> Path:
    """Pretrain a dense CharGPT (seed 0, bench/lm.py's learning rate) unless cached; return its state_dict file."""
    import lightning.pytorch as pl
    import torch

    from pat_callbacks.app.models import LanguageModel

    path = out / f"pretrained_{model}_b{batch}_{steps}.pt"
    if path.exists():
        return path
    torch.set_num_threads(1)  # as every run here: on shared cores more threads only wait on each other
    pl.seed_everything(0, verbose=False)
    module = LanguageModel(_net(model), lr=LR, warmup_steps=min(100, max(1, steps // 8)))
    trainer = _trainer(steps, [])
    trainer.fit(module, datamodule=_data(model, batch, 0))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(module.net.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------------- one row
def _masks_from(net: Any, sparsity: float | None, pattern: str) -> dict[str, Any]:
    from pat_callbacks.core.pruner import Pruner

    pruner = Pruner(net, criterion="magnitude", allocation="uniform", pattern=pattern)
    pruner.prune_to(0.5 if pattern != "unstructured" else float(sparsity))
    pruner.apply()
    return dict(pruner.masks)


def _sizes(net: Any, tmp: Path) -> dict[str, int]:
    """Bytes on disk of the model in each format (int4 groups of 32 inputs, or of the width when it is smaller)."""
    import torch

    from pat_callbacks.export import save_sparse
    from pat_callbacks.export.quantized import save_quantized

    dense = tmp / "dense.pt"
    torch.save(net.state_dict(), dense)
    return {
        "bytes_dense": dense.stat().st_size,
        "bytes_sparse": save_sparse(net, tmp / "sparse.pt").sparse_bytes,
        "bytes_int8": save_quantized(net, tmp / "int8.pt", "int8", sparse=False),
        "bytes_sparse_int8": save_quantized(net, tmp / "sparse_int8.pt", "int8"),
        "bytes_sparse_int4": save_quantized(net, tmp / "sparse_int4.pt", f"int4:g{min(32, net.embed.embedding_dim)}"),
    }


def job(
    row: str, target: str, seed: int, steps: int, model: str, batch: int, checkpoint: str, lr: float = RECOVERY_LR
) -> dict[str, Any]:
    """One row at one target and seed, in this process (1 thread); returns a CSV row."""
    import lightning.pytorch as pl
    import torch

    from pat_callbacks import Distillation, GradualPruning, OneShotPruning, QuantizationAwareTraining
    from pat_callbacks.app.models import LanguageModel
    from pat_callbacks.core.targets import select_parameters
    from pat_callbacks.export.quantized import dequantize_state_dict, quantize_state_dict
    from pat_callbacks.oneshot import one_shot_prune

    torch.set_num_threads(1)
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    net = load_pretrained(checkpoint, model)
    pattern = "2:4" if target == "2:4" else "unstructured"
    sparsity = 0.5 if target in ("2:4", "-") else float(target)
    train_steps = 0 if row == "dense (pretrained)" or row in ONE_SHOT else steps
    module = LanguageModel(net, lr=lr, warmup_steps=max(1, steps // 20))
    masks: dict[str, Any] = {}
    callbacks: list[Any] = []
    pruning = None
    data = _data(model, batch, seed)
    if row in ONE_SHOT:
        method = row.removeprefix("one-shot ")
        calibration = []
        if method != "magnitude":
            data.setup("fit")
            for tokens in data.train_dataloader():  # the first batches of the seed's order, as the callback reads
                calibration.append(tokens)
                if len(calibration) == CALIBRATION_BATCHES:
                    break
        result = one_shot_prune(
            module,
            method,
            sparsity,
            pattern=pattern,
            calibration=calibration or None,
            forward=lambda m, b: m.loss(b),
        )
        masks = dict(result.masks)
    elif row in RECOVERED:
        method = row.split(" + ")[0]
        pruning = OneShotPruning(method, sparsity, pattern, calibration_batches=CALIBRATION_BATCHES, verbose=False)
        callbacks.append(pruning)
        if row.endswith("kd"):
            callbacks.append(Distillation(temperature=TEMPERATURE, alpha=ALPHA, teacher_step=0, save_teacher=False))
    elif row not in DENSE:
        end = max(1, round(PRUNE_FRACTION * steps))
        every = max(1, round(0.01 * steps))
        options: dict[str, Any] = (
            {"pattern": "2:4", "criterion": "magnitude"} if pattern == "2:4" else {"sparsity": sparsity}
        )
        pruning = GradualPruning(start_step=0, end_step=end, update_every=every, verbose=False, **options)
        callbacks.append(pruning)
        if row.endswith("kd"):
            callbacks.append(Distillation(temperature=TEMPERATURE, alpha=ALPHA, teacher_step=0, save_teacher=False))
        if "int8" in row:
            callbacks.append(QuantizationAwareTraining(bits=8, start_step=end))
    trainer = _trainer(train_steps, callbacks)
    if train_steps:
        trainer.fit(module, datamodule=data)
        masks = dict(pruning.store.masks) if pruning is not None else {}
    evaluator = _trainer(0, [])
    val = evaluator.validate(module, datamodule=data, verbose=False)[0]["val/bpc"]
    test = evaluator.test(module, datamodule=data, verbose=False)[0]["test/bpc"]
    targets = select_parameters(module)
    zeros = sum(int((p.detach() == 0).sum()) for p in targets.values())
    exact = all(bool((targets[name].detach()[~mask] == 0).all()) for name, mask in masks.items())
    with tempfile.TemporaryDirectory() as tmp:
        sizes = _sizes(net, Path(tmp))
    export_exact = ""
    if "int8" in row:
        loaded = dequantize_state_dict(quantize_state_dict(net, "int8"))
        export_exact = all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    return {
        "row": row,
        "target": target,
        "seed": seed,
        "model": model,
        "batch": batch,
        "steps": train_steps,
        "val_bpc": round(float(val), 4),
        "test_bpc": round(float(test), 4),
        "sparsity": round(zeros / sum(p.numel() for p in targets.values()), 4),
        "zeros_exact": exact,
        **sizes,
        "export_exact": export_exact,
        "seconds": round(time.perf_counter() - start, 1),
        "lr": lr,
    }


# --------------------------------------------------------------------------------------------- teacher's cost
def teacher_cost(checkpoint: str, model: str, batch: int, repeats: int) -> dict[str, float]:
    """Median ms of a training step without distillation, with an fp32 teacher and with a bf16 teacher,
    interleaved in this process (1 thread), and the teacher's bytes; the student is pruned to 80% first."""
    import torch
    import torch.nn.functional as F

    from pat_callbacks.recovery import Distiller

    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = load_pretrained(checkpoint, model)
    fp32 = Distiller.from_model(student, temperature=TEMPERATURE, alpha=ALPHA)
    bf16 = Distiller.from_model(student, dtype=torch.bfloat16, temperature=TEMPERATURE, alpha=ALPHA)
    _masks_from(student, 0.8, "unstructured")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    context = parse_model(model)["context"]
    tokens = torch.randint(0, 96, (batch, context + 1))

    def step(distiller: Any) -> float:
        begin = time.perf_counter()
        if distiller is None:
            logits = student(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 96), tokens[:, 1:].reshape(-1))
        else:
            with distiller.watch(student) as call:
                logits = student(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 96), tokens[:, 1:].reshape(-1)) + distiller.loss(call)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return (time.perf_counter() - begin) * 1000

    times: dict[str, list[float]] = {"plain": [], "fp32": [], "bf16": []}
    for i in range(repeats + 2):
        for name, distiller in (("plain", None), ("fp32", fp32), ("bf16", bf16)):
            elapsed = step(distiller)
            if i >= 2:  # two warm-up rounds
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    student_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in student.parameters()}.values())
    return {
        "student_bytes": student_bytes,
        "teacher_bytes_fp32": fp32.teacher_bytes(),
        "teacher_bytes_bf16": bf16.teacher_bytes(),
        "step_ms_plain": round(medians["plain"], 2),
        "step_ms_kd_fp32": round(medians["fp32"], 2),
        "step_ms_kd_bf16": round(medians["bf16"], 2),
        "ratio_fp32": round(medians["fp32"] / medians["plain"], 3),
        "ratio_bf16": round(medians["bf16"] / medians["plain"], 3),
        "repeats": repeats,
    }


# ------------------------------------------------------------------------------------------------------ report
def plan(targets: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """``(row, target, seed)`` of every run: the dense reference once per seed, 2:4 + int8 once per seed.

    Example:
        >>> sorted(plan(["0.5", "2:4"], 1))[:3]
        [('dense (pretrained)', '-', 0), ('dense (same budget)', '-', 0), ('one-shot magnitude', '0.5', 0)]
    """
    jobs = []
    for seed in range(seeds):
        jobs += [(row, "-", seed) for row in DENSE]
        for target in targets:
            jobs += [(row, target, seed) for row in (*ONE_SHOT, *RECOVERED, "pat", "pat + kd")]
        if "2:4" in targets:
            jobs.append(("pat 2:4 + int8 + kd", "2:4", seed))
    return jobs


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_report(rows: list[dict[str, Any]], cost: dict[str, float], out: Path, header: list[str]) -> str:
    """recovery.md: bits/char per row and target, the targets of issue 23, the teacher's cost, export sizes."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["row"], str(r["target"])), []).append(r)
    # The reference of the gaps: the dense model trained the same steps from the same start (else the start).
    reference = "dense (same budget)" if ("dense (same budget)", "-") in by else "dense (pretrained)"
    dense_values = [float(r["val_bpc"]) for r in by.get((reference, "-"), [])]
    dense = statistics.mean(dense_values) if dense_values else math.nan
    targets = [t for t in TARGETS if any(k[1] == t for k in by)]
    lines = [
        *header,
        "",
        f"Validation bits/char, mean ± std over seeds (n in the CSV), gap to `{reference}` in parentheses",
        "(the dense model trained the same steps from the same start, with the same learning-rate schedule); reached",
        "sparsity (counted on the final weights) in brackets where it differs from the target by > 0.005.",
        "",
        "| row | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name in DENSE:
        values = [float(r["val_bpc"]) for r in by.get((name, "-"), [])]
        if values:
            lines.append(f"| {name} | {_mean_std(values)} (all targets) |" + " |" * (len(targets) - 1))
    for name in ROWS[2:]:
        cells = []
        for target in targets:
            group = by.get((name, target))
            if not group:
                cells.append("")
                continue
            values = [float(r["val_bpc"]) for r in group]
            gap = 100 * (statistics.mean(values) / dense - 1)
            reached = statistics.mean(float(r["sparsity"]) for r in group)
            goal = 0.5 if target == "2:4" else float(target)
            note = f" [{reached:.3f}]" if abs(reached - goal) > 0.005 else ""
            cells.append(f"{_mean_std(values)} ({gap:+.1f}%){note}")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Targets (issue 23; gaps relative to `{reference}`'s validation bits/char):", ""]
    distilled = ["pat + kd", *(row for row in RECOVERED if row.endswith("kd"))]
    for name in distilled:
        for target, limit in (("0.5", 1.0), ("2:4", 3.0), ("0.8", 6.0)):
            group = by.get((name, target))
            if group:
                gap = 100 * (statistics.mean(float(r["val_bpc"]) for r in group) / dense - 1)
                verdict = "met" if gap <= limit else f"missed by {gap - limit:.1f} points"
                lines.append(f"- {name} at {target} within +{limit:g}%: {gap:+.1f}%: {verdict}")
    for name in distilled:
        kd, plain = by.get((name, "0.8")), by.get((name.removesuffix(" + kd"), "0.8"))
        if kd and plain:
            kd_v, plain_v = [float(r["val_bpc"]) for r in kd], [float(r["val_bpc"]) for r in plain]
            lead = statistics.mean(plain_v) - statistics.mean(kd_v)
            spread = max(max(kd_v) - min(kd_v), max(plain_v) - min(plain_v))
            verdict = "met" if lead > spread else "missed"
            lines.append(
                f"- {name} better than {name.removesuffix(' + kd')} at 0.8 by more than the seed spread: leads by "
                f"{lead:+.4f} bits/char, spread (largest max - min of the two) {spread:.4f}: {verdict}"
            )
    beaten, missed = [], []
    for (name, target), group in sorted(by.items()):
        if name in RECOVERED:
            start_row = "one-shot " + name.split(" + ")[0]
        elif name in GRADUAL:
            start_row = "one-shot magnitude"
        else:
            continue
        start = by.get((start_row, target))
        if start:
            ok = statistics.mean(float(r["val_bpc"]) for r in group) < statistics.mean(
                float(r["val_bpc"]) for r in start
            )
            beaten.append(ok)
            if not ok:
                missed.append(f"{name} at {target}")
    if beaten:
        lines.append(
            "- every recovered row beats its one-shot start (`<method> + recovery*`: `one-shot <method>`; gradual "
            f"`pat*` rows: `one-shot magnitude`): {sum(beaten)}/{len(beaten)} row cells"
            + (f" (not: {', '.join(missed)})" if missed else "")
        )
    exact = [str(r["zeros_exact"]) == "True" for r in rows if r["row"] not in DENSE]
    lines.append(f"- exact zeros at every masked weight of the final models: {sum(exact)}/{len(exact)} runs")
    qat = [r for r in rows if r["row"] == "pat 2:4 + int8 + kd"]
    if qat:
        loaded = sum(str(r["export_exact"]) == "True" for r in qat)
        lines.append(f"- 2:4 + int8 exports load back bit for bit: {loaded}/{len(qat)}")
    if cost:
        lines += [
            "",
            "## Teacher's cost (one process, 1 thread, interleaved)",
            "",
            f"Median of {cost['repeats']} training steps (forward, backward, AdamW) of the 80%-pruned student at "
            "the benchmark's batch and context.",
            "",
            "| | step ms | ratio to no KD | teacher bytes |",
            "|---|---|---|---|",
            f"| no distillation | {cost['step_ms_plain']} | 1.000 | 0 (student: {cost['student_bytes']}) |",
            f"| KD, fp32 teacher | {cost['step_ms_kd_fp32']} | {cost['ratio_fp32']} | {cost['teacher_bytes_fp32']} |",
            f"| KD, bf16 teacher | {cost['step_ms_kd_bf16']} | {cost['ratio_bf16']} | {cost['teacher_bytes_bf16']} |",
        ]
    seed0 = {(r["row"], str(r["target"])): r for r in rows if int(r["seed"]) == 0}
    picks = [
        k for k in (("dense (pretrained)", "-"), ("pat + kd", "0.8"), ("pat 2:4 + int8 + kd", "2:4")) if k in seed0
    ]
    if picks:
        lines += [
            "",
            "## Export sizes (bytes on disk, seed 0's final model; whole state_dict, embeddings and norms included)",
            "",
            "| model | dense fp32 | sparse only | int8 only | sparse + int8 | sparse + int4 (g32) |",
            "|---|---|---|---|---|---|",
        ]
        for key in picks:
            r = seed0[key]
            sizes = [
                int(r[f])
                for f in ("bytes_dense", "bytes_sparse", "bytes_int8", "bytes_sparse_int8", "bytes_sparse_int4")
            ]
            cells = [f"{sizes[0]}"] + [f"{s} ({s / sizes[0]:.2f}x)" for s in sizes[1:]]
            lines.append(f"| {key[0]} {key[1] if key[1] != '-' else ''} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "recovery.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="pretrained CharGPT (default: pretrain one)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), help="sparsities and/or 2:4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=STEPS, help="recovery steps of every row")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--lr", type=float, default=RECOVERY_LR, help="peak learning rate of every row")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps of the teacher-cost measurement")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the rows already in the CSV (no new run)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 12 steps, 1 seed, 0.5 and 2:4")
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench/results (--smoke: outputs/bench_recovery)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.steps, args.pretrain_steps = "d16-l1-h2-c16", 8, 12, 20
        args.seeds, args.targets, args.repeats, args.workers = 1, ["0.5", "2:4"], 3, 1
    out = args.out or (ROOT / "outputs" / "bench_recovery" if args.smoke else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    if args.checkpoint is not None:
        checkpoint, source = str(args.checkpoint), f"given: {args.checkpoint}"
        named = checkpoint_model(checkpoint)
        if named is not None and named != args.model:
            print(f"the checkpoint holds a CharGPT {named}: --model {named}", flush=True)
            args.model = named
    else:
        checkpoint = str(pretrain(args.model, args.batch, args.pretrain_steps, out))
        source = f"pretrained here: {args.pretrain_steps} steps, seed 0, lr {LR} ({Path(checkpoint).name})"
    jobs = plan(args.targets, args.seeds)
    csv_path = out / "recovery.csv"
    rows: list[dict[str, Any]] = []
    if csv_path.exists():  # rows of an interrupted run with the same budget and starting point are reused
        with open(csv_path) as handle:
            reader = csv.DictReader(handle)
            old = list(reader) if reader.fieldnames == FIELDS else []
        for r in old:
            job_key = (r["row"], r["target"], int(r["seed"]))
            if job_key in set(jobs) and job_key not in {(x["row"], x["target"], int(x["seed"])) for x in rows}:
                same = (r["checkpoint"], r["model"], int(r["batch"])) == (Path(checkpoint).name, args.model, args.batch)
                if same and int(r["steps"]) in (0, args.steps) and float(r["lr"]) == args.lr:
                    rows.append(r)
    done = {(r["row"], r["target"], int(r["seed"])) for r in rows}
    jobs_left = [] if args.report_only else [j for j in jobs if j not in done]
    if args.report_only:
        jobs = [j for j in jobs if j in done]
    print(f"{len(jobs_left)} runs from {checkpoint} ({len(rows)} reused from {csv_path})", flush=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)

        def record(row: dict[str, Any]) -> None:
            row = {**row, "checkpoint": Path(checkpoint).name, "end_time": round(time.time(), 1)}
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            print(
                f"[{(time.perf_counter() - wall) / 60:5.1f} min] {row['row']:22s} {row['target']:>4} "
                f"seed={row['seed']} "
                f"val_bpc={float(row['val_bpc']):.4f} sparsity={float(row['sparsity']):.4f} exact={row['zeros_exact']} "
                f"({row['seconds']} s)",
                flush=True,
            )

        arguments = [(r, t, s, args.steps, args.model, args.batch, checkpoint, args.lr) for r, t, s in jobs_left]
        if args.workers <= 1:
            for a in arguments:
                record(job(*a))
        else:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                for future in as_completed([pool.submit(job, *a) for a in arguments]):
                    record(future.result())
    cost = teacher_cost(checkpoint, args.model, args.batch, args.repeats)
    minutes = (time.perf_counter() - wall) / 60
    run_minutes = sum(float(r["seconds"]) for r in rows) / 60
    command = "python bench/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:])
    spec = parse_model(args.model)
    header = [
        "# Recovery after pruning: distillation, 2:4 + int8 (CharGPT on Shakespeare)",
        "",
        f"Command: `{command.strip()}` ({len(jobs)} runs: {len(jobs_left)} in this invocation, {minutes:.1f} min wall "
        f"with pretraining (if not cached) and the teacher-cost measurement; {len(jobs) - len(jobs_left)} reused from "
        f"recovery.csv; {run_minutes:.1f} min of run time summed over the rows; {args.workers} parallel process(es) "
        "of 1 thread, on 2 cores shared with other jobs).",
        "",
        f"Model: CharGPT d={spec['dim']}, {spec['layers']} layers, {spec['heads']} heads, context {spec['context']}, "
        f"batch {args.batch}. Starting point: {source}. Every row trains {args.steps} steps from it "
        f"(AdamW lr {args.lr}, warm-up {max(1, args.steps // 20)} steps, cosine to 10%): GradualPruning from "
        f"step 0 to {round(PRUNE_FRACTION * args.steps)} (taylor + global; 2:4 by magnitude), then recovery; "
        f"distillation T={TEMPERATURE}, alpha={ALPHA} from the dense starting point; int8 QAT from the end of the "
        "pruning window. Seeds change the data order (and the sampling of the pruning scores), not the start.",
    ]
    print(write_report(rows, cost, out, header))
    print(f"wrote {csv_path}, {out / 'recovery.md'} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
