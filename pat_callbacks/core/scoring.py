"""A criterion bound to named parameters: its per-parameter history, whole-layer scores and streamed scores.

:class:`Scorer` is the pruner's "which entries matter" piece: it feeds a
:class:`~pat_callbacks.core.criteria.Criterion` the local weights and gradients (this rank's rows when sharded),
keeps the history criteria such as Taylor or movement accumulate, and offers a layer's scores either whole or as a
:class:`~pat_callbacks.core.selection.ScoredLayer` scored slice by slice (elementwise criteria), so an update never
holds every layer's scores at once.

**Where history is kept.** Criteria averaged since the last update (``resets_after_update``: Taylor, Fisher) only
need the steps just before an update: given the step and the next update step, :meth:`Scorer.accumulate` adds to the
history only over the last ``window`` steps up to and including the update step (:func:`in_window`), so the other
steps cost nothing, and their history is kept in ``history_dtype`` (``PruningOptions`` default: bfloat16, half the
bytes of float32; 99.9% of the mask entries it chooses equal a float32 history's, ``bench/history_precision.py``).
Without a step (a plain loop that calls ``accumulate()`` every step) every call accumulates, as before. Criteria whose
history spans the whole run (movement) accumulate at every call, in float32.

Example:
    >>> import torch
    >>> from pat_callbacks.core.criteria import get_criterion
    >>> weight = torch.nn.Parameter(torch.tensor([[1.0, -3.0], [0.5, 2.0]]))
    >>> scorer = Scorer(get_criterion("magnitude"), {"w": weight})
    >>> scorer.score("w").tolist(), scorer.scored_layer("w").chunk(1, 3).tolist()
    ([[1.0, 3.0], [0.5, 2.0]], [3.0, 0.5])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core._validation import check_int
from pat_callbacks.core.criteria import Criterion
from pat_callbacks.core.selection import ScoredLayer
from pat_callbacks.core.sharding import gather_full, local, local_rows

__all__ = ["HISTORY_DTYPES", "Scorer", "in_window"]

HISTORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BFLOAT16_MAX_TERMS = 256
"""The longest window kept in bfloat16: a bfloat16 sum of equal terms stops growing after 2**8 of them."""
"""The dtypes a history averaged since the last update may be kept in, by name."""


def in_window(step: int, next_update: int, window: int | None) -> bool:
    """Whether a history of the last ``window`` steps before ``next_update`` takes ``step``: the steps
    ``next_update - window + 1`` to ``next_update`` (an update step accumulates, then scores). ``None``: every step.

    Example:
        >>> [step for step in range(95, 105) if in_window(step, 100, 3)]
        [98, 99, 100]
        >>> in_window(5, 100, None)
        True
    """
    return window is None or next_update - window < step <= next_update


class Scorer:
    """Scores of a criterion over named parameters, with the criterion's per-parameter history.

    Args:
        criterion: the importance criterion.
        params: ``{name: parameter}`` scored (local shards when sharded).
        group: the shard group of sharded (FSDP2) parameters: checkpoints hold whole history tensors.
        window: the steps before each update whose gradients a criterion averaged since the last update reads
            (``None``: every step since the last update); applies where :meth:`accumulate` is given the steps.
        history_dtype: ``"bfloat16"`` or ``"float32"``, the dtype of a history averaged since the last update
            (a history over the whole run, such as movement's, stays float32).

    Example:
        >>> import torch
        >>> from pat_callbacks.core.criteria import get_criterion
        >>> weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> weight.grad = torch.tensor([0.5, 0.5])
        >>> scorer = Scorer(get_criterion("taylor"), {"w": weight})
        >>> scorer.accumulate()
        >>> scorer.score("w")
        tensor([0.5000, 1.0000])
    """

    def __init__(
        self,
        criterion: Criterion,
        params: Mapping[str, nn.Parameter],
        group: Any = None,
        window: int | None = None,
        history_dtype: str = "float32",
    ) -> None:
        self.criterion = criterion
        self.params = params
        self.group = group
        self.window = None if window is None else check_int("accumulate_window", window, minimum=1)
        if history_dtype not in HISTORY_DTYPES:
            raise ValueError(f"Unknown `history_dtype` {history_dtype!r}; expected one of: 'bfloat16', 'float32'")
        # a history over the whole run sums thousands of steps: float32 keeps their small terms
        self.dtype = HISTORY_DTYPES[history_dtype] if criterion.resets_after_update else torch.float32
        self.state: dict[str, dict[str, Tensor]] = {}  # per parameter: the criterion's history tensors

    @property
    def name(self) -> str:
        """The criterion's name, for messages and reports."""
        return self.criterion.name or type(self.criterion).__name__

    def accumulates_at(self, step: int, next_update: int | None) -> bool:
        """Whether :meth:`accumulate` at ``step`` adds to the history, the next update being at ``next_update``
        (``None``: none known, every step is taken): always for a history over the whole run, else
        :func:`in_window`; never for a criterion without history.

        Example:
            >>> import torch
            >>> from pat_callbacks.core.criteria import get_criterion
            >>> weight = torch.nn.Parameter(torch.ones(2))
            >>> scorer = Scorer(get_criterion("taylor"), {"w": weight}, window=2)
            >>> [step for step in range(0, 12) if scorer.accumulates_at(step, 10)]
            [9, 10]
        """
        if not self.criterion.needs_history:
            return False
        if next_update is None or not self.criterion.resets_after_update:
            return True
        return in_window(step, next_update, self.window)

    def accumulate(self, step: int | None = None, next_update: int | None = None) -> None:
        """Add this step's weights and dense gradients to the criterion's history, if :meth:`accumulates_at` says
        so (without ``step``: every call). New history tensors are kept in the history's dtype; existing ones are
        added to in place.

        Example:
            >>> import torch
            >>> from pat_callbacks.core.criteria import get_criterion
            >>> weight = torch.nn.Parameter(torch.ones(2))
            >>> weight.grad = torch.tensor([1.0, -2.0])
            >>> scorer = Scorer(get_criterion("fisher"), {"w": weight}, window=1, history_dtype="bfloat16")
            >>> scorer.accumulate(8, next_update=10)  # outside the window: nothing
            >>> scorer.accumulate(10, next_update=10)
            >>> scorer.state["w"]["sum_sq_grad"], scorer.state["w"]["count"]
            (tensor([1., 4.], dtype=torch.bfloat16), tensor(1.))
        """
        if not self.criterion.needs_history or (step is not None and not self.accumulates_at(step, next_update)):
            return
        names = [name for name, param in self.params.items() if param.grad is not None]
        fresh = [name for name in names if not self.state.get(name)]
        self.criterion.accumulate_many(  # a few multi-tensor kernels per step for the gradient criteria
            [local(self.params[n]) for n in names],
            [local(self.params[n].grad) for n in names],
            [self.state.setdefault(n, {}) for n in names],
        )
        if self.dtype != torch.float32 and self._bounded(step, next_update):
            for name in fresh:  # a new history: its per-entry tensors in the history's dtype from now on
                values = self.state[name]
                values.update({key: v.to(self.dtype) for key, v in values.items() if v.dim() and v.is_floating_point()})

    def _bounded(self, step: int | None, next_update: int | None) -> bool:
        """Whether a history started now sums at most :data:`BFLOAT16_MAX_TERMS` steps (a window before a known
        update), so a bfloat16 history keeps its terms; otherwise (no step, no next update, no or a longer window)
        it stays float32: a bfloat16 sum of equal terms stops growing after 256 of them."""
        return (
            step is not None
            and next_update is not None
            and self.window is not None
            and (self.window <= BFLOAT16_MAX_TERMS)
        )

    def score(self, name: str) -> Tensor:
        """The scores of every entry of ``name`` (this rank's rows when sharded)."""
        param = self.params[name]
        self._require_grad(name)
        grad = None if param.grad is None else local(param.grad)
        return self.criterion.score(local(param), grad, self.state.get(name, {}))

    def scores(self) -> dict[str, Tensor]:
        """:meth:`score` of every parameter."""
        return {name: self.score(name) for name in self.params}

    def scored_layer(
        self, name: str, kept: Tensor | None = None, scores: Mapping[str, Tensor] | None = None
    ) -> ScoredLayer:
        """``name``'s scores as a streamed source (flat ``kept``: the entries that may be chosen): computed on slices
        for elementwise criteria, else whole; ``scores`` given by the caller take precedence."""
        if scores is not None:
            return ScoredLayer.of(scores[name], kept)
        if not self.criterion.elementwise:
            return ScoredLayer.of(self.score(name), kept)
        self._require_grad(name)
        param = local(self.params[name]).detach()
        grad = None if self.params[name].grad is None else local(self.params[name].grad).detach().reshape(-1)
        flat = param.reshape(-1)
        state = {
            key: value.reshape(-1) if value.shape == param.shape else value
            for key, value in self.state.get(name, {}).items()
        }

        def score(where: slice | Tensor) -> Tensor:
            part = {
                key: value[where] if value.dim() and value.numel() == flat.numel() else value
                for key, value in state.items()
            }
            return self.criterion.score(flat[where], None if grad is None else grad[where], part).float()

        return ScoredLayer(flat.numel(), lambda a, b: score(slice(a, b)), score, kept, device=flat.device)

    def reset_history(self) -> None:
        """Restart the history the criterion averages since the last update."""
        for values in self.state.values():
            self.criterion.reset(values)

    def forget(self) -> None:
        """Drop the whole history (after NaN/Inf scores, so the next update scores clean numbers)."""
        for values in self.state.values():
            values.clear()

    def to_devices(self) -> None:
        """Move the history to the parameters' devices (after the model moved)."""
        self.state = {
            name: {key: value.to(local(self.params[name]).device) for key, value in values.items()}
            for name, values in self.state.items()
        }

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """The history (per-entry tensors of sharded parameters gathered whole)."""
        return {name: {key: self._full(name, v) for key, v in values.items()} for name, values in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Restore :meth:`state_dict`'s history (this rank's rows of sharded parameters)."""
        self.state = {name: {key: self._local(name, v) for key, v in values.items()} for name, values in state.items()}

    def _full(self, name: str, value: Tensor) -> Tensor:
        if self.group is None or value.dim() == 0:
            return value
        return gather_full(value, self.params[name])

    def _local(self, name: str, value: Tensor) -> Tensor:
        if self.group is None or value.dim() == 0 or name not in self.params:
            return value
        return local_rows(value, self.params[name])

    def _require_grad(self, name: str) -> None:
        if self.criterion.needs_grad and self.params[name].grad is None and not self.state.get(name):
            raise RuntimeError(
                f"criterion={self.name!r} needs a gradient or its history, but {name!r} has neither (no gradient "
                "reached it at this update and none in the steps it accumulates)"
            )
