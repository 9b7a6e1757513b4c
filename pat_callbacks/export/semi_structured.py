"""2:4 semi-structured kernels for GPU inference."""

from __future__ import annotations

import torch
from torch import nn


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Hand 2:4-sparse ``nn.Linear`` weights to PyTorch's semi-structured kernels (``to_sparse_semi_structured``),
    in place, for GPU inference: CUDA with compute capability >= 8.0 (Ampere, Hopper) and fp16/bf16 weights.

    Train with ``GradualPruning(pattern="2:4")`` first. Layers whose weights are not exactly 2:4 along rows are
    left dense. Elsewhere (CPU, older GPUs) it raises, naming what is missing, rather than silently doing nothing.

    Example:
        >>> to_semi_structured(nn.Linear(8, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: to_semi_structured needs CUDA with compute capability >= 8.0; ...
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        found = (
            "no CUDA device" if not torch.cuda.is_available() else f"capability {torch.cuda.get_device_capability()}"
        )
        raise RuntimeError(
            f"to_semi_structured needs CUDA with compute capability >= 8.0; found {found}. "
            "On a CPU use to_sparse_inference (CSR) instead"
        )
    from torch.sparse import to_sparse_semi_structured

    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cuda":
            continue
        weight = module.weight.detach()
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) if weight.shape[1] % 4 == 0 else None
        if groups is None or bool((groups > 2).any()):
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
    return model
