"""A seeded ``torch.Generator`` that pickles as plain bytes.

``torch.Generator`` pickles its state as a tensor, which ``multiprocessing`` (``ddp_spawn``, DataLoader workers)
ships through shared memory; plain bytes travel everywhere.

Example:
    >>> import pickle
    >>> rng = SeededGenerator(3)
    >>> first = torch.rand(2, generator=rng.generator)
    >>> copy = pickle.loads(pickle.dumps(rng))
    >>> torch.equal(torch.rand(2, generator=rng.generator), torch.rand(2, generator=copy.generator))
    True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SeededGenerator"]


class SeededGenerator:
    """Holds ``generator`` (a CPU ``torch.Generator`` seeded with ``seed``); checkpoint with ``get_state``.

    Example:
        >>> a, b = SeededGenerator(0), SeededGenerator(0)
        >>> torch.equal(torch.rand(2, generator=a.generator), torch.rand(2, generator=b.generator))
        True"""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "state": bytes(self.generator.get_state().numpy())}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.generator = torch.Generator()
        self.generator.set_state(torch.frombuffer(bytearray(state["state"]), dtype=torch.uint8))
