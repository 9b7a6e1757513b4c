"""OneShotPruning: start from a trained model, prune it once from calibration data, recover by training.

The callback only wires :func:`~pat_callbacks.oneshot.one_shot_prune` to Lightning: at the chosen step (default
0, before the first optimizer step of the fit) it reads ``calibration_batches`` batches, prunes (magnitude, Wanda or
SparseGPT; OWL layer-wise sparsities on request), and from then on the masks are held like any other pruning
callback's (gradients of pruned weights zeroed, optimizer state of newly pruned entries reset, weights re-masked when
the optimizer does not keep zeros): pruning-aware recovery training. Calibration hooks exist only while the
calibration batches run; the random-number state is restored afterwards, so training sees the batches and dropout
masks it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pat_callbacks.callbacks._batches import calibration_forward, first_nonempty
from pat_callbacks.callbacks._guards import warn_if_unreached
from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core._validation import check_int
from pat_callbacks.core.owl import OWL_LAMBDA, OWL_M
from pat_callbacks.core.pruner import Pruner, PruningOptions
from pat_callbacks.oneshot.prune import OneShotOptions, one_shot_prune
from pat_callbacks.oneshot.sparsegpt import refuse_sharded

__all__ = ["CALIBRATION_SOURCES", "OneShotPruning"]

CALIBRATION_SOURCES = ("train", "val")


class OneShotPruning(PruningCallback):
    """Prune once, one-shot from calibration data (at fit start or ``at_step``), then keep the masks while training.

    Args:
        method: ``"wanda"`` (``|W| * ||X||``, compared per output row), ``"sparsegpt"`` (OBS weight update from
            the input Hessian, layer group by layer group) or ``"magnitude"``.
        sparsity: the target in (0, 1); with an N:M ``pattern``, ``1 - N/M`` (the default then).
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        owl: OWL layer-wise sparsities (outlier-weighted, ``owl_lambda`` / ``owl_m``; unstructured only).
        calibration_batches: how many batches calibrate (the first ones of the source); ``None`` (default): 16 of
            the training or validation loader, every batch of an iterable given as ``calibration`` (with a ``len``;
            16 of one without, with a warning if it holds more).
        calibration: ``"train"`` (the training loader), ``"val"`` (the validation loader, or the datamodule's) or
            an iterable of batches (e.g. a ``DataLoader``).
        at_step: the optimizer step before which pruning happens (``0``: before the first).
        forward: ``forward(pl_module, batch)`` running one calibration batch; default
            (:func:`~pat_callbacks.callbacks._batches.calibration_forward`): activations only, no loss or labels: a
            mapping batch as keywords, a module's own ``loss(batch)`` method (``LanguageModel``), else the inputs of
            ``(x, y)`` batches through the module's forward, or through its one network (``self.net``) when it
            defines none.
        pipeline, offload, device: how sequential calibration runs (block by block from cached block inputs, or
            whole-model passes; the same masks either way) and whether blocks move one at a time to ``device`` (see
            :class:`~pat_callbacks.oneshot.OneShotOptions`).
        per_row, allocation, sequential, block_size, damping: see :class:`~pat_callbacks.oneshot.OneShotOptions`.
        include, exclude, keep_first, keep_last: which weights are pruned (see
            :class:`~pat_callbacks.core.pruner.PruningOptions`).
        remask_weights, log_per_layer, prog_bar, verbose: see :class:`~pat_callbacks.callbacks.base.PruningCallback`.

    Example:
        >>> import torch
        >>> from lightning import Trainer
        >>> from pat_callbacks.app.models import MLP, Classifier
        >>> from pat_callbacks.app.data import DigitsDataModule
        >>> torch.manual_seed(0) and None
        >>> model = Classifier(MLP(64, (32,), 10))                 # e.g. Classifier.load_from_checkpoint(...)
        >>> pruning = OneShotPruning("wanda", 0.5, calibration_batches=4, verbose=False)
        >>> trainer = Trainer(callbacks=[pruning], max_steps=10, logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
        >>> zeros = float((model.net.layers[0].weight == 0).float().mean())
        >>> pruning.store.sparsity(), zeros
        (0.5, 0.5)
        >>> OneShotPruning("obs", 0.5)
        Traceback (most recent call last):
        ...
        ValueError: Unknown `method` 'obs'; expected one of: 'magnitude', 'sparsegpt', 'wanda'
    """

    def __init__(
        self,
        method: str = "wanda",
        sparsity: float | None = None,
        pattern: str = "unstructured",
        owl: bool = False,
        *,
        calibration_batches: int | None = None,
        calibration: str | Iterable[Any] = "train",
        at_step: int = 0,
        forward: Callable[[pl.LightningModule, Any], Any] | None = None,
        owl_lambda: float = OWL_LAMBDA,
        owl_m: float = OWL_M,
        per_row: bool | None = None,
        allocation: str = "uniform",
        sequential: bool = True,
        block_size: int = 128,
        damping: float = 0.01,
        pipeline: str = "auto",
        offload: bool | str = "auto",
        device: str | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        remask_weights: bool | Literal["auto"] = "auto",
        log_per_layer: bool = True,
        prog_bar: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__(remask_weights=remask_weights, log_per_layer=log_per_layer, prog_bar=prog_bar, verbose=verbose)
        self.one_shot = OneShotOptions(
            method,
            sparsity,
            pattern,
            owl,
            owl_lambda=owl_lambda,
            owl_m=owl_m,
            per_row=per_row,
            allocation=allocation,
            sequential=sequential,
            block_size=block_size,
            damping=damping,
            pipeline=pipeline,
            offload=offload,
            device=device,
        )
        self.options = PruningOptions(
            criterion="magnitude",
            allocation=self.one_shot.allocation,
            pattern=self.one_shot.pattern,
            include=include,
            exclude=exclude,
            keep_first=keep_first,
            keep_last=keep_last,
        )
        self.calibration_batches = (
            None if calibration_batches is None else check_int("calibration_batches", calibration_batches, minimum=1)
        )
        if isinstance(calibration, str):
            if calibration not in CALIBRATION_SOURCES:
                raise ValueError(
                    f"Expected `calibration` to be 'train', 'val' or an iterable of batches (a DataLoader), but got "
                    f"{calibration!r}"
                )
        elif not isinstance(calibration, Iterable):
            raise ValueError(
                f"Expected `calibration` to be 'train', 'val' or an iterable of batches (a DataLoader), but got "
                f"{calibration!r}"
            )
        self.calibration = calibration
        self.at_step = check_int("at_step", at_step, minimum=0)
        if forward is not None and not callable(forward):
            raise ValueError(f"Expected `forward` to be callable (pl_module, batch) -> output, but got {forward!r}")
        self.forward = forward
        self.result_seconds: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.one_shot.method,
            sparsity=self.one_shot.sparsity,
            pattern=self.one_shot.pattern.name,  # type: ignore[union-attr]
            owl=self.one_shot.owl,
            at_step=self.at_step,
        )

    @property
    def final_sparsity(self) -> float:
        """The target (for reports): the configured one, or once pruned the one the masks were made for (a run
        resumed with another ``sparsity`` keeps the checkpoint's masks)."""
        if self.pruner is not None and self.last_update_step >= 0:
            return float(self.pruner.target_sparsity)
        return float(self.one_shot.sparsity)  # type: ignore[arg-type]

    @property
    def method_name(self) -> str:
        """``one_shot/<method>[+owl][ N:M]``, e.g. ``one_shot/wanda+owl`` (for reports and metrics.json)."""
        return f"one_shot/{self.one_shot.name}"

    @property
    def pruned(self) -> bool:
        """Whether the one-shot step has run (in this fit or in the run a checkpoint was saved from)."""
        pending = int((self._pending_state or {}).get("last_update_step", -1))  # loaded, restored at fit start
        return max(self.last_update_step, pending) >= 0

    # ------------------------------------------------------------------ wiring
    @override
    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Pruner:
        pruner = Pruner(pl_module, self.options)
        if self.one_shot.method == "sparsegpt":
            refuse_sharded(pruner.params)
        return pruner

    @override
    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        pruner = self._require_pruner()
        if self.last_update_step >= 0 and abs(pruner.target_sparsity - float(self.one_shot.sparsity or 0)) > 1e-9:
            rank_zero_warn(
                f"{type(self).__name__}: resumed from a checkpoint pruned to {pruner.target_sparsity:g}; it does not "
                f"prune again, so the run keeps that sparsity, not sparsity={self.one_shot.sparsity:g} (start a new "
                "run to prune to another target)"
            )

    @override
    def _resolve(self, trainer: pl.Trainer) -> None:
        if not self.pruned:
            warn_if_unreached(type(self).__name__, trainer, self.at_step, what="one-shot pruning happens")

    @override
    def _on_step(self, trainer: pl.Trainer, step: int) -> bool:
        return False  # masks change once, in on_train_batch_start

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruned or trainer.global_step < self.at_step:
            return
        pruner = self._require_pruner()
        batches = self._calibration_batches(trainer, pl_module)
        forward = self.forward or calibration_forward
        with torch.random.fork_rng(devices=_cuda_devices(pl_module)):  # training's random stream stays as it was
            result = one_shot_prune(
                pl_module,
                options=self.one_shot,
                calibration=batches,
                forward=forward,
                pruner=pruner,
                optimizers=trainer.optimizers,
            )
        self.result_seconds = result.seconds
        self.last_update_step = trainer.global_step
        self._extra_metrics = {"pruning/one_shot_seconds": result.seconds}
        self._refresh_sparsity()
        if self.verbose:
            rank_zero_info(
                f"{type(self).__name__}: {self.one_shot.name} pruned to {result.sparsity:.4f} at step "
                f"{trainer.global_step} ({result.passes} calibration passes over {result.calibration_batches} "
                f"batches, {result.seconds:.1f}s)"
            )

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The first ``calibration_batches`` batches of the source, on the module's device (none for magnitude)."""
        if not self.one_shot.needs_calibration:
            return []
        source = self.calibration
        if source == "train":
            loader = first_nonempty(trainer.train_dataloader)
        elif source == "val":
            loader = first_nonempty(trainer.val_dataloaders)
            datamodule = getattr(trainer, "datamodule", None)
            if loader is None and datamodule is not None:  # not set up before the first validation run
                loader = first_nonempty(datamodule.val_dataloader())
        else:
            loader = source
        if loader is None:
            raise RuntimeError(f"calibration={source!r}: the run has no such dataloader to calibrate on")
        count = self.calibration_batches
        if count is None:  # every batch given; 16 of a training / validation loader or of an unsized iterable
            count = len(loader) if source not in CALIBRATION_SOURCES and hasattr(loader, "__len__") else 16
        batches = []
        iterator = iter(loader)
        for batch in iterator:
            batches.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
            if len(batches) == count:
                break
        given = self.calibration_batches is None and source not in CALIBRATION_SOURCES
        if given and len(batches) == count and next(iterator, None) is not None:
            rank_zero_warn(
                f"{type(self).__name__}: calibrating on the first {count} batches of the given iterable, which "
                "holds more; set calibration_batches to use more"
            )
        if not batches:
            raise RuntimeError(f"calibration={source!r} yielded no batch to calibrate on")
        return batches


def _cuda_devices(pl_module: pl.LightningModule) -> list[int]:
    device = pl_module.device
    return [device.index or 0] if device.type == "cuda" else []
