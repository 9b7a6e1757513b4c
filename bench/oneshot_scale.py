"""How one-shot calibration scales with depth: whole-model passes per block (before) vs block by block (after).

A Llama-shaped model from a small ``transformers`` config (``LlamaForCausalLM``: hidden ``--hidden``, MLP 2x,
4 heads, vocabulary 256) at depths 2..32, pruned to 50% by Wanda and SparseGPT (``sequential=True``) from the same
calibration batches, once with ``pipeline="whole"`` (today's path: the whole model runs for every block) and once
with ``pipeline="blocks"`` (the model runs once to its first block, then each block twice per batch). Every
(depth, method, pipeline) runs in a fresh process, so its memory peak is its own. Per row:

- ``ms_per_block``: wall time of ``one_shot_prune`` divided by the depth;
- ``peak_mb``: peak resident memory during the call minus before it (sampled every millisecond), or the peak
  allocated CUDA memory with ``--device cuda``;
- ``masks``: a hash of the masks, and ``weights``: of the pruned weights (bitwise), so the two pipelines can be
  compared (the same calibration, the same order).

    python bench/oneshot_scale.py                                  # depths 2 4 8 16 32, hidden 128
    python bench/oneshot_scale.py --depths 2 8 --hidden 256 --out /tmp/os
    python bench/oneshot_scale.py --smoke                          # seconds: depth 2, both pipelines

Writes ``bench/results/oneshot_scale.{csv,md}`` (or ``--out DIR``); the markdown also extrapolates the per-block
time and memory to Llama-7B and -70B blocks (see :func:`extrapolate`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("wanda", "sparsegpt")
PIPELINES = ("whole", "blocks")
FIELDS = ("hidden", "depth", "method", "pipeline", "device", "seconds", "ms_per_block", "peak_mb", "masks", "weights")
VOCAB = 256

sys.path.insert(0, str(ROOT))  # this checkout's pat_callbacks and bench, whatever is installed
from bench.scale import PeakRSS  # noqa: E402  (the same sampler as bench/scale.py)


def build(depth: int, hidden: int) -> Any:
    """A random Llama of ``depth`` blocks (seeded: every process builds the same weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=depth,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def _digest(tensors: dict[str, Any]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:12]


def measure(
    depth: int,
    hidden: int,
    method: str,
    pipeline: str,
    *,
    tokens: int = 64,
    batches: int = 4,
    batch_size: int = 2,
    device: str = "cpu",
    threads: int = 1,
    repeats: int = 1,
) -> dict[str, Any]:
    """One row: ``one_shot_prune`` of a fresh model (lm_head left dense, as the reference loops do); the time is
    the fastest of ``repeats`` runs (each on a fresh model), the memory peak the first run's."""
    rows = [_measure_once(depth, hidden, method, pipeline, tokens, batches, batch_size, device, threads)]
    for _ in range(repeats - 1):
        again = _measure_once(depth, hidden, method, pipeline, tokens, batches, batch_size, device, threads)
        if (again["masks"], again["weights"]) != (rows[0]["masks"], rows[0]["weights"]):
            raise RuntimeError(f"a repeat of {rows[0]} gave other masks or weights")
        rows.append(again)
    fastest = min(rows, key=lambda row: row["seconds"])
    return rows[0] | {"seconds": fastest["seconds"], "ms_per_block": fastest["ms_per_block"]}


def _measure_once(
    depth: int,
    hidden: int,
    method: str,
    pipeline: str,
    tokens: int,
    batches: int,
    batch_size: int,
    device: str,
    threads: int,
) -> dict[str, Any]:
    import torch

    from pat_callbacks.oneshot import one_shot_prune

    torch.set_num_threads(threads)
    model = build(depth, hidden).to(device)
    generator = torch.Generator().manual_seed(1)
    calibration = [
        {"input_ids": torch.randint(0, VOCAB, (batch_size, tokens), generator=generator).to(device)}
        for _ in range(batches)
    ]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as peak:
        start = time.perf_counter()
        result = one_shot_prune(
            model, method, 0.5, calibration=calibration, pipeline=pipeline, exclude=["lm_head.weight"]
        )
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated() - before) if cuda else (peak.peak - peak.before)
    if result.pipeline != pipeline:
        raise RuntimeError(f"asked for pipeline={pipeline!r}, but one_shot_prune ran {result.pipeline!r}")
    return {
        "hidden": hidden,
        "depth": depth,
        "method": method,
        "pipeline": pipeline,
        "device": device,
        "seconds": round(seconds, 3),
        "ms_per_block": round(1000 * seconds / depth, 2),
        "peak_mb": round(extra / 2**20, 1),
        "masks": _digest(result.masks),
        "weights": _digest(dict(result.pruner.params)),
        "tokens": batches * batch_size * tokens,
    }


