"""CPU time of each pruning-callback hook per training step, on the MLP of bench/overhead.py (one thread).

Where a variant's per-step cost goes: the callbacks' Lightning hooks and the pieces of ``on_before_optimizer_step``
(``_check_targets``, ``_accumulating``, the criterion's ``accumulate``, ``_on_step``, ``mask_grads``), each timed
with ``time.thread_time`` (the training thread's CPU time, which other processes of a shared machine inflate less
than wall time). Steps are split into those inside the accumulation window before an update (the 40 steps up to it,
by default) and those outside it; update steps are left out.

    python bench/hook_cost.py                       # magnitude vs the default (taylor + global), 2 rounds x 100 steps
    python bench/hook_cost.py --steps 60 --rounds 1

Prints one line per variant, hook and place (outside / inside the window): the median milliseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pat_callbacks.core.options import ACCUMULATE_WINDOW  # noqa: E402  the steps up to each update that accumulate
from pat_callbacks.core.scoring import in_window  # noqa: E402

VARIANTS = (
    "pat GradualPruning (cubic)",
    "pat GradualPruning (cubic, default taylor + global, before: every step, float32)",
    "pat GradualPruning (cubic, default taylor + global)",
)


def place(step: int, update_every: int, window: int = ACCUMULATE_WINDOW) -> str | None:
    """``"outside"`` / ``"inside"`` the window of the next update (at a multiple of ``update_every``), ``None`` for
    an update step.

    Example:
        >>> [place(step, 100) for step in (100, 101, 160, 161, 199)]
        [None, 'outside', 'outside', 'inside', 'inside']
    """
    if step % update_every == 0:
        return None
    next_update = step + update_every - step % update_every
    return "inside" if in_window(step, next_update, window) else "outside"  # the library's own rule


def instrument(times: dict[tuple[str, str, str], list[float]], current: dict[str, Any]) -> None:
    """Wrap the pruning callbacks' hooks and the pieces of a step so each call's CPU time lands in ``times``."""
    from pat_callbacks.callbacks.base import PruningCallback
    from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback
    from pat_callbacks.core.masks import MaskStore
    from pat_callbacks.core.pruner import Pruner

    targets: list[tuple[type, str]] = [
        (PruningCallback, "on_train_batch_start"),
        (PruningCallback, "on_before_optimizer_step"),
        (PruningCallback, "on_train_batch_end"),
        (PruningCallback, "_check_targets"),
        (ScheduledPruningCallback, "_accumulating"),
        (ScheduledPruningCallback, "_on_step"),
        (Pruner, "accumulate"),
        (MaskStore, "mask_grads"),
    ]
    for owner, name in targets:
        original: Callable[..., Any] = getattr(owner, name)

        def wrapped(self: Any, *args: Any, _original: Callable[..., Any] = original, _name: str = name) -> Any:
            start = time.thread_time()
            out = _original(self, *args)
            where = place(current["step"], current["update_every"])
            if where is not None:
                times[(current["variant"], _name, where)].append(time.thread_time() - start)
            return out

        setattr(owner, name, wrapped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per fit (after 5 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=[VARIANTS[0], VARIANTS[2]])
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import torch

    import bench.overhead as overhead

    torch.set_num_threads(1)
    overhead.CLOCK[0] = time.thread_time
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    current: dict[str, Any] = {"variant": "", "step": 0, "update_every": overhead.UPDATE_EVERY}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *rest: Any) -> None:
            current["step"] = trainer.global_step

    original_variants = overhead.variants

    def with_clock() -> dict[str, Callable[[], list[Any]]]:
        return {name: (lambda make=make: [*make(), Clock()]) for name, make in original_variants().items()}

    overhead.variants = with_clock
    instrument(times, current)
    for round_index in range(args.rounds):
        for variant in ["dense", *args.variants]:
            current["variant"] = variant
            timer, _ = overhead.fit("mlp", variant, args.steps, 5, seed=round_index)
            print(f"round {round_index} {variant}: step {statistics.median(timer.times) * 1e3:.2f} ms", flush=True)
    for (variant, hook, where), values in sorted(times.items()):
        print(f"{variant} | {hook} | {where} | {statistics.median(values) * 1e3:.3f} ms (n={len(values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
