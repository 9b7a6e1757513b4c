"""Export pruned models: permanent zeros and compressed sparse checkpoints.

A pruned model trained with pat-callbacks is already a plain module (no hooks, no ``weight_orig``); what export
adds is storage that pays for the zeros. Each floating tensor that is sparse enough is stored in the smaller of
two exact encodings:

- ``bitmask``: one bit per entry (``numpy.packbits``) + the non-zero values;
- ``csr``: compressed rows with the smallest integer dtype that holds the column indices and row pointers.

At 90% sparsity a float32 weight takes about 13% of its dense bytes (bitmask: 1/32 + 10%). Files load with
``torch.load(weights_only=True)``.

Example:
    >>> import torch, tempfile, os
    >>> weight = torch.randn(256, 256) * (torch.rand(256, 256) > 0.9)
    >>> path = os.path.join(tempfile.mkdtemp(), "sparse.pt")
    >>> report = save_sparse({"w": weight}, path)
    >>> torch.equal(load_sparse(path)["w"], weight), report.ratio < 0.15
    (True, True)
"""

from __future__ import annotations

import argparse
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pat_callbacks.targets import parameter_aliases

__all__ = [
    "FUSED_READERS",
    "SizeReport",
    "SparseLinear",
    "compress_state_dict",
    "decompress_state_dict",
    "load_sparse",
    "main",
    "make_permanent",
    "save_sparse",
    "to_semi_structured",
    "to_sparse_inference",
]

FORMAT_VERSION = 1


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


def _index_dtype(limit: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _bitmask(tensor: Tensor) -> dict[str, Any]:
    nonzero = tensor != 0
    bits = np.packbits(nonzero.reshape(-1).numpy().astype(np.uint8))
    return {"format": "bitmask", "bits": torch.from_numpy(bits), "values": tensor[nonzero].clone()}


def _csr(tensor: Tensor) -> dict[str, Any]:
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    nonzero = rows != 0
    row_counts = nonzero.sum(1)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), row_counts.cumsum(0)])
    cols = nonzero.nonzero()[:, 1]
    return {
        "format": "csr",
        "crow": crow.to(_index_dtype(int(crow[-1]))),
        "cols": cols.to(_index_dtype(max(rows.shape[1] - 1, 0))),
        "values": rows[nonzero].clone(),
    }


