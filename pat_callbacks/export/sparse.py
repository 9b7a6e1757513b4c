"""Permanent zeros and CSR inference for pruned models (CPU)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.core.targets import parameter_aliases


def make_permanent(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Zero the masked entries of ``model``'s parameters in place and return it: a plain module that needs no
    callback state (a pat-callbacks model already is one; pass ``pruning.store.masks`` to apply them again).
    A tied parameter may be named by any of its names.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> _ = make_permanent(layer, {"weight": torch.tensor([[True, False], [False, True]])})
        >>> (layer.weight == 0).tolist()
        [[False, True], [True, False]]
    """
    params = dict(model.named_parameters())
    aliases = parameter_aliases(model)
    with torch.no_grad():
        for name, mask in (masks or {}).items():
            if name not in aliases:
                sample = ", ".join(list(params)[:6]) + (", ..." if len(params) > 6 else "")
                raise ValueError(
                    f"Mask for {name!r}, which is not a parameter of {type(model).__name__} (parameters: {sample})"
                )
            param = params[aliases[name]]
            param.mul_(mask.to(param.device, torch.bool).to(param.dtype))
    return model


class SparseLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is a CSR tensor: ``y = x W^T + b`` by a sparse x dense product.

    On a CPU it beats the dense product above roughly 75% sparsity (3x at 90% for 2048x2048, batch 64; see
    ``bench/export.py``). Built from a trained layer with :func:`to_sparse_inference`.

    Example:
        >>> dense = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     _ = dense.weight.mul_(torch.rand(4, 8) > 0.8)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(SparseLinear(dense)(x), dense(x), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = (self.weight @ flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


# Modules whose forward (or fused fast path) reads their Linear children's weights directly: their Linear layers
# are left dense, since a CSR weight there would break the kernel (e.g. aten::_transformer_encoder_layer_fwd).
FUSED_READERS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def to_sparse_inference(
    model: nn.Module,
    min_sparsity: float = 0.75,
    example_inputs: Any = None,
    atol: float = 1e-5,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` at least ``min_sparsity`` sparse by a :class:`SparseLinear` with the
    same outputs; return the model (for CPU inference; call ``model.eval()`` first).

    Linear layers inside :data:`FUSED_READERS` (attention, ``nn.Transformer*Layer``) are left as they are: their
    fused kernels read the weights directly. With ``example_inputs``, the converted model's outputs are checked
    against the original's (``RuntimeError`` naming the difference if they disagree).

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(torch.rand(16, 16) > 0.9)
        >>> [type(m).__name__ for m in to_sparse_inference(model, example_inputs=torch.randn(2, 16))]
        ['SparseLinear', 'ReLU', 'Linear']
    """
    with torch.no_grad():
        expected = model(example_inputs) if example_inputs is not None else None
        _replace_sparse_linears(model, min_sparsity)
        if expected is not None:
            got = model(example_inputs)
            if not _allclose(got, expected, atol):
                raise RuntimeError(
                    f"to_sparse_inference changed the outputs of {type(model).__name__} (max abs difference "
                    f"{_max_difference(got, expected):.3g} > atol={atol}); please report this model"
                )
    return model


def _replace_sparse_linears(module: nn.Module, min_sparsity: float) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, FUSED_READERS):
            _replace_sparse_linears_below(child, min_sparsity)
        elif isinstance(child, nn.Linear):
            if float((child.weight == 0).float().mean()) >= min_sparsity:
                setattr(module, name, SparseLinear(child))
        else:
            _replace_sparse_linears(child, min_sparsity)


def _replace_sparse_linears_below(fused: nn.Module, min_sparsity: float) -> None:
    """Inside a fused reader, only modules that are not its direct Linear children may be converted."""
    for child in fused.children():
        if not isinstance(child, (nn.Linear, *FUSED_READERS)):
            _replace_sparse_linears(child, min_sparsity)


def _outputs(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if hasattr(value, "logits"):
        return [value.logits]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    return []


def _allclose(got: Any, expected: Any, atol: float) -> bool:
    pairs = list(zip(_outputs(got), _outputs(expected), strict=False))
    return bool(pairs) and all(torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4) for a, b in pairs)


def _max_difference(got: Any, expected: Any) -> float:
    pairs = zip(_outputs(got), _outputs(expected), strict=False)
    return max((float((a.float() - b.float()).abs().max()) for a, b in pairs), default=float("nan"))
