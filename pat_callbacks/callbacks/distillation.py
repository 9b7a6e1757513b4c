"""Distillation: add ``alpha·T²·KL(teacher ‖ student)`` (and hidden-state MSE) to the loss ``training_step`` returns.

Why a callback that wraps ``training_step`` (and not a mixin, or a callback hook): a distillation term must be in
the loss *before* backward, and no callback hook can change that loss (``on_before_backward`` receives it, already
divided for gradient accumulation and scaled by the GradScaler, and cannot replace it); a mixin would make users
change their module's base classes and call it from ``training_step``. So at ``on_fit_start`` this callback puts a
thin wrapper over the module's ``training_step`` (an instance attribute, removed at ``on_fit_end``) that runs the
original under :meth:`~pat_callbacks.recovery.Distiller.watch`, runs the frozen teacher on the inputs the
student's forward received, and returns ``loss + distillation``. Lightning then treats the sum as the task loss:

- gradient accumulation: Lightning divides the returned loss by ``accumulate_grad_batches``, distillation
  included, so each micro-batch contributes its share;
- AMP: the teacher runs inside the same autocast as the student (``16-mixed`` / ``bf16-mixed``), the KL is
  computed in float32, and the GradScaler scales the sum (its ``unscale_`` precedes the pruning callbacks'
  ``on_before_optimizer_step``, as without distillation);
- DDP: Lightning calls ``training_step`` through the DDP wrapper's forward, so the wrapper (student forward,
  teacher forward, loss) is inside it and DDP reduces the gradients of the sum; the teacher is not a submodule
  of the LightningModule, so DDP neither wraps nor broadcasts it (each rank copies the same synchronized model);
- FSDP2 (``ModelParallelStrategy``, ``fully_shard``): a sharded model cannot be deep-copied (FSDP does not support
  deepcopy), so give ``teacher=`` (a dense module on every rank, e.g. loaded again from the checkpoint; forward only,
  no gradients); without one, fit stops at ``on_fit_start``, before any step, saying so.

It composes with every pruning callback, because it touches neither masks nor gradients: they see the gradient
of the distillation loss as they would any loss. The teacher is the dense model at pruning start (by default:
the optimizer step where the first scheduled pruning callback starts, the start of fit for
DynamicSparseTraining / KeepSparsity / no pruning callback), or a module given.

Example:
    >>> import torch
    >>> from lightning import Trainer
    >>> from pat_callbacks import GradualPruning
    >>> from pat_callbacks.app.models import MLP, Classifier
    >>> from pat_callbacks.app.data import DigitsDataModule
    >>> torch.manual_seed(0) and None
    >>> model = Classifier(MLP(64, (32,), 10))
    >>> pruning = GradualPruning(sparsity=0.8, start_step=4, end_step=8, update_every=1, verbose=False)
    >>> distill = Distillation(temperature=2.0, alpha=1.0)
    >>> trainer = Trainer(callbacks=[pruning, distill], max_steps=12, logger=False, enable_checkpointing=False,
    ...                   enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    >>> distill.teacher_step, round(pruning.store.sparsity(), 2)       # teacher: the dense model at step 4
    (4, 0.8)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from pat_callbacks.callbacks._batches import network_of
from pat_callbacks.callbacks.oneshot import OneShotPruning
from pat_callbacks.callbacks.scheduled import ScheduledPruningCallback
from pat_callbacks.core._validation import check_int
from pat_callbacks.recovery.distillation import (
    Distiller,
    OutputSpec,
    check_copyable,
    check_hidden_layers,
    check_teacher,
    freeze,
    make_teacher,
)

__all__ = ["Distillation"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _full_precision(trainer: pl.Trainer | None, student: nn.Module) -> dict[str, Tensor]:
    """``{student parameter name: full-precision value}`` of the weights a quantization-aware callback has swapped
    fake-quantized values into right now (empty when none is swapped in), whatever the callbacks' order."""
    by_id: dict[int, Tensor] = {}
    for callback in trainer.callbacks if trainer is not None else []:  # type: ignore[attr-defined]
        quantizer = getattr(callback, "quantizer", None)
        if quantizer is not None and getattr(quantizer, "swapped_in", False):
            by_id.update({id(param): quantizer._masters[name] for name, param in quantizer.params.items()})
    return {name: by_id[id(param)] for name, param in student.named_parameters() if id(param) in by_id}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"Unknown `teacher_dtype` {value!r}; expected one of: {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[value]


