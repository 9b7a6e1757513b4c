"""Knowledge distillation from a frozen teacher (Hinton et al. 2015), Trainer-free.

The loss added to the task loss is ``alpha·T²·KL(p_teacher ‖ p_student)`` with ``p = softmax(logits / T)``, averaged
over every prediction (the rows of classifier logits ``(B, C)``, every position of language-model logits
``(B, T, V)``): the forward KL of Hinton et al., whose ``T²`` keeps the gradient's size independent of ``T``.
Optionally ``β·MSE`` between the outputs of named layers (hidden-state matching, as in DistilBERT / TinyBERT).

What is matched and how are choices, by name: ``loss`` is ``"kl"`` (the above), ``"mse"`` or ``"cosine"``
(``1 - cos`` along the last dimension, averaged) and ``output`` picks the tensor from the model's output:
``"logits"`` (default), any named field of a ``ModelOutput`` / dict (``"last_hidden_state"``,
``"pooler_output"``), a tuple index, or a function ``output, *inputs -> tensor`` (:func:`mean_pooled`: the
attention-masked mean of ``last_hidden_state``, a sentence-transformers embedding). ``alpha=0`` keeps only the
hidden-state terms and never reads the output. :func:`distillation_loss` is the whole loss as one pure function
of the two outputs, with no task loss at all: distilling an encoder's embeddings needs no labels, e.g.
``distillation_loss(student(**batch), teacher(**batch), loss="cosine", output=mean_pooled, inputs=batch)``.

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
from torch import Tensor, nn

from pat_callbacks.core._validation import check_choice, check_number, check_positive
from pat_callbacks.core.sharding import is_sharded
from pat_callbacks.recovery.kd_losses import (
    LOSSES,
    OutputSpec,
    _first_tensor,
    cosine_loss,
    distillation_loss,
    hidden_mse,
    kd_loss,
    logits_of,
    mean_pooled,
    output_of,
)

__all__ = [
    "LOSSES",
    "Distiller",
    "StudentCall",
    "check_copyable",
    "check_hidden_layers",
    "check_teacher",
    "cosine_loss",
    "distillation_loss",
    "hidden_mse",
    "kd_loss",
    "logits_of",
    "make_teacher",
    "mean_pooled",
    "output_of",
]

# Attributes of a module that tie it to a training loop (Lightning's trainer, Fabric): never copied into a teacher.
_LOOP_ATTRIBUTES = ("_trainer", "_fabric", "_device_mesh")


def check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Raise if ``teacher`` is ``student`` or shares a parameter (or its storage) with it: a teacher is frozen, so
    a shared parameter would freeze the student, and its forward is run under ``no_grad`` (``teacher=model.net``
    crashes in backward). Run at fit start.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> check_teacher(nn.Sequential(nn.Linear(2, 2)), net)   # another module: fine
        >>> check_teacher(net[0], net)
        Traceback (most recent call last):
        ...
        ValueError: The teacher shares parameters with the student (student's '0.weight', '0.bias'): freezing it \
would freeze them. Give a separate teacher (a copy: make_teacher(model), or teacher=None to copy the student)
    """
    if teacher is student:
        raise ValueError(
            f"The teacher is the student itself ({type(student).__name__}): freezing it would freeze the student. "
            "Give a separate teacher (a copy: make_teacher(model), or teacher=None to copy the student)"
        )
    teacher_ids = {id(p) for p in teacher.parameters()}
    teacher_storages = {_storage(p) for p in teacher.parameters()} - {None}
    shared = [name for name, p in student.named_parameters() if id(p) in teacher_ids or _storage(p) in teacher_storages]
    if shared:
        names = ", ".join(repr(n) for n in shared[:6]) + (f", ... ({len(shared)} in all)" if len(shared) > 6 else "")
        raise ValueError(
            f"The teacher shares parameters with the student (student's {names}): freezing it would freeze them. "
            "Give a separate teacher (a copy: make_teacher(model), or teacher=None to copy the student)"
        )


def _storage(param: Tensor) -> int | None:
    """The address of ``param``'s storage (``None``: empty, on the meta device, or a tensor subclass without one)."""
    if not param.numel() or param.is_meta:
        return None
    try:
        return param.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # DTensor and other wrappers
        return None


def check_hidden_layers(
    student: nn.Module, teacher: nn.Module, hidden_layers: Sequence[str] | Mapping[str, str] | str
) -> dict[str, str]:
    """``{student name: teacher name}`` of ``hidden_layers``, raising (with the valid names) if a name is not a
    submodule of its model: a typo is found at fit start, not after N optimizer steps.

    Example:
        >>> student, teacher = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
        >>> check_hidden_layers(student, teacher, ["0"])
        {'0': '0'}
        >>> check_hidden_layers(student, teacher, ["blocks.0"])
        Traceback (most recent call last):
        ...
        ValueError: `hidden_layers` names ['blocks.0'], which are not submodules of the student (Sequential); \
valid names: ['0']
    """
    if isinstance(hidden_layers, str):
        hidden_layers = [hidden_layers]
    pairs = dict(hidden_layers) if isinstance(hidden_layers, Mapping) else {name: name for name in hidden_layers}
    _check_names("student", student, list(pairs))
    _check_names("teacher", teacher, list(pairs.values()))
    return pairs


