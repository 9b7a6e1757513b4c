"""Knowledge distillation from a frozen teacher (Hinton et al. 2015), Trainer-free.

The loss added to the task loss is ``alpha·T²·KL(p_teacher ‖ p_student)`` with ``p = softmax(logits / T)``, averaged
over every prediction (the rows of classifier logits ``(B, C)``, every position of language-model logits
``(B, T, V)``): the forward KL of Hinton et al., whose ``T²`` keeps the gradient's size independent of ``T``.
Optionally ``β·MSE`` between the outputs of named layers (hidden-state matching, as in DistilBERT / TinyBERT).

The teacher is a frozen deep copy of the model (:func:`make_teacher`, optionally in bf16 or on another device)
or any module given. :class:`Distiller` watches one forward of the student, reads what it was called with and
what it returned, runs the teacher on the same inputs under ``torch.no_grad()`` and returns the loss: the
student's code (a ``training_step``) is not changed, and the student runs forward once.

How the student is watched: a forward hook on the student module (and on each named layer) that only *records*
the call's inputs and output, registered on entry of :meth:`Distiller.watch` and removed on exit, so it exists
for one training step only. It does not change what the module computes, renames no state_dict key, keeps no
copy of any weight, and outside ``watch`` the model has no hook at all. (The rule against hooks in this project
is against hooks that *mask* weights at every forward; this one reads.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> student = nn.Linear(8, 4)
    >>> distiller = Distiller.from_model(student, temperature=2.0, alpha=0.5)   # frozen copy of the dense model
    >>> with torch.no_grad():
    ...     _ = student.weight.mul_(torch.rand(4, 8) > 0.5)                     # prune the student
    >>> x = torch.randn(16, 8)
    >>> with distiller.watch(student) as call:
    ...     out = student(x)                                                   # the unchanged training code
    >>> task = out.pow(2).mean()
    >>> loss = task + distiller.loss(call)
    >>> loss.backward()
    >>> bool(distiller.loss(call) > 0), any(p.requires_grad for p in distiller.teacher.parameters())
    (True, False)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pat_callbacks.core._validation import check_number, check_positive
from pat_callbacks.core.sharding import is_sharded

__all__ = ["Distiller", "StudentCall", "check_copyable", "hidden_mse", "kd_loss", "logits_of", "make_teacher"]

# Attributes of a module that tie it to a training loop (Lightning's trainer, Fabric): never copied into a teacher.
_LOOP_ATTRIBUTES = ("_trainer", "_fabric", "_device_mesh")


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, an object with ``.logits`` (Hugging Face), a mapping with
    ``"logits"`` or a tuple whose first item is the logits.

    Example:
        >>> logits_of((torch.ones(2, 3), "cache")).shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find logits in a model output of type {type(output).__name__}: expected a tensor, an object with "
        "`.logits`, a mapping with 'logits' or a tuple starting with the logits"
    )


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over predictions.

    Logits are ``(..., classes)``: ``(B, C)`` or language-model ``(B, T, V)`` (every position is a prediction).
    Computed in float32 whatever the logits' dtype (fp16 / bf16 under autocast), so AMP does not change it.

    Example:
        >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> round(float(kd_loss(s, t)), 4)   # KL([.269, .731] ‖ [.731, .269]) = 0.4621
        0.4621
    """
    check_positive("temperature", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Expected student and teacher logits of the same shape, but got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(
        teacher_logits.float().reshape(-1, classes).to(log_p_student.device) / temperature, -1
    )
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl


def hidden_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between two hidden states of the same shape, in float32.

    Example:
        >>> float(hidden_mse(torch.ones(2, 3), torch.zeros(2, 3)))
        1.0
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"Expected hidden states of the same shape, but got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return F.mse_loss(student.float(), teacher.float().to(student.device))


def make_teacher(model: nn.Module, *, dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
    """A frozen deep copy of ``model`` (eval mode, no gradients), optionally cast to ``dtype`` (e.g. bf16, half
    the memory) and moved to ``device``. Any training-loop reference the model holds (a Lightning trainer) is not
    copied.

    Example:
        >>> teacher = make_teacher(nn.Linear(2, 2), dtype=torch.bfloat16)
        >>> teacher.weight.dtype, teacher.weight.requires_grad, teacher.training
        (torch.bfloat16, False, False)
    """
    check_copyable(model)
    memo: dict[int, Any] = {}
    for name in _LOOP_ATTRIBUTES:
        value = model.__dict__.get(name)
        if value is not None:
            memo[id(value)] = None
    teacher = copy.deepcopy(model, memo)
    for name in _LOOP_ATTRIBUTES:
        if name in teacher.__dict__:
            teacher.__dict__[name] = None
    return freeze(teacher, dtype=dtype, device=device)


def check_copyable(model: nn.Module) -> None:
    """Raise if ``model`` cannot be deep-copied into a teacher: a model sharded by FSDP2 (``fully_shard``, DTensor
    parameters) cannot be (FSDP does not support deepcopy), so its teacher must be given.

    Example:
        >>> check_copyable(nn.Linear(2, 2))   # a plain module: nothing to say
    """
    sharded = next((name for name, p in model.named_parameters() if is_sharded(p)), None)
    if sharded is None:
        return
    raise ValueError(
        f"Cannot copy a teacher from a model sharded by FSDP2 (parameter {sharded!r} is a DTensor; FSDP does not "
        "support deepcopy). Give the teacher instead: Distillation(teacher=...) or Distiller(teacher), e.g. the dense "
        "model loaded again from its checkpoint on every rank (it runs forward only, without gradients; "
        "teacher_dtype='bfloat16' halves its memory)"
    )


def freeze(module: nn.Module, *, dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
    """``module`` in eval mode without gradients, cast / moved as asked (in place; returned)."""
    if dtype is not None:
        module.to(dtype=dtype)
    if device is not None:
        module.to(device=device)
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class StudentCall:
    """What one watched forward of the student saw: its inputs, its output and the named layers' outputs.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> with Distiller(nn.Linear(2, 1)).watch(net) as call:
        ...     _ = net(torch.ones(3, 2))
        >>> call.seen, call.args[0].shape, call.output.shape
        (True, torch.Size([3, 2]), torch.Size([3, 1]))
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    hidden: dict[str, Tensor] = field(default_factory=dict)
    seen: bool = False


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # Hugging Face blocks return (hidden, ...)
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"Cannot match a layer output of type {type(output).__name__}: expected a tensor or a tuple")


def _to(value: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """Tensors in ``value`` (nested tuples / lists / dicts) on ``device``; floating ones cast to ``dtype``."""
    if isinstance(value, Tensor):
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.to(device=device if device is not None else value.device, dtype=cast)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, Mapping):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


class Distiller:
    """A frozen teacher and the distillation loss of one student forward.

    Args:
        teacher: the teacher module, frozen here (eval mode, ``requires_grad=False``); see :meth:`from_model`.
        temperature: ``T`` of the softened distributions (> 0).
        alpha: weight of the logit term ``alpha·T²·KL`` (>= 0; 0 keeps only hidden-state matching).
        hidden_layers: layers whose outputs are matched by MSE: names of submodules of the watched student
            (the same names in the teacher), or ``{student name: teacher name}``.
        hidden_weight: ``β``, weight of the summed hidden-state MSE.

    Example:
        >>> distiller = Distiller(nn.Linear(3, 2), temperature=0.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `temperature` to be a finite number > 0, but got 0.0
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        alpha: float = 1.0,
        hidden_layers: Sequence[str] | Mapping[str, str] = (),
        hidden_weight: float = 1.0,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"Expected `teacher` to be an nn.Module, but got {type(teacher).__name__}")
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_number("alpha", alpha)
        self.hidden_weight = check_number("hidden_weight", hidden_weight)
        if isinstance(hidden_layers, str):
            hidden_layers = [hidden_layers]
        pairs = dict(hidden_layers) if isinstance(hidden_layers, Mapping) else {name: name for name in hidden_layers}
        self.hidden_layers: dict[str, str] = pairs
        modules = dict(teacher.named_modules())
        missing = [name for name in pairs.values() if name not in modules]
        if missing:
            raise ValueError(f"`hidden_layers` names {missing}, which are not submodules of the teacher")
        self.teacher = freeze(teacher)
        first = next(iter(teacher.parameters()), None)
        self.device = first.device if first is not None else None
        self.dtype = first.dtype if first is not None else None

    @classmethod
    def from_model(
        cls, model: nn.Module, *, dtype: torch.dtype | None = None, device: Any = None, **kwargs: Any
    ) -> Distiller:
        """A distiller whose teacher is a frozen copy of ``model`` as it is now (see :func:`make_teacher`)."""
        return cls(make_teacher(model, dtype=dtype, device=device), **kwargs)

    def teacher_bytes(self) -> int:
        """Bytes held by the teacher's parameters and buffers (its memory cost besides activations).

        Example:
            >>> Distiller(nn.Linear(4, 4, bias=False)).teacher_bytes()
            64
        """
        tensors = {id(t): t for t in (*self.teacher.parameters(), *self.teacher.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @contextmanager
    def watch(self, student: nn.Module) -> Iterator[StudentCall]:
        """Record the first forward of ``student`` inside the block (inputs, output, named layers' outputs)."""
        call = StudentCall()
        modules = dict(student.named_modules())
        missing = [name for name in self.hidden_layers if name not in modules]
        if missing:
            raise ValueError(f"`hidden_layers` names {missing}, which are not submodules of {type(student).__name__}")

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not call.seen:
                call.args, call.kwargs, call.output, call.seen = args, dict(kwargs), output, True

        handles = [student.register_forward_hook(record, with_kwargs=True)]
        for name in self.hidden_layers:
            handles.append(modules[name].register_forward_hook(self._recorder(call.hidden, name)))
        try:
            yield call
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _recorder(into: dict[str, Tensor], name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            into.setdefault(name, _first_tensor(output))  # the first call of a layer used twice

        return record

    @torch.no_grad()
    def teacher_forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """The teacher's output on the student's inputs (moved to its device / dtype) and its named layers'
        outputs."""
        hidden: dict[str, Tensor] = {}
        modules = dict(self.teacher.named_modules())
        handles = [modules[t].register_forward_hook(self._recorder(hidden, s)) for s, t in self.hidden_layers.items()]
        try:
            output = self.teacher(*_to(args, self.device, self.dtype), **_to(kwargs, self.device, self.dtype))
        finally:
            for handle in handles:
                handle.remove()
        return output, hidden

    def loss(self, call: StudentCall) -> Tensor:
        """The distillation loss of a watched student forward (differentiable in the student's output)."""
        if not call.seen:
            raise RuntimeError(
                "The student was not called inside `Distiller.watch(student)`: nothing to distil (does the training "
                "code call another module than the one watched?)"
            )
        teacher_output, teacher_hidden = self.teacher_forward(*call.args, **call.kwargs)
        return self.loss_from(call.output, teacher_output, call.hidden, teacher_hidden)

    def loss_from(
        self,
        student_output: Any,
        teacher_output: Any,
        student_hidden: Mapping[str, Tensor] | None = None,
        teacher_hidden: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The loss from outputs computed elsewhere: ``alpha·T²·KL`` on the logits plus ``β·Σ MSE`` on the hidden
        states (both mappings keyed by the student's layer names)."""
        student_logits = logits_of(student_output)
        loss = kd_loss(student_logits, logits_of(teacher_output), self.temperature, self.alpha)
        if self.hidden_layers and self.hidden_weight > 0:
            student_hidden, teacher_hidden = student_hidden or {}, teacher_hidden or {}
            for name in self.hidden_layers:
                if name not in student_hidden or name not in teacher_hidden:
                    raise RuntimeError(f"Layer {name!r} was not called in the forward pass: no hidden state to match")
                loss = loss + self.hidden_weight * hidden_mse(student_hidden[name], teacher_hidden[name])
        return loss