def _nbytes(encoded: Mapping[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in encoded.values() if isinstance(v, Tensor))


def compress_state_dict(state_dict: Mapping[str, Tensor], min_sparsity: float = 0.3) -> dict[str, Any]:
    """Encode every floating tensor with at least ``min_sparsity`` zeros in its smaller sparse format; a tensor
    that shares its storage with an earlier one (tied weights) is stored once.

    Example:
        >>> sd = {"w": torch.tensor([[0.0, 1.5, 0.0, 0.0]] * 8), "b": torch.ones(4)}
        >>> compressed = compress_state_dict(sd)
        >>> compressed["tensors"]["w"]["format"], compressed["tensors"]["b"]["format"]
        ('bitmask', 'dense')
    """
    tensors: dict[str, Any] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if tensor.numel() > 0 and key in seen:  # a tied weight: stored once, the other names point to it
            tensors[name] = {"format": "alias", "of": seen[key]}
            continue
        seen[key] = name
        tensor = tensor.detach().cpu()
        base = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        sparse_enough = tensor.is_floating_point() and tensor.numel() > 0
        sparse_enough = sparse_enough and float((tensor == 0).float().mean()) >= min_sparsity
        if not sparse_enough:
            tensors[name] = {**base, "format": "dense", "tensor": tensor.clone()}
            continue
        candidates = [_bitmask(tensor), _csr(tensor)]
        best = min(candidates, key=_nbytes)
        if _nbytes(best) >= tensor.numel() * tensor.element_size():
            best = {"format": "dense", "tensor": tensor.clone()}
        tensors[name] = {**base, **best}
    return {"pat_callbacks_sparse": FORMAT_VERSION, "tensors": tensors}


def decompress_state_dict(compressed: Mapping[str, Any]) -> dict[str, Tensor]:
    """Exact inverse of :func:`compress_state_dict`.

    Example:
        >>> sd = {"w": torch.tensor([[0.0, 2.0], [3.0, 0.0]])}
        >>> torch.equal(decompress_state_dict(compress_state_dict(sd, min_sparsity=0.0))["w"], sd["w"])
        True
    """
    if compressed.get("pat_callbacks_sparse") != FORMAT_VERSION:
        raise ValueError(f"Not a pat-callbacks sparse checkpoint (format {compressed.get('pat_callbacks_sparse')!r})")
    out = {}
    for name, item in compressed["tensors"].items():
        if item["format"] == "alias":
            out[name] = out[item["of"]]
            continue
        shape, dtype = tuple(item["shape"]), getattr(torch, item["dtype"])
        if item["format"] == "dense":
            out[name] = item["tensor"]
            continue
        numel = int(np.prod(shape)) if shape else 1
        flat = torch.zeros(numel, dtype=dtype)
        if item["format"] == "bitmask":
            bits = np.unpackbits(item["bits"].numpy(), count=numel).astype(bool)
            flat[torch.from_numpy(bits)] = item["values"]
        elif item["format"] == "csr":
            row_length = numel // max(shape[0], 1) if len(shape) > 1 else numel
            crow = item["crow"].long()
            rows = torch.repeat_interleave(torch.arange(len(crow) - 1), crow[1:] - crow[:-1])
            flat[rows * row_length + item["cols"].long()] = item["values"]
        else:
            raise ValueError(f"Unknown tensor format {item['format']!r} for {name!r}")
        out[name] = flat.reshape(shape)
    return out


@dataclass(frozen=True)
class SizeReport:
    """Bytes of the sparse file and of the same state dict saved densely with ``torch.save``.

    Example:
        >>> SizeReport(sparse_bytes=13, dense_bytes=100)
        SizeReport(sparse_bytes=13, dense_bytes=100)"""

    sparse_bytes: int
    dense_bytes: int

    @property
    def ratio(self) -> float:
        """``sparse_bytes / dense_bytes``.

        Example:
            >>> SizeReport(sparse_bytes=10, dense_bytes=100).ratio
            0.1
        """
        return self.sparse_bytes / self.dense_bytes


def save_sparse(state: Mapping[str, Tensor] | nn.Module, path: str | Path, min_sparsity: float = 0.3) -> SizeReport:
    """Write a compressed checkpoint of a state dict (or a module's) to ``path``; report its size vs dense.

    Example:
        >>> import tempfile, os
        >>> report = save_sparse(nn.Linear(64, 64), os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> report.ratio > 0.9  # nothing sparse: stored dense
        True
    """
    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    torch.save(compress_state_dict(state_dict, min_sparsity), path)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return SizeReport(sparse_bytes=Path(path).stat().st_size, dense_bytes=buffer.getbuffer().nbytes)


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` (with ``torch.load(weights_only=True)``) as a dense state dict.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> _ = save_sparse({"w": torch.zeros(3)}, path)
        >>> load_sparse(path)["w"].tolist()
        [0.0, 0.0, 0.0]
    """
    return decompress_state_dict(torch.load(path, weights_only=True))


def main(argv: Sequence[str] | None = None) -> None:
    """``pat-export CHECKPOINT OUT``: a Lightning checkpoint's (or a state dict's) weights as a sparse file.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    parser = argparse.ArgumentParser(prog="pat-export", description=main.__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a Lightning .ckpt or a torch.save'd state dict")
    parser.add_argument("out", type=Path, help="where to write the compressed weights")
    parser.add_argument("--min-sparsity", type=float, default=0.3, help="store tensors at least this sparse sparsely")
    args = parser.parse_args(argv)
    try:
        loaded = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        parser.exit(1, f"pat-export: error: {args.checkpoint}: no such file\n")
    except Exception as error:  # truncated, empty or not a torch file: one line, not a traceback
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.exit(1, f"pat-export: error: {args.checkpoint} is not a readable checkpoint ({reason})\n")
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        parser.exit(1, f"pat-export: error: {args.checkpoint} holds no state dict of tensors\n")
    report = save_sparse(state_dict, args.out, args.min_sparsity)
    print(f"wrote {args.out}: {report.sparse_bytes} bytes, {report.ratio:.3f} of the dense {report.dense_bytes}")


if __name__ == "__main__":
    main()
