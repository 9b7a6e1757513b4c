"""DynamicSparseTraining: sparse from the first step, with connectivity that moves (RigL, SET) or not (static).

Example:
    >>> dst = DynamicSparseTraining(sparsity=0.9, regrowth="rigl", update_every=100, drop_fraction=0.3,
    ...                             end_fraction=0.75, allocation="erk")
    >>> dst.method_name, dst.final_sparsity
    ('rigl/erk', 0.9)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core._rng import SeededGenerator
from pat_callbacks.core._validation import check_choice, check_fraction, check_int, renamed
from pat_callbacks.core.pruner import Pruner, PruningOptions
from pat_callbacks.core.regrowth import DECAYS, GROWTH_METHODS, update_fraction
from pat_callbacks.core.sharding import local

__all__ = ["DST_METHODS", "DynamicSparseTraining"]

DST_METHODS = (*GROWTH_METHODS, "static")


class DynamicSparseTraining(PruningCallback):
    """Train at a fixed sparsity from step 0 while dropping and regrowing connections.

    When training starts, each layer gets a random mask at the density chosen by ``allocation`` (ERK by default).
    Every ``update_every`` steps until ``end_fraction`` of training (the end of the window in which masks change,
    the same word as :class:`~pat_callbacks.GradualPruning`'s), ``f(t)`` of each layer's active weights with
    the lowest magnitude are dropped and as many inactive ones regrown (see :mod:`pat_callbacks.core.regrowth`):
    by dense-gradient magnitude (``rigl``, read at the update step only, before gradient masking: no extra
    backward pass) or at random (``set``). ``static`` keeps the initial random mask (the baseline DST papers
    compare against). Regrown weights start at exactly zero with zeroed optimizer state. Randomness comes from a
    generator seeded by ``seed`` whose state is checkpointed, so a resumed run draws the same numbers.

    Args:
        sparsity: the constant overall sparsity, in [0, 1).
        regrowth: how weights grow back: ``"rigl"``, ``"set"`` or ``"static"`` (formerly ``method``, still accepted
            with a DeprecationWarning; ``method`` names a one-shot algorithm only).
        update_every: optimizer steps between connectivity updates.
        drop_fraction: ``f(0)``, the fraction of active weights swapped at the first update, in [0, 1].
        decay: how ``f(t)`` decays to 0 at the end step: ``"cosine"`` (RigL), ``"linear"``, ``"constant"``.
        end_fraction: fraction of training after which the mask is frozen.
        end_step: the same in optimizer steps (overrides ``end_fraction``).
        stop_fraction, stop_step: the former names of ``end_fraction`` and ``end_step`` (a DeprecationWarning;
            giving both names of one argument is an error).
        allocation: per-layer densities: ``"erk"``, ``"er"``, ``"uniform"``.
        seed: seed of the mask generator.
        include, exclude, keep_first, keep_last, layer_sparsity, allow_vectors: see
            :class:`~pat_callbacks.core.pruner.PruningOptions`.
        remask_weights, log_per_layer, prog_bar, verbose: see :class:`~pat_callbacks.callbacks.base.PruningCallback`.

    Example:
        >>> DynamicSparseTraining(sparsity=0.8, regrowth="set", end_step=1000).method_name
        'set/erk'
        >>> DynamicSparseTraining(sparsity=0.8, regrowth="deepr")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `regrowth` 'deepr'; expected one of: 'rigl', 'set', 'static'
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        regrowth: str = "rigl",
        *,
        method: str | None = None,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        decay: str = "cosine",
        end_fraction: float = 0.75,
        end_step: int | None = None,
        stop_fraction: float | None = None,
        stop_step: int | None = None,
        allocation: str = "erk",
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        layer_sparsity: Mapping[str, float] | None = None,
        allow_vectors: bool = False,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
    ) -> None:
        if allocation not in ("erk", "er", "uniform"):
            raise ValueError(
                f"Expected `allocation` to be one of 'erk', 'er', 'uniform' (DST's initial mask is random, so "
                f"score-based allocations do not apply), but got {allocation!r}"
            )
        super().__init__(remask_weights=remask_weights, log_per_layer=log_per_layer, prog_bar=prog_bar, verbose=verbose)
        self.options = PruningOptions(
            allocation=allocation,
            include=include,
            exclude=exclude,
            keep_first=keep_first,
            keep_last=keep_last,
            layer_sparsity=layer_sparsity,
            allow_vectors=allow_vectors,
        )
        self.allocation = allocation
        self.final_sparsity = check_fraction("sparsity", sparsity)
        regrowth, regrowth_key = renamed("method", method, "regrowth", regrowth, "rigl")
        self.regrowth = check_choice(regrowth_key, regrowth, DST_METHODS)
        self.update_every = check_int("update_every", update_every, minimum=1)
        self.drop_fraction = check_fraction("drop_fraction", drop_fraction, allow_one=True)
        self.decay = check_choice("decay", decay, DECAYS)
        end_fraction, fraction_key = renamed("stop_fraction", stop_fraction, "end_fraction", end_fraction, 0.75)
        self.end_fraction = check_fraction(fraction_key, end_fraction, allow_one=True)
        end_step, step_key = renamed("stop_step", stop_step, "end_step", end_step, None)
        self.end_step = None if end_step is None else check_int(step_key, end_step, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        self.rng = SeededGenerator(self.seed)
        self._resolved_end_step: int | None = self.end_step

    @property
    def sparsity(self) -> float:
        """The constant sparsity (``final_sparsity`` is the same value, the name the other callbacks also answer to)."""
        return self.final_sparsity

    @property
    def stop_fraction(self) -> float:
        """The former name of :attr:`end_fraction`."""
        return self.end_fraction

    @property
    def stop_step(self) -> int | None:
        """The former name of :attr:`end_step`."""
        return self.end_step

    @property
    def method_name(self) -> str:
        """``method/allocation``, e.g. ``rigl/erk`` (for reports and metrics.json)."""
        return f"{self.regrowth}/{self.allocation}"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.final_sparsity, method=self.regrowth)  # key kept: old checkpoints

    # ------------------------------------------------------------------ hooks
    @override
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        pruner = Pruner(pl_module, self.options)
        pruner.check_reachable(self.final_sparsity, key="sparsity")
        return pruner

    @override
    def _check_resumable(self, saved_key: str, state: dict[str, Any]) -> None:
        masks = state.get("masks") or {}
        total = sum(mask.numel() for mask in masks.values())
        if not total:
            return
        saved = sum(int((~mask).sum()) for mask in masks.values()) / total
        if abs(saved - self.final_sparsity) > 1.5 / total:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} state was saved under {saved_key} (masks at sparsity "
                f"{saved:.4f}), but this run is {self.state_key}: the sparsity of dynamic sparse training is constant, "
                f"so resume with sparsity={saved:.4g} or start a new run (e.g. GradualPruning from this checkpoint)"
            )

    @override
    def _resolve(self, trainer: pl.Trainer) -> None:
        if self.end_step is not None:
            self._resolved_end_step = self.end_step
            return
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("`end_fraction` needs a finite training length (max_steps or max_epochs); give end_step")
        self._resolved_end_step = math.floor(self.end_fraction * int(total))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        pruner = self._require_pruner()
        if not pruner.masks:  # a fresh run (a resumed one restored its masks)
            generator = self.rng.generator
            shards = {name: local(p) for name, p in pruner.params.items()}  # this rank's rows of a sharded layer
            scores = {name: torch.rand(p.shape, generator=generator).to(p.device) for name, p in shards.items()}
            pruner.prune_to(self.final_sparsity, scores=scores, optimizers=trainer.optimizers)
            self._refresh_sparsity()

    @override
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        if self.regrowth == "static" or step == 0 or step % self.update_every:
            return False
        end = self._resolved_end_step if self._resolved_end_step is not None else 0
        fraction = update_fraction(step, self.drop_fraction, end, self.decay)
        if fraction == 0.0:
            return False
        metrics = self._require_pruner().regrow(
            fraction, self.regrowth, generator=self.rng.generator, optimizers=trainer.optimizers, step=step
        )
        if metrics is None:
            return False
        self._extra_metrics = metrics
        return True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.rng.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator" in state_dict:
            self.rng.set_state(state_dict["generator"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "generator"})
