"""Recover after pruning, without a Trainer: distillation from a dense teacher, mask-safe LoRA, and fake-quantized
training (QAT) of the kept weights. Never imports Lightning; the callbacks in :mod:`pat_callbacks.callbacks` wire
these pieces to Lightning's hooks.

- :mod:`~pat_callbacks.recovery.distillation`: :func:`kd_loss` (``alpha·T²·KL(teacher ‖ student)``), hidden-state
  matching, losses by name (``"kl"``, ``"mse"``, ``"cosine"``) on a chosen output (logits, a named field, a pooled
  embedding such as :func:`mean_pooled`), :func:`distillation_loss` (the whole loss, no task loss: labels-free
  embedding distillation), :class:`Distiller` (a frozen teacher and the loss of one student forward) and the
  fit-start checks :func:`check_teacher` / :func:`check_hidden_layers`.
- :mod:`~pat_callbacks.recovery.lora`: PEFT LoRA adapters on a pruned, frozen base, trained under the mask
  (``W + mask ⊙ B·A``) by default, and :func:`merge_lora`, which merges them into exactly the trained model with
  every pruned weight exactly zero (N:M stays N:M).
- :mod:`~pat_callbacks.recovery.quantization`: symmetric int8 / int4 fake quantization that maps zero to zero,
  and :class:`FakeQuantizer`, which swaps fake-quantized values into the weights for a forward/backward and the
  full-precision ones back before the optimizer step (straight-through estimator, no hooks, same state_dict keys).

Example:
    >>> import torch
    >>> from pat_callbacks.recovery import kd_loss
    >>> logits = torch.randn(4, 10)
    >>> float(kd_loss(logits, logits))
    0.0
"""

from pat_callbacks.recovery.distillation import (
    LOSSES,
    Distiller,
    check_hidden_layers,
    check_teacher,
    cosine_loss,
    distillation_loss,
    hidden_mse,
    kd_loss,
    logits_of,
    make_teacher,
    mean_pooled,
    output_of,
)
from pat_callbacks.recovery.quantization import FakeQuantizer, QuantSpec, fake_quantize, quantize_tensor

__all__ = [
    "LOSSES",
    "Distiller",
    "FakeQuantizer",
    "QuantSpec",
    "check_hidden_layers",
    "check_teacher",
    "cosine_loss",
    "distillation_loss",
    "fake_quantize",
    "hidden_mse",
    "kd_loss",
    "logits_of",
    "make_teacher",
    "mean_pooled",
    "output_of",
    "quantize_tensor",
]
