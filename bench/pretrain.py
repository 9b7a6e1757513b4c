"""Pretrain a small CharGPT on Shakespeare's plays once, and cache it: the dense start of ``bench/pretrained.py``.

A plain PyTorch loop (no pruning, nothing to wire): AdamW with linear warm-up and cosine decay over ``--max-steps``,
validation bits/char every ``--eval-every`` steps on the datamodule's validation plays, and a stop as soon as it has
not improved by ``--min-delta`` for ``--patience`` evaluations in a row (or when ``--max-minutes`` run out;
``--patience 0`` runs the whole schedule and records what its last 3 evaluations gained: at a high learning rate
the noise of 200-step evaluations can look like a plateau, as it did at step 4,600 of a 12,000-step run). The best
validation checkpoint is kept: ``bench/results/pretrained/chargpt.pt`` holds the network's ``state_dict``, its
constructor arguments, the validation curve and how training stopped.

    python bench/pretrain.py            # d=128, 2 layers, context 64, 12,000 steps: about 16 min on one idle core
    python bench/pretrain.py --smoke    # a tiny model for a few steps (tests/bench), to --out

``load_pretrained(path)`` rebuilds the network from the file.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pat_callbacks.app.models import CharGPT  # noqa: E402  (after the path insert, for `python bench/...`)

DEFAULT_PATH = ROOT / "bench" / "results" / "pretrained" / "chargpt.pt"
MODEL = {"vocab_size": 96, "context": 64, "dim": 128, "layers": 2, "heads": 4, "dropout": 0.0}
SMOKE_MODEL = {"vocab_size": 96, "context": 16, "dim": 16, "layers": 1, "heads": 2, "dropout": 0.0}


def bits_per_char(net: nn.Module, windows: Tensor, batch_size: int = 256) -> float:
    """Mean next-character cross-entropy of ``net`` over token ``windows`` (``[n, context + 1]``), in bits."""
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            logits = net(batch[:, :-1])
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            )
            count += batch[:, 1:].numel()
    net.train(was_training)
    return total / count / math.log(2)


def shakespeare_windows(context: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Train / validation / test windows of ``context + 1`` characters, split by play (ShakespeareDataModule)."""
    from pat_callbacks.app.data import ShakespeareDataModule

    dm = ShakespeareDataModule(context=context, seed=seed, max_eval_windows=512)
    dm.setup("fit")
    if dm.train_windows is None or dm.val_windows is None or dm.test_windows is None:
        raise RuntimeError("ShakespeareDataModule.setup() left a split empty")
    return dm.train_windows, dm.val_windows, dm.test_windows


def load_pretrained(path: str | Path = DEFAULT_PATH) -> tuple[CharGPT, dict[str, Any]]:
    """The cached network (eval mode) and the file's record (config, curve, dense bits/char)."""
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # the record's torch version
        record = torch.load(Path(path), map_location="cpu", weights_only=True)  # plain values and tensors: no code
    net = CharGPT(**record["model"])
    net.load_state_dict(record["state_dict"])
    return net.eval(), record


def library_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "pat_callbacks"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def pretrain(
    model: dict[str, Any],
    train: Tensor,
    val: Tensor,
    *,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int = 100,
    max_steps: int = 3000,
    eval_every: int = 250,
    patience: int = 3,
    min_delta: float = 0.002,
    max_minutes: float = 10.0,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Train a CharGPT until validation bits/char stops improving; return the record of its best evaluation."""
    torch.manual_seed(seed)
    net = CharGPT(**model)
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    others = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    position = 0
    best = {"val_bpc": float("inf"), "step": 0, "state_dict": None}
    curve: list[tuple[int, float]] = []
    stale = 0
    stopped = "max_steps"
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(train), generator=generator), 0
        batch = train[order[position : position + batch_size]]
        position += batch_size
        logits = net(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % eval_every == 0 or step == max_steps:
            bpc = bits_per_char(net, val)
            curve.append((step, bpc))
            elapsed = time.perf_counter() - start
            log(f"step {step}: train loss {float(loss.detach()):.4f} nats, val {bpc:.4f} bits/char ({elapsed:.0f}s)")
            if bpc < best["val_bpc"] - min_delta:
                best = {"val_bpc": bpc, "step": step, "state_dict": {k: v.clone() for k, v in net.state_dict().items()}}
                stale = 0
            else:
                stale += 1
                if bpc < best["val_bpc"]:  # better, but by less than min_delta: keep the better weights
                    best = {
                        "val_bpc": bpc,
                        "step": step,
                        "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
                    }
            if patience and stale >= patience:
                stopped = f"plateau ({patience} evaluations without a {min_delta} bits/char gain)"
                break
            if elapsed > max_minutes * 60:
                stopped = f"time limit ({max_minutes} min)"
                break
    if stopped == "max_steps" and len(curve) > 3:  # how flat the end of the schedule is
        gains = [round(curve[i - 1][1] - curve[i][1], 4) for i in range(len(curve) - 3, len(curve))]
        stopped += f" (the last 3 evaluations gained {gains} bits/char)"
    return {
        "model": dict(model),
        "state_dict": best["state_dict"],
        "val_bpc": best["val_bpc"],
        "best_step": best["step"],
        "steps_run": step,
        "curve": curve,
        "stopped": stopped,
        "seconds": round(time.perf_counter() - start, 1),
        "hparams": {
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "max_steps": max_steps,
            "eval_every": eval_every,
            "patience": patience,
            "min_delta": min_delta,
            "seed": seed,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="checkpoint file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, on synthetic-free real text")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validations (default 200)")
    parser.add_argument(
        "--patience", type=int, default=0, help="evaluations without a --min-delta gain to stop (0: run the schedule)"
    )
    parser.add_argument("--min-delta", type=float, default=0.002, help="bits/char a validation must gain")
    parser.add_argument("--force", action="store_true", help="retrain even if --out exists")
    args = parser.parse_args(argv)
    for name, value, least in (("--patience", args.patience, 0), ("--eval-every", args.eval_every, 1)):
        if value is not None and value < least:
            parser.error(f"{name} must be an integer >= {least}, but got {value}")
    torch.set_num_threads(args.threads)
    if args.out.exists() and not args.force:
        _, record = load_pretrained(args.out)
        print(f"{args.out} exists (dense val {record['val_bpc']:.4f} bits/char); --force retrains")
        return 0
    model = SMOKE_MODEL if args.smoke else MODEL
    train, val, test = shakespeare_windows(model["context"])
    if args.smoke:
        train, val, test = train[:512], val[:64], test[:64]
    max_steps = args.max_steps or (20 if args.smoke else 12000)
    eval_every = args.eval_every or (10 if args.smoke else 200)
    command = "python bench/pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = pretrain(
        model,
        train,
        val,
        max_steps=max_steps,
        eval_every=eval_every,
        patience=args.patience,
        min_delta=args.min_delta,
        max_minutes=args.max_minutes,
    )
    net = CharGPT(**record["model"])
    net.load_state_dict(record["state_dict"])
    record["test_bpc"] = bits_per_char(net, test)
    record["command"] = command.strip()
    record["commit"] = library_commit()
    record["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, args.out)
    print(
        f"best val {record['val_bpc']:.4f} bits/char at step {record['best_step']} of {record['steps_run']} "
        f"({record['stopped']}; {record['seconds']}s); test {record['test_bpc']:.4f}; -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
