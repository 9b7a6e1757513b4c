"""The distillation losses as pure functions of two models' outputs: ``alpha·T²·KL`` on logits (:func:`kd_loss`,
Hinton et al. 2015), hidden-state MSE, cosine on embeddings, chosen by name (:data:`LOSSES`) on a chosen output
(:func:`output_of`: logits, a named field, an index, or a function such as :func:`mean_pooled`), and
:func:`distillation_loss`, the whole loss with no task loss. :mod:`~pat_callbacks.recovery.distillation` holds the
teacher and the watched student forward that feed them.

Example:
    >>> import torch
    >>> logits = torch.randn(4, 10)
    >>> float(kd_loss(logits, logits)), float(cosine_loss(logits, 2 * logits)) < 1e-6
    (0.0, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pat_callbacks.core._validation import check_choice, check_number, check_positive

__all__ = [
    "LOSSES",
    "OutputSpec",
    "cosine_loss",
    "distillation_loss",
    "hidden_mse",
    "kd_loss",
    "logits_of",
    "mean_pooled",
    "output_of",
]


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # Hugging Face blocks return (hidden, ...)
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"Cannot match a layer output of type {type(output).__name__}: expected a tensor or a tuple")


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
        "`.logits`, a mapping with 'logits' or a tuple starting with the logits. To distil another output, choose "
        "it: output='last_hidden_state' (a field name), an index, or a function such as mean_pooled; alpha=0 "
        "matches hidden layers only"
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


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 - cos(student, teacher)`` along the last dimension, averaged over every other position, in float32:
    0 for the same directions whatever the scale (embeddings compared as a retrieval index compares them).

    Example:
        >>> float(cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])))
        0.0
        >>> float(cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])))
        1.0
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"Expected outputs of the same shape, but got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    cos = F.cosine_similarity(student.float(), teacher.float().to(student.device), dim=-1)
    return (1 - cos).mean()


LOSSES: dict[str, str] = {
    "kl": "alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dimension (logits)",
    "mse": "mean squared error (hidden states, embeddings)",
    "cosine": "1 - cosine similarity along the last dimension (embeddings)",
}
"""The distillation losses selectable by name, with what each computes."""

OutputSpec = str | int | Callable[..., Tensor]
"""What to match of a model's output: ``"logits"``, a field name, a tuple index or ``fn(output, *inputs)``."""


def output_of(output: Any, spec: OutputSpec = "logits", *args: Any, **kwargs: Any) -> Tensor:
    """The tensor ``spec`` picks from a model's ``output``: ``"logits"`` (see :func:`logits_of`), a named field
    of a ``ModelOutput`` / dict / object, an index into a tuple, or ``spec(output, *args, **kwargs)`` for a
    function (``args`` / ``kwargs``: the inputs the model was called with, e.g. for an attention mask).

    Example:
        >>> output_of({"last_hidden_state": torch.ones(1, 2, 3)}, "last_hidden_state").shape
        torch.Size([1, 2, 3])
        >>> output_of({"logits": torch.ones(1)}, "pooler_output")
        Traceback (most recent call last):
        ...
        TypeError: Cannot find 'pooler_output' in a model output of type dict; its fields: ['logits']
    """
    if spec == "logits":
        return logits_of(output)
    if callable(spec):
        value = spec(output, *args, **kwargs)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        if not isinstance(output, (tuple, list)) and hasattr(output, "to_tuple"):
            output = output.to_tuple()
        value = output[spec] if isinstance(output, (tuple, list)) and -len(output) <= spec < len(output) else None
    elif isinstance(spec, str):
        value = output.get(spec) if isinstance(output, Mapping) else getattr(output, spec, None)
    else:
        raise ValueError(f"Expected `output` to be 'logits', a field name, an index or a function, but got {spec!r}")
    if not isinstance(value, Tensor):
        if isinstance(output, Mapping):
            fields = list(output)
        elif isinstance(output, (tuple, list)):
            fields = f"{len(output)} items"
        else:
            fields = (
                [k for k, v in vars(output).items() if isinstance(v, Tensor)] if hasattr(output, "__dict__") else []
            )
        raise TypeError(f"Cannot find {spec!r} in a model output of type {type(output).__name__}; its fields: {fields}")
    return value


