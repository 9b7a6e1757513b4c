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

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FORMAT_VERSION = 1


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
