"""QuantizationAwareTraining: fake-quantized (int8 / int4, weight-only) training of the kept weights.

Lightning wiring of :class:`~pat_callbacks.recovery.quantization.FakeQuantizer`:

- ``on_train_batch_start`` (from ``start_step`` on): the full-precision weights are set aside and their
  fake-quantized values (pruned entries exactly zero) written into the parameters, so the forward and backward of
  this micro-batch see the quantized model; with gradient accumulation the swap stays for every micro-batch of
  the step;
- ``on_after_backward``: the full-precision weights come back. It runs inside Lightning's closure, before the
  GradScaler's ``unscale_`` and before every ``on_before_optimizer_step``, so the pruning callbacks score, mask
  and regrow the full-precision weights with the gradients of the quantized forward, and the optimizer updates
  the full-precision weights (straight-through estimator). Also in ``on_before_optimizer_step`` and
  ``on_train_batch_end``, in case a step had no backward;
- validation / test: the quantized weights in place for the loop, the full-precision ones after;
- ``on_train_end`` (``finalize=True``): the fake-quantized values become the weights, so the fitted model is
  exactly what :func:`~pat_callbacks.export.quantized.save_quantized` stores.

Order: at ``setup`` the callback moves itself after the last pruning callback of ``trainer.callbacks``, so those
write the weights first in ``on_train_batch_start`` (one-shot pruning and its SparseGPT update, applied masks) and
QAT sets aside the weights they wrote: the result is the same whatever the list order. A ``start_step`` at or past
the end of training is refused at ``on_train_start`` (it would never quantize). The quantized weights are
:func:`~pat_callbacks.recovery.quantization.quantized_parameters` (frozen ones too), each with the spec
:func:`~pat_callbacks.export.quantized.save_quantized` gives it (per channel where the group size does not divide
its inputs, named in one info line): the exported file is the model QAT trained and evaluated.

Masks are the pruning callbacks' (every :class:`~pat_callbacks.callbacks.base.PruningCallback` of the trainer,
matched by parameter); symmetric quantization maps zero to zero anyway. Checkpoints hold the full-precision
weights under their usual keys (ModelCheckpoint runs after the restore). DDP: the swap is on each rank's own
parameters before the forward, and the gradients DDP all-reduces are those of the quantized forward. Under
``bf16-mixed`` the matmuls round the int8 grid's values to bf16 (8 significant bits; ``16-mixed`` keeps int4
values exact), as any bf16 computation would.

Example:
    >>> import torch
    >>> from lightning import Trainer
    >>> from pat_callbacks import GradualPruning
    >>> from pat_callbacks.app.models import MLP, Classifier
    >>> from pat_callbacks.app.data import DigitsDataModule
    >>> torch.manual_seed(0) and None
    >>> model = Classifier(MLP(64, (32,), 10))
    >>> pruning = GradualPruning(pattern="2:4", start_step=0, end_step=4, update_every=1, verbose=False)
    >>> qat = QuantizationAwareTraining("int8", start_step=4)
    >>> trainer = Trainer(callbacks=[pruning, qat], max_steps=10, logger=False, enable_checkpointing=False,
    ...                   enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    >>> w = model.net.layers[0].weight
    >>> bool((w.reshape(-1, 4) != 0).sum(1).le(2).all()), len(torch.unique(w[0] / qat.quantizer.last_scales[
    ...     "net.layers.0.weight"][0].float())) <= 255                    # 2:4 and on the int8 grid
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from pat_callbacks.callbacks.base import PruningCallback
from pat_callbacks.core._validation import check_int, renamed
from pat_callbacks.core.sharding import is_sharded
from pat_callbacks.recovery.quantization import FakeQuantizer, QuantSpec

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(Callback):
    """Train with fake-quantized weights (symmetric, weight-only), pruned weights held at exactly zero.

    Args:
        spec: the quantization, as :func:`~pat_callbacks.export.quantized.save_quantized` and
            :class:`~pat_callbacks.recovery.quantization.FakeQuantizer` take it: ``"int8"`` or ``"int4"`` (one
            scale per output channel), ``"int8:g64"`` / ``"int4:g32"`` (one scale per 64 / 32 consecutive inputs of
            each output channel), or a :class:`~pat_callbacks.recovery.quantization.QuantSpec`.
        start_step: first optimizer step trained quantized (e.g. the end of the pruning window); refused at train
            start when training has no such step.
        include, exclude: which weights are quantized (see
            :func:`~pat_callbacks.core.targets.select_parameters`; default: the weights of Linear, Conv,
            MultiheadAttention and Hugging Face Conv1D layers; embeddings, norms and biases stay float).
        finalize: at the end of fit, make the fake-quantized values the weights.
        bits, group_size: deprecated, the former spelling of ``spec`` (``bits=4, group_size=32`` is
            ``spec="int4:g32"``); they still work, with a ``DeprecationWarning`` naming the ``spec`` they mean.

    Example:
        >>> QuantizationAwareTraining("int4:g32").spec
        QuantSpec(bits=4, group_size=32)
        >>> QuantizationAwareTraining("int2")
        Traceback (most recent call last):
        ...
        ValueError: Expected a quantization like 'int8', 'int4' or 'int4:g32', but got 'int2'
    """

    def __init__(
        self,
        spec: QuantSpec | str = "int8",
        *,
        start_step: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        finalize: bool = True,
        bits: int | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(spec, int) and not isinstance(spec, bool) and bits is None:  # bits, by position (former 1st)
            spec, bits = "int8", spec
        spec = str(QuantSpec.parse(spec))
        former = (
            None if bits is None and group_size is None else str(QuantSpec(8 if bits is None else bits, group_size))
        )
        new = "spec" if former is None else f"spec={former!r}"
        self.spec = QuantSpec.parse(renamed("bits, group_size", former, new, spec, "int8")[0])
        self.start_step = check_int("start_step", start_step)
        self.include, self.exclude = include, exclude
        self.finalize = bool(finalize)
        self.quantizer: FakeQuantizer | None = None
        self._masks_by_id: dict[int, Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.spec.bits, group_size=self.spec.group_size)

    @property
    def method_name(self) -> str:
        """``int8`` / ``int4:g32`` (for reports)."""
        return str(self.spec)

    def _require(self) -> FakeQuantizer:
        if self.quantizer is None:
            raise RuntimeError(
                "QuantizationAwareTraining is used before `on_fit_start`: pass it to Trainer(callbacks=)"
            )
        return self.quantizer

    def _masks(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """The pruning callbacks' masks, by the quantizer's names."""
        by_id: dict[int, Tensor] = {}
        for callback in trainer.callbacks:
            store = callback.store if isinstance(callback, PruningCallback) else None
            if store is not None:
                by_id.update({id(store.params[name]): mask for name, mask in store.masks.items()})
        quantizer = self._require()
        return {name: by_id[id(p)] for name, p in quantizer.params.items() if id(p) in by_id}

    def _quantize(self, trainer: pl.Trainer) -> None:
        self._require().quantize_(self._masks(trainer))

    # -------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.quantizer is None and stage != "fit":  # validate / test without fit: quantize for the loop
            self.quantizer = FakeQuantizer.from_model(pl_module, self.spec, include=self.include, exclude=self.exclude)
        if stage == "fit":
            trainer.callbacks = _after_weight_writers(trainer.callbacks, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy.startswith(("DeepSpeed", "FSDPStrategy")):
            raise ValueError(f"QuantizationAwareTraining does not support {strategy}; use DDP or a single device")
        self.quantizer = FakeQuantizer.from_model(pl_module, self.spec, include=self.include, exclude=self.exclude)
        sharded = [name for name, p in self.quantizer.params.items() if is_sharded(p)]
        if sharded:
            raise ValueError(f"QuantizationAwareTraining does not support sharded (FSDP2) parameters: {sharded[:3]}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if not trainer.fast_dev_run and math.isfinite(total) and self.start_step >= total:
            raise ValueError(
                f"{type(self).__name__}: start_step={self.start_step}, but training has {int(total)} optimizer steps "
                f"(max_steps={trainer.max_steps}): it would never quantize (and finalize nothing); give a start_step "
                f"below {int(total)} or train longer"
            )
        quantizer = self._require()
        if quantizer.per_channel:
            rank_zero_info(
                f"{type(self).__name__}: {self.spec}: the group size does not divide the inputs of "
                f"{', '.join(quantizer.per_channel)}: quantized per channel ({QuantSpec(self.spec.bits)}), by "
                "save_quantized too"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.start_step:
            self._quantize(trainer)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require().restore_()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._require().restore_()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._require().restore_()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or trainer.global_step >= self.start_step:  # a standalone validate() too
            self._quantize(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require().restore_()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantize(trainer)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require().restore_()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizer = self._require()
        quantizer.restore_()
        if self.finalize and trainer.global_step >= self.start_step:
            quantizer.finalize_(self._masks(trainer))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.quantizer is not None:
            self.quantizer.restore_()


def _after_weight_writers(callbacks: list[Callback], qat: QuantizationAwareTraining) -> list[Callback]:
    """``callbacks`` (a new list) with ``qat`` moved after the last pruning callback, if it came before it.

    A pruning callback writes weights in ``on_train_batch_start`` (one-shot pruning, its SparseGPT update, masks
    applied); QAT must set the full-precision weights aside after those writes, or its restore would bring back
    the weights from before them. Moving QAT behind them makes the list order irrelevant.

    Example:
        >>> from pat_callbacks import OneShotPruning
        >>> qat, prune = QuantizationAwareTraining(), OneShotPruning("magnitude", 0.5)
        >>> [type(c).__name__ for c in _after_weight_writers([qat, prune], qat)]
        ['OneShotPruning', 'QuantizationAwareTraining']
    """
    writers = [i for i, callback in enumerate(callbacks) if isinstance(callback, PruningCallback)]
    here = next((i for i, callback in enumerate(callbacks) if callback is qat), None)
    if here is None or not writers or here > writers[-1]:
        return list(callbacks)
    rest = [callback for callback in callbacks if callback is not qat]
    last = rest.index(callbacks[writers[-1]])
    return [*rest[: last + 1], qat, *rest[last + 1 :]]