def mean_pooled(output: Any, *args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The sentence embedding of an encoder's output: ``last_hidden_state`` (or the first tensor) averaged over
    the tokens that ``attention_mask`` keeps (all of them without one), as sentence-transformers pools. A function
    for ``output=`` of :func:`distillation_loss` / :class:`Distiller`.

    Example:
        >>> hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]]])
        >>> mean_pooled({"last_hidden_state": hidden}, attention_mask=torch.tensor([[1, 1, 0]]))
        tensor([[2., 2.]])
    """
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, Mapping):
        hidden = output.get("last_hidden_state")
    if not isinstance(hidden, Tensor):
        hidden = _first_tensor(output)
    if attention_mask is None:
        return hidden.mean(dim=-2)
    weights = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=-2) / weights.sum(dim=-2).clamp(min=1e-9)


def _pair_loss(name: str, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    if name == "kl":
        return kd_loss(student, teacher, temperature)
    if name == "cosine":
        return cosine_loss(student, teacher)
    return hidden_mse(student, teacher)


def distillation_loss(
    student_output: Any,
    teacher_output: Any,
    *,
    loss: str = "kl",
    output: OutputSpec = "logits",
    temperature: float = 1.0,
    alpha: float = 1.0,
    student_hidden: Mapping[str, Tensor] | None = None,
    teacher_hidden: Mapping[str, Tensor] | None = None,
    hidden_loss: str = "mse",
    hidden_weight: float = 1.0,
    inputs: Mapping[str, Any] | Sequence[Any] | None = None,
) -> Tensor:
    """The whole distillation loss, no task loss: ``alpha · loss(output)`` plus ``hidden_weight · Σ hidden_loss``
    over the hidden states present in both mappings (keyed alike).

    Args:
        student_output, teacher_output: the two models' outputs on the same inputs.
        loss: ``"kl"`` (``T²·KL`` of the softened distributions), ``"mse"`` or ``"cosine"`` (see :data:`LOSSES`).
        output: what to match of the outputs (see :func:`output_of`); with ``alpha=0`` it is never read.
        temperature: ``T`` of ``"kl"``.
        alpha: weight of the output term (>= 0).
        student_hidden, teacher_hidden: ``{name: hidden state}`` to match with ``hidden_loss``.
        hidden_loss, hidden_weight: the loss and weight ``β`` of each hidden state pair.
        inputs: the inputs both models were called with (a mapping of keyword arguments, or a sequence of
            positional ones), passed to an ``output`` function (e.g. the attention mask of :func:`mean_pooled`).

    Example:
        >>> student, teacher = {"last_hidden_state": torch.ones(2, 3, 4)}, {"last_hidden_state": torch.ones(2, 3, 4)}
        >>> float(distillation_loss(student, teacher, loss="cosine", output=mean_pooled))
        0.0
        >>> distillation_loss(student, teacher, loss="l1")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `loss` 'l1'; expected one of: 'cosine', 'kl', 'mse'
    """
    check_choice("loss", loss, LOSSES)
    check_choice("hidden_loss", hidden_loss, LOSSES)
    check_positive("temperature", temperature)
    alpha = check_number("alpha", alpha)
    hidden_weight = check_number("hidden_weight", hidden_weight)
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs or ()), {})
    terms: list[Tensor] = []
    if alpha > 0:
        student_tensor = output_of(student_output, output, *args, **kwargs)
        teacher_tensor = output_of(teacher_output, output, *args, **kwargs)
        terms.append(alpha * _pair_loss(loss, student_tensor, teacher_tensor, temperature))
    if hidden_weight > 0 and student_hidden:
        teacher_hidden = teacher_hidden or {}
        for name, hidden in student_hidden.items():
            if name not in teacher_hidden:
                raise ValueError(f"No teacher hidden state {name!r} to match; the teacher's: {list(teacher_hidden)}")
            terms.append(hidden_weight * _pair_loss(hidden_loss, hidden, teacher_hidden[name], temperature))
    if not terms:
        raise ValueError(
            "Nothing to distil: `alpha` is 0 and no hidden state is matched (give hidden layers or alpha > 0)"
        )
    return torch.stack([t.float().to(terms[0].device) for t in terms]).sum()
