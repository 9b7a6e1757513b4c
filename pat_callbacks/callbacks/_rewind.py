"""Lottery-ticket rewinding for GradualPruning: a snapshot at ``rewind_step``, restored once after the last update."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from pat_callbacks.core.pruner import Pruner


class Rewinding:
    """When to snapshot and when to rewind (the weights' side is :meth:`Pruner.snapshot` / :meth:`Pruner.rewind`).

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(4, 4)
        >>> pruner, rewinding = Pruner(layer), Rewinding(0)
        >>> rewinding.maybe_snapshot(0, pruner)
        >>> _ = pruner.prune_to(0.5); rewinding.request(); rewinding.after_step(10, pruner, [])
        >>> rewinding.rewound_at_step
        10
    """

    KEYS: ClassVar[tuple[str, ...]] = ("rewind_to", "rewind_pending", "rewound_at_step")

    def __init__(self, step: int) -> None:
        self.step = step
        self.snapshot: dict[str, Tensor] | None = None  # taken at `step`, freed once used
        self.pending = False  # the last update was made: rewind after this optimizer step
        self.rewound_at_step: int | None = None

    def maybe_snapshot(self, global_step: int, pruner: Pruner) -> None:
        if self.snapshot is None and self.rewound_at_step is None and global_step == self.step:
            self.snapshot = pruner.snapshot()

    def request(self) -> None:
        if self.rewound_at_step is None:
            self.pending = True

    def after_step(self, global_step: int, pruner: Pruner, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Rewind if requested (surviving weights to the snapshot, optimizer state zeroed), then maybe snapshot."""
        if self.pending:
            self.pending = False
            if self.snapshot is None:
                rank_zero_warn(f"GradualPruning: no snapshot at rewind_step={self.step} (resumed past it?)")
            else:
                pruner.rewind(self.snapshot, optimizers)
                self.rewound_at_step = global_step
                self.snapshot = None
        self.maybe_snapshot(global_step, pruner)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rewind_pending": self.pending, "rewound_at_step": self.rewound_at_step}
        if self.snapshot is not None:
            state["rewind_to"] = {name: value.cpu() for name, value in self.snapshot.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        snapshot = state.get("rewind_to")
        self.snapshot = None if snapshot is None else {name: value.clone() for name, value in snapshot.items()}
        self.pending = bool(state.get("rewind_pending", False))
        self.rewound_at_step = state.get("rewound_at_step")