class Distillation(Callback):
    """Distil a frozen teacher into the model being pruned or recovered, without changing ``training_step``.

    Args:
        teacher: the teacher module (it is called with the inputs of the watched student module); ``None``
            (default): a frozen deep copy of the watched module, made at ``teacher_step``.
        temperature, alpha: ``T`` and ``alpha`` of ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T))`` on the logits
            (``alpha=0``: hidden-state matching only; the output is never read).
        loss: the output term: ``"kl"`` (default, on logits), ``"mse"`` or ``"cosine"`` (e.g. sentence embeddings).
        output: what of the student's and teacher's outputs is compared: ``"logits"`` (default), a field name
            (``"last_hidden_state"``), an index, or a function such as
            :func:`~pat_callbacks.recovery.distillation.mean_pooled` (an encoder's mean-pooled embeddings).
        hidden_layers: submodule names (of the watched module) whose outputs are matched by ``hidden_loss``, or
            ``{student name: teacher name}``; ``hidden_weight`` is their weight ``β``. Checked at fit start.
        hidden_loss: ``"mse"`` (default), ``"cosine"`` or ``"kl"`` for the hidden states.
        task_loss: ``True`` (default): the distillation term is added to the loss ``training_step`` returns;
            ``False``: the loss is the distillation term alone (no labels needed: ``training_step`` only has to
            call the student; what it returns is ignored).
        teacher_step: optimizer step whose model the teacher copies: ``"pruning_start"`` (default: the start
            step of the first scheduled pruning callback, else the start of fit) or a step number (``0``: the
            model as fit starts, before any mask). Before it the loss is the task loss alone.
        teacher_dtype: ``"bfloat16"`` / ``"float16"`` / ``"float32"`` (or a ``torch.dtype``) for the copy;
            ``None``: the model's.
        teacher_device: where the teacher runs (e.g. ``"cpu"`` to keep it off the accelerator); ``None``: the
            model's device. Inputs are moved to it and outputs back.
        student_module: the submodule of the LightningModule whose forward gives the logits (e.g. ``"net"`` if
            ``training_step`` calls ``self.net(x)``); ``""``: the LightningModule itself (``self(x)``); ``None``
            (default): the LightningModule if it defines ``forward``, else its one child module with parameters
            (``self.net``), an error naming the candidates if there are several.
        save_teacher: keep a teacher copied from the model in checkpoints, so a resumed run distils from the same
            teacher (the model at pruning start no longer exists after it); ``False`` keeps checkpoints small and
            a resumed run then copies the model as it is.
        log: log ``distill/loss`` at every step.

    Logs ``distill/loss`` (the added term) through ``pl_module.log``.

    Example:
        >>> Distillation(teacher_step=-1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `teacher_step` to be 'pruning_start' or an integer >= 0, but got -1
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        *,
        temperature: float = 2.0,
        alpha: float = 1.0,
        loss: str = "kl",
        output: OutputSpec = "logits",
        hidden_layers: Sequence[str] | Mapping[str, str] = (),
        hidden_weight: float = 1.0,
        hidden_loss: str = "mse",
        task_loss: bool = True,
        teacher_step: int | Literal["pruning_start"] = "pruning_start",
        teacher_dtype: str | torch.dtype | None = None,
        teacher_device: str | torch.device | None = None,
        student_module: str | None = None,
        save_teacher: bool = True,
        log: bool = True,
    ) -> None:
        super().__init__()
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"Expected `teacher` to be an nn.Module or None, but got {type(teacher).__name__}")
        if teacher_step != "pruning_start":
            try:
                check_int("teacher_step", teacher_step)
            except ValueError:
                raise ValueError(
                    f"Expected `teacher_step` to be 'pruning_start' or an integer >= 0, but got {teacher_step!r}"
                ) from None
        if student_module is not None and not isinstance(student_module, str):
            raise ValueError(f"Expected `student_module` to be a submodule name or None, but got {student_module!r}")
        if not isinstance(task_loss, bool):
            raise ValueError(f"Expected `task_loss` to be True or False, but got {task_loss!r}")
        self._given_teacher = teacher
        self.teacher_dtype = _dtype(teacher_dtype)
        self.teacher_device = torch.device(teacher_device) if teacher_device is not None else None
        self._loss_args = {
            "temperature": temperature,
            "alpha": alpha,
            "hidden_layers": dict(hidden_layers) if isinstance(hidden_layers, Mapping) else list(hidden_layers),
            "hidden_weight": hidden_weight,
            "loss": loss,
            "output": output,
            "hidden_loss": hidden_loss,
        }
        Distiller(nn.Identity(), **{**self._loss_args, "hidden_layers": ()})  # validate the numbers now
        self._teacher_step_arg = teacher_step
        self.student_module = student_module
        self.task_loss = task_loss
        self.save_teacher = bool(save_teacher)
        self.log_loss = bool(log)

        self.distiller: Distiller | None = None
        self.teacher_step: int | None = None  # resolved step the teacher copies
        self._pending: dict[str, Any] | None = None
        self._original_step: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(temperature=self._loss_args["temperature"], alpha=self._loss_args["alpha"])

    # ------------------------------------------------------------------ teacher
    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        """The watched module: ``student_module``, or (``None``) the LightningModule if it defines ``forward``,
        else its one child module with parameters other than a given teacher."""
        if self.student_module is None:
            ignore = {id(p) for p in self._given_teacher.parameters()} if self._given_teacher is not None else set()
            try:
                return network_of(pl_module, ignore)
            except ValueError as error:
                raise ValueError(
                    f"Distillation cannot tell the student: {error}; set `student_module` to the one training_step "
                    "calls (e.g. student_module='net')"
                ) from None
        if not self.student_module:
            return pl_module
        modules = dict(pl_module.named_modules())
        if self.student_module not in modules:
            sample = ", ".join(name for name in list(modules)[1:8])
            raise ValueError(
                f"`student_module` {self.student_module!r} is not a submodule of {type(pl_module).__name__} "
                f"(submodules: {sample}, ...)"
            )
        return modules[self.student_module]

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (given, or copied once its step is reached; ``None`` before)."""
        if self.distiller is not None:
            return self.distiller.teacher
        return self._given_teacher

    def _build(self, teacher: nn.Module, pl_module: pl.LightningModule) -> None:
        device = self.teacher_device or pl_module.device
        freeze(teacher, dtype=self.teacher_dtype, device=device)
        self.distiller = Distiller(teacher, **self._loss_args)

    def _copy_teacher(self, pl_module: pl.LightningModule, step: int, trainer: pl.Trainer | None = None) -> None:
        student = self._student(pl_module)
        teacher = make_teacher(student)
        masters = _full_precision(trainer, student)
        if masters:  # QAT has its fake-quantized values in the weights: the teacher takes the full-precision ones
            with torch.no_grad():
                for name, value in masters.items():
                    teacher.get_parameter(name).copy_(value)
        self._build(teacher, pl_module)
        self.teacher_step = step

    def _resolve_step(self, trainer: pl.Trainer) -> int | None:
        """The teacher's step once known (``None``: a scheduled pruning callback has not resolved its window)."""
        if self._teacher_step_arg != "pruning_start":
            return int(self._teacher_step_arg)
        starts = []
        for callback in trainer.callbacks:
            if isinstance(callback, OneShotPruning):
                starts.append(callback.at_step)
            elif isinstance(callback, ScheduledPruningCallback):
                schedule = callback.schedule
                if schedule is None:
                    return None
                starts.append(int(getattr(schedule, "start_step", 0)))
        return min(starts) if starts else 0

    # ---------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A given teacher is checked and frozen here, before any callback's ``on_fit_start``: a teacher held by the
        LightningModule (``teacher=model.teacher``) is then never a pruning target, whatever the callback order."""
        if stage != "fit" or self._given_teacher is None:
            return
        try:
            student = self._student(pl_module)
        except ValueError:  # layers built later (configure_model, FSDP2): checked and frozen at fit start
            return
        check_teacher(self._given_teacher, student)
        check_hidden_layers(student, self._given_teacher, self._loss_args["hidden_layers"])
        freeze(self._given_teacher)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = self._student(pl_module)  # a bad name fails before the first step
        if self._given_teacher is None:
            check_copyable(student)  # an FSDP2-sharded student fails here, not at the teacher's step
            check_hidden_layers(student, student, self._loss_args["hidden_layers"])  # typos: before any step
        if self._given_teacher is not None:
            check_teacher(self._given_teacher, student)
            self._build(self._given_teacher, pl_module)
            self.teacher_step = 0
        elif self._pending is not None and "teacher" in self._pending:  # resumed: the saved teacher
            teacher = make_teacher(student)
            teacher.load_state_dict(self._pending["teacher"])
            self._build(teacher, pl_module)
            self.teacher_step = int(self._pending.get("teacher_step", 0))
        elif self._teacher_step_arg == 0 or (
            self._teacher_step_arg == "pruning_start" and self._resolve_step(trainer) == 0
        ):
            self._copy_teacher(pl_module, trainer.global_step, trainer)  # before on_train_start applies any mask
        self._pending = None
        self._original_step = pl_module.__dict__.get("training_step")
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._training_step(trainer, pl_module, original, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The teacher is copied as soon as the model has made ``teacher_step`` optimizer steps: here, before
        any callback's hook of the next step can change the weights (``OneShotPruning(at_step=...)`` prunes in
        ``on_train_batch_start``), whatever the callback order."""
        if self.distiller is None and self._given_teacher is None:
            step = self._resolve_step(trainer)
            if step is not None and trainer.global_step >= step:
                self._copy_teacher(pl_module, trainer.global_step, trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap(pl_module)

    def _unwrap(self, pl_module: pl.LightningModule) -> None:
        if "training_step" in pl_module.__dict__:
            del pl_module.training_step
        if self._original_step is not None:
            pl_module.training_step = self._original_step  # type: ignore[method-assign]
            self._original_step = None

    def _training_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, original: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if self.distiller is None:
            step = self._resolve_step(trainer)
            if step is None or trainer.global_step < step:
                return original(*args, **kwargs)
            self._copy_teacher(pl_module, trainer.global_step, trainer)  # QAT may have swapped in
        distiller = self.distiller
        if distiller is None:  # pragma: no cover - set just above
            raise RuntimeError("Distillation has no teacher")
        with distiller.watch(self._student(pl_module)) as call:
            out = original(*args, **kwargs)
        if out is None and (self.task_loss or not call.seen):  # the step was skipped by the user's code
            return out
        extra = distiller.loss(call)
        if not self.task_loss:  # the distillation term is the whole loss: what training_step returned is ignored
            loss = extra
            out = {**out, "loss": extra} if isinstance(out, Mapping) else extra  # None or a tensor: replaced
        else:
            loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"Distillation needs training_step to return a loss tensor, but got {type(out).__name__} (with no "
                "task loss, use task_loss=False)"
            )
        if self.log_loss:
            batch = call.args[0] if call.args and isinstance(call.args[0], Tensor) else None
            pl_module.log(
                "distill/loss",
                extra.detach(),
                on_step=True,
                on_epoch=False,
                batch_size=len(batch) if batch is not None and batch.dim() else None,
            )
        if not self.task_loss:
            return out
        total = loss + extra.to(loss.dtype)
        return {**out, "loss": total} if isinstance(out, Mapping) else total

    # ---------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"teacher_step": self.teacher_step}
        if self.save_teacher and self.distiller is not None and self._given_teacher is None:
            state["teacher"] = {k: v.detach().cpu().clone() for k, v in self.distiller.teacher.state_dict().items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