def _check_names(role: str, model: nn.Module, names: Sequence[str]) -> None:
    modules = [name for name, _ in model.named_modules() if name]
    missing = [name for name in names if name not in set(modules)]
    if missing:
        shown = modules if len(modules) <= 60 else [*modules[:60], f"... ({len(modules)} in all)"]
        raise ValueError(
            f"`hidden_layers` names {missing}, which are not submodules of the {role} ({type(model).__name__}); "
            f"valid names: {shown}"
        )


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
        alpha: weight of the output term, ``alpha·T²·KL`` on the logits by default (>= 0; 0 keeps only
            hidden-state matching and never reads the output).
        hidden_layers: layers whose outputs are matched: names of submodules of the watched student
            (the same names in the teacher), or ``{student name: teacher name}``.
        hidden_weight: ``β``, weight of the summed hidden-state losses.
        loss: the output term's loss, ``"kl"`` (default), ``"mse"`` or ``"cosine"`` (see :data:`LOSSES`).
        output: what of the output it compares (see :func:`output_of`): ``"logits"`` (default), a field name
            (``"last_hidden_state"``), an index, or a function such as :func:`mean_pooled`.
        hidden_loss: the hidden states' loss, ``"mse"`` (default) or ``"cosine"`` / ``"kl"``.
        student: the module that will be watched, if known: checked *before* the teacher is frozen (see
            :meth:`check`), so a teacher that is the student is refused before it freezes the student.

    Example:
        >>> distiller = Distiller(nn.Linear(3, 2), temperature=0.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `temperature` to be a finite number > 0, but got 0.0

        Distilling an encoder's sentence embeddings, no labels and no logits:

        >>> from transformers import BertConfig, BertModel
        >>> torch.manual_seed(0) and None
        >>> bert = BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                             intermediate_size=16))
        >>> distiller = Distiller.from_model(bert, loss="cosine", output=mean_pooled)
        >>> distiller.check(bert)                                      # at fit start: teacher apart, names exist
        >>> with torch.no_grad():
        ...     _ = bert.encoder.layer[0].intermediate.dense.weight.mul_(0.0)   # the student drifts
        >>> batch = {"input_ids": torch.randint(0, 32, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
        >>> with distiller.watch(bert) as call:
        ...     _ = bert(**batch)
        >>> loss = distiller.loss(call)                                # the whole loss: no task loss to add to
        >>> loss.backward()
        >>> bool(loss > 0), bert.encoder.layer[0].output.dense.weight.grad is not None
        (True, True)
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        alpha: float = 1.0,
        hidden_layers: Sequence[str] | Mapping[str, str] = (),
        hidden_weight: float = 1.0,
        loss: str = "kl",
        output: OutputSpec = "logits",
        hidden_loss: str = "mse",
        student: nn.Module | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"Expected `teacher` to be an nn.Module, but got {type(teacher).__name__}")
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_number("alpha", alpha)
        self.hidden_weight = check_number("hidden_weight", hidden_weight)
        self.loss_name = check_choice("loss", loss, LOSSES)
        self.hidden_loss = check_choice("hidden_loss", hidden_loss, LOSSES)
        if not (callable(output) or isinstance(output, (str, int))) or isinstance(output, bool):
            raise ValueError(
                f"Expected `output` to be 'logits', a field name, an index or a function, but got {output!r}"
            )
        self.output = output
        if isinstance(hidden_layers, str):
            hidden_layers = [hidden_layers]
        pairs = dict(hidden_layers) if isinstance(hidden_layers, Mapping) else {name: name for name in hidden_layers}
        self.hidden_layers: dict[str, str] = pairs
        _check_names("teacher", teacher, list(pairs.values()))
        if student is not None:
            check_teacher(teacher, student)
            check_hidden_layers(student, teacher, pairs)
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

    def check(self, student: nn.Module) -> None:
        """Refuse a teacher that is (or shares parameters with) ``student`` and hidden layer names missing from
        either model (with the valid names): what a training loop / the callback runs at fit start."""
        check_teacher(self.teacher, student)
        check_hidden_layers(student, self.teacher, self.hidden_layers)

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
        check_hidden_layers(student, self.teacher, self.hidden_layers)

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
        return self.loss_from(call.output, teacher_output, call.hidden, teacher_hidden, inputs=(call.args, call.kwargs))

    def loss_from(
        self,
        student_output: Any,
        teacher_output: Any,
        student_hidden: Mapping[str, Tensor] | None = None,
        teacher_hidden: Mapping[str, Tensor] | None = None,
        *,
        inputs: tuple[Sequence[Any], Mapping[str, Any]] = ((), {}),
    ) -> Tensor:
        """The loss from outputs computed elsewhere (see :func:`distillation_loss`): ``alpha·loss`` on the chosen
        output (never read when ``alpha`` is 0) plus ``β·Σ hidden_loss`` on the hidden states (both mappings keyed
        by the student's layer names); ``inputs``: the ``(args, kwargs)`` the models were called with, for an
        ``output`` function. Zero when there is nothing to distil (``alpha`` and ``β`` 0)."""
        hidden: dict[str, Tensor] = {}
        if self.hidden_layers and self.hidden_weight > 0:
            student_hidden, teacher_hidden = student_hidden or {}, teacher_hidden or {}
            for name in self.hidden_layers:
                if name not in student_hidden or name not in teacher_hidden:
                    raise RuntimeError(f"Layer {name!r} was not called in the forward pass: no hidden state to match")
                hidden[name] = student_hidden[name]
        if self.alpha == 0 and not hidden:
            return torch.zeros(())
        output = self.output
        if callable(output):
            args, kwargs = inputs
            function = output

            def output(out: Any) -> Tensor:  # the function, with the inputs of the call
                return function(out, *args, **kwargs)

        return distillation_loss(
            student_output,
            teacher_output,
            loss=self.loss_name,
            output=output,
            temperature=self.temperature,
            alpha=self.alpha,
            student_hidden=hidden,
            teacher_hidden=teacher_hidden,
            hidden_loss=self.hidden_loss,
            hidden_weight=self.hidden_weight,
        )
