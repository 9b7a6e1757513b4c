"""Training runs shared by the resume tests and the fresh process that resumes them.

``python -m tests.resume_worker OUT_DIR NAME=CKPT [NAME=CKPT ...]`` resumes each named run from its checkpoint in a
new process and saves the final weights and masks to ``OUT_DIR/NAME.pt``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pat_callbacks import DynamicSparseTraining, GradualPruning
from pat_callbacks.app.data import DigitsDataModule
from pat_callbacks.callbacks.base import PruningCallback
from tests.conftest import make_module, make_trainer

MAX_STEPS = 69  # three epochs of digits at batch 64

RUNS: dict[str, Callable[[], PruningCallback]] = {
    "cubic": lambda: GradualPruning(final_sparsity=0.8, start_step=5, end_step=60, update_every=10),
    "odd_even_recover": lambda: GradualPruning(
        final_sparsity=0.8, schedule="odd_even", start_step=5, end_step=60, phase_steps=10
    ),
    "taylor_global": lambda: GradualPruning(
        final_sparsity=0.8, start_step=5, end_step=60, update_every=10, criterion="taylor", allocation="global"
    ),
    "taylor_window": lambda: GradualPruning(
        final_sparsity=0.8,
        start_step=5,
        end_step=60,
        update_every=10,
        criterion="taylor",
        accumulate_window=4,
        history_dtype="bfloat16",
    ),
    "rigl": lambda: DynamicSparseTraining(sparsity=0.8, regrowth="rigl", update_every=10, end_step=60),
    "set": lambda: DynamicSparseTraining(sparsity=0.8, regrowth="set", update_every=10, end_step=60, seed=3),
}
# Where each run is interrupted: step 23 lies in an odd/even recover phase (15..24), between DST updates, and for
# Taylor mid-accumulation (updates at 15 and 25: the checkpoint holds the history of steps 16..22, so a resume that
# lost it would choose other masks at step 25), and inside a 4-step window (steps 22..25: it holds step 22's).
RESUME_STEP = {"cubic": 46, "odd_even_recover": 23, "taylor_global": 23, "taylor_window": 23, "rigl": 23, "set": 46}


def run(name: str, root: Path, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    """Train run ``name`` to MAX_STEPS (from ``ckpt_path`` if given); return final weights and masks."""
    pruning = RUNS[name]()
    callbacks: list[Callback] = [pruning]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=root / name, every_n_epochs=1, save_top_k=-1, filename="{step}"))
    trainer = make_trainer(root, callbacks, max_steps=MAX_STEPS, enable_checkpointing=ckpt_path is None)
    module = make_module(seed=11 if ckpt_path is None else 99)  # a resumed run must take everything from the ckpt
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    state = {f"weight/{k}": v.detach().clone() for k, v in module.state_dict().items()}
    state.update({f"mask/{k}": v.clone() for k, v in pruning.store.masks.items()})
    return state


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    for item in argv[1:]:
        name, ckpt = item.split("=", 1)
        torch.save(run(name, out / "resumed", Path(ckpt)), out / f"{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