def _run_isolated(args: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- extrapolation
def _block_shapes(hidden: int, mlp: int, kv: int) -> list[tuple[int, int]]:
    """(out, in) of a Llama block's seven Linears (q, k, v, o, gate, up, down)."""
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp)]


def block_costs(hidden: int, mlp: int, kv: int, tokens: int) -> dict[str, float]:
    """Per block: ``forward`` FLOPs (the Linears, ``tokens`` rows), ``sparsegpt`` FLOPs beyond the forwards (the
    Hessians ``X^T X`` and the OBS sweep ~ in^3 + out * in^2 per layer), parameter and fp32-Hessian bytes."""
    shapes = _block_shapes(hidden, mlp, kv)
    params = sum(o * i for o, i in shapes)
    return {
        "forward": 2.0 * tokens * params,
        "sparsegpt": sum(2.0 * tokens * i * i + i**3 + 2.0 * o * i * i for o, i in shapes),
        "params": float(params),
        "hessian_bytes": 4.0 * sum(i * i for _, i in shapes),
    }


MODELS = {"Llama-7B": (4096, 11008, 4096, 32), "Llama-70B": (8192, 28672, 1024, 80)}


def extrapolate(rows: list[dict[str, Any]], calibration_tokens: int = 128 * 2048) -> list[dict[str, Any]]:
    """Per-block time and memory of a 7B / 70B Llama from the measured blocks rows of the widest hidden size: the
    measured FLOP rate of each method (two block forwards per batch, plus SparseGPT's Hessians and sweep) applied to
    the big block's FLOPs at ``calibration_tokens`` (the papers' 128 x 2048); memory = one block's fp16 weights, its
    fp32 statistics (Hessians for SparseGPT) and the fp16 block inputs and outputs of every calibration token.
    Estimates on the measuring device, not measurements."""
    blocks = [r for r in rows if r["pipeline"] == "blocks"]
    if not blocks:
        return []
    hidden = max(int(r["hidden"]) for r in blocks)
    deepest = max(int(r["depth"]) for r in blocks if int(r["hidden"]) == hidden)
    out = []
    for row in (r for r in blocks if int(r["hidden"]) == hidden and int(r["depth"]) == deepest):
        measured_tokens = int(row.get("tokens", 512))
        small = block_costs(hidden, 2 * hidden, hidden, measured_tokens)
        work = 2 * small["forward"] + (small["sparsegpt"] if row["method"] == "sparsegpt" else 0.0)
        rate = work / (float(row["ms_per_block"]) / 1000)
        for name, (h, mlp, kv, depth) in MODELS.items():
            big = block_costs(h, mlp, kv, calibration_tokens)
            flops = 2 * big["forward"] + (big["sparsegpt"] if row["method"] == "sparsegpt" else 0.0)
            stats = big["hessian_bytes"] if row["method"] == "sparsegpt" else 8.0 * (3 * h + mlp)
            memory = 2 * big["params"] + stats + 2 * 2.0 * calibration_tokens * h
            seconds = flops / rate
            out.append(
                {
                    "model": name,
                    "method": row["method"],
                    "device": row["device"],
                    "gflops": round(rate / 1e9, 1),
                    "s_per_block": round(seconds, 1),
                    "hours_all_blocks": round(seconds * depth / 3600, 2),
                    "peak_gib": round(memory / 2**30, 2),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------------- output
def write(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "oneshot_scale.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*FIELDS, "tokens"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "oneshot_scale.md").write_text(markdown(rows, command))


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    key = {(r["hidden"], r["depth"], r["method"], r["pipeline"]): r for r in rows}
    lines = [
        "# One-shot calibration at depth (`bench/oneshot_scale.py`)",
        "",
        f"Command: `{command}`",
        "",
        "Llama-shaped `LlamaForCausalLM` from a small random config (MLP 2x hidden, 4 heads, vocabulary 256), "
        "Wanda and SparseGPT to 50% (`sequential=True`, lm_head dense), each (depth, method, pipeline) in a fresh "
        "process. `whole`: the whole model runs for every block (before); `blocks`: block by block from cached "
        "inputs (after). Peak: resident memory during the call minus before (CPU) or peak allocated (CUDA). "
        "`same`: the masks and the weights hash bitwise equal between the two pipelines. The peak includes the "
        "masks the returned Pruner keeps (1 byte per target weight, growing with depth in both pipelines); the "
        "cached block inputs are 512 tokens x hidden floats. Timings from a machine shared with other jobs (2 "
        "cores; the fastest of 3 runs per row): read the ratios.",
        "",
        "| hidden | depth | method | ms/block whole | ms/block blocks | speed-up | peak MiB whole | peak MiB blocks "
        "| same masks / weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    flat = []
    for hidden, depth, method in sorted({(r["hidden"], r["depth"], r["method"]) for r in rows}):
        w, b = key.get((hidden, depth, method, "whole")), key.get((hidden, depth, method, "blocks"))
        if w is None or b is None:
            continue
        same = f"{'yes' if w['masks'] == b['masks'] else 'NO'} / {'yes' if w['weights'] == b['weights'] else 'NO'}"
        speed = float(w["ms_per_block"]) / float(b["ms_per_block"])
        lines.append(
            f"| {hidden} | {depth} | {method} | {w['ms_per_block']} | {b['ms_per_block']} | {speed:.1f}x | "
            f"{w['peak_mb']} | {b['peak_mb']} | {same} |"
        )
    for hidden, method in sorted({(r["hidden"], r["method"]) for r in rows}):
        series = sorted(
            (int(r["depth"]), r)
            for r in rows
            if (r["hidden"], r["method"], r["pipeline"]) == (hidden, method, "blocks")
        )
        whole = sorted(
            (int(r["depth"]), r) for r in rows if (r["hidden"], r["method"], r["pipeline"]) == (hidden, method, "whole")
        )
        if len(series) > 1:
            (d0, r0), (d1, r1) = series[0], series[-1]
            ratio = float(r1["ms_per_block"]) / float(r0["ms_per_block"])
            whole_ratio = (
                float(whole[-1][1]["ms_per_block"]) / float(whole[0][1]["ms_per_block"]) if len(whole) > 1 else None
            )
            flat.append(
                f"- hidden {hidden}, {method}: time per block at depth {d1} / depth {d0}: **{ratio:.2f}x** blocks"
                + (f" (whole-model passes: {whole_ratio:.2f}x)" if whole_ratio is not None else "")
                + f"; peak {r0['peak_mb']} -> {r1['peak_mb']} MiB (blocks)"
            )
    if flat:
        lines += ["", "## Flat in depth? (target: within 1.3x from the shallowest to the deepest)", "", *flat]
    estimates = extrapolate(rows)
    if estimates:
        lines += [
            "",
            "## What a 7B and a 70B Llama need, block by block (estimates from the rows above)",
            "",
            "The measured FLOP rate of the deepest, widest `blocks` row of each method (two block forwards per "
            "calibration token, plus SparseGPT's `X^T X` and OBS sweep), applied to one Llama-7B / -70B block at "
            "128 x 2048 calibration tokens; peak memory: one block's fp16 weights + its fp32 statistics (SparseGPT: "
            "the Hessians, 0.83 GiB for a 7B block) + the fp16 block inputs and outputs of every calibration token. "
            "With `offload=True` that is the device's need; the model itself stays in CPU memory.",
            "",
            "| model | method | device | measured GFLOP/s | s / block | hours, all blocks | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in estimates:
            lines.append(
                f"| {e['model']} | {e['method']} | {e['device']} | {e['gflops']} | {e['s_per_block']} | "
                f"{e['hours_all_blocks']} | {e['peak_gib']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="time: the fastest of this many runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--smoke", action="store_true", help="depth 2, hidden 32, in process (seconds)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    command = "python bench/oneshot_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    if args.smoke:
        for method in args.methods:
            for pipeline in args.pipelines:
                rows.append(measure(2, 32, method, pipeline, tokens=8, batches=2, device=args.device))
    else:
        for hidden in args.hidden:
            for depth in args.depths:
                for method in args.methods:
                    for pipeline in args.pipelines:
                        one = {"depth": depth, "hidden": hidden, "method": method, "pipeline": pipeline}
                        one |= {"tokens": args.tokens, "batches": args.batches, "device": args.device}
                        row = _run_isolated(one | {"threads": args.threads, "repeats": args.repeats})
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    write(rows, args.out, command.strip())


if __name__ == "__main__":
    main()
