"""Export pruned models: permanent zeros and compressed sparse checkpoints.

A pruned model trained with pat-callbacks is already a plain module (no hooks, no ``weight_orig``); what export
adds is storage that pays for the zeros. Each floating tensor that is sparse enough is stored in the smaller of
two exact encodings:

- ``bitmask``: one bit per entry (``numpy.packbits``) + the non-zero values;
- ``csr``: compressed rows with the smallest integer dtype that holds the column indices and row pointers.

At 90% sparsity a float32 weight takes about 13% of its dense bytes (bitmask: 1/32 + 10%). The round trip is
bit-exact: zeros that are ``-0.0`` (what multiplying a negative weight by a mask leaves) get one more bit per zero
(about +3% of dense at 90%), written only for a tensor that has one; ``keep_zero_signs=False`` stores every zero
as ``+0.0`` instead. Files are read with ``torch.load(weights_only=True)`` (no code runs from a crafted file) and
every field is checked before it is used: a crafted or truncated file is a one-line ``ValueError`` naming it.

Example:
    >>> import torch, tempfile, os
    >>> weight = torch.randn(256, 256) * (torch.rand(256, 256) > 0.9)
    >>> path = os.path.join(tempfile.mkdtemp(), "sparse.pt")
    >>> report = save_sparse({"w": weight}, path)
    >>> torch.equal(load_sparse(path)["w"], weight), report.ratio < 0.2  # 0.13 with keep_zero_signs=False
    (True, True)
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FORMAT_VERSION = 1
# The dtypes a stored tensor may name (a crafted name must not reach getattr(torch, ...)).
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    )
}  # fmt: skip


def _index_dtype(limit: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _pack(flags: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(flags.reshape(-1).numpy().astype(np.uint8)))


def _zero_signs(tensor: Tensor) -> dict[str, Any]:
    """``{"neg_zeros": bits}``: which of the tensor's zeros (in order) are ``-0.0``; empty when none is."""
    zeros = tensor.reshape(-1)[tensor.reshape(-1) == 0]
    negative = torch.signbit(zeros)
    return {"neg_zeros": _pack(negative)} if bool(negative.any()) else {}


def _bitmask(tensor: Tensor) -> dict[str, Any]:
    nonzero = tensor != 0
    return {"format": "bitmask", "bits": _pack(nonzero), "values": tensor[nonzero].clone()}


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


def compress_state_dict(
    state_dict: Mapping[str, Tensor], min_sparsity: float = 0.3, keep_zero_signs: bool = True
) -> dict[str, Any]:
    """Encode every floating tensor with at least ``min_sparsity`` zeros in its smaller sparse format; a tensor
    that shares its storage with an earlier one (tied weights) is stored once.

    Args:
        state_dict: names to tensors.
        min_sparsity: tensors with fewer zeros than this fraction are stored dense, in [0, 1].
        keep_zero_signs: store which zeros are ``-0.0`` (one bit per zero, only for tensors that have one), so the
            round trip is bit-exact; ``False`` decodes every zero as ``+0.0`` (a smaller file).

    Example:
        >>> sd = {"w": torch.tensor([[0.0, 1.5, 0.0, -0.0]] * 8), "b": torch.ones(4)}
        >>> compressed = compress_state_dict(sd)
        >>> compressed["tensors"]["w"]["format"], compressed["tensors"]["b"]["format"]
        ('bitmask', 'dense')
        >>> decompress_state_dict(compressed)["w"][0].tolist()
        [0.0, 1.5, 0.0, -0.0]
    """
    if not isinstance(min_sparsity, (int, float)) or isinstance(min_sparsity, bool) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"Expected `min_sparsity` to be a float in [0, 1], but got {min_sparsity!r}")
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
        signs = _zero_signs(tensor) if keep_zero_signs else {}
        if _nbytes(best) + _nbytes(signs) >= tensor.numel() * tensor.element_size():
            best, signs = {"format": "dense", "tensor": tensor.clone()}, {}
        tensors[name] = {**base, **best, **signs}
    return {"pat_callbacks_sparse": FORMAT_VERSION, "tensors": tensors}


def _fail(name: str, problem: str) -> ValueError:
    return ValueError(f"tensor {name!r}: {problem}")


def _tensor(item: Mapping[str, Any], key: str, name: str, dtype: torch.dtype | None = None) -> Tensor:
    value = item.get(key)
    if not isinstance(value, Tensor) or value.layout != torch.strided:
        raise _fail(name, f"field {key!r} is not a dense tensor ({type(value).__name__})")
    if dtype is not None and value.dtype != dtype:
        raise _fail(name, f"field {key!r} has dtype {value.dtype}, expected {dtype}")
    return value


def _shape_dtype(item: Mapping[str, Any], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    shape = item.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        raise _fail(name, f"shape {shape!r} is not a list of non-negative integers")
    dtype = _DTYPES.get(item.get("dtype")) if isinstance(item.get("dtype"), str) else None
    if dtype is None:
        raise _fail(name, f"dtype {item.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    return tuple(shape), dtype


def _indices(item: Mapping[str, Any], key: str, name: str) -> Tensor:
    value = _tensor(item, key, name)
    if value.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64) or value.dim() != 1:
        raise _fail(name, f"field {key!r} is not a 1-D integer tensor")
    return value.long()


def _decode_sparse(item: Mapping[str, Any], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The dense tensor of a checked ``bitmask`` or ``csr`` entry (``-0.0`` zeros restored when stored)."""
    numel = math.prod(shape)
    values = _tensor(item, "values", name, dtype)
    if values.dim() != 1:
        raise _fail(name, "field 'values' is not 1-D")
    if item["format"] == "bitmask":
        bits = _tensor(item, "bits", name, torch.uint8)
        if bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
            raise _fail(name, f"holds {bits.numel()} bitmask bytes for {numel} entries")
        stored = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
    else:  # csr
        rows = shape[0] if len(shape) > 1 else 1
        row_length = numel // rows if rows else 0
        crow, cols = _indices(item, "crow", name), _indices(item, "cols", name)
        if crow.numel() != rows + 1 or int(crow[0]) != 0 or bool((crow[1:] < crow[:-1]).any()):
            raise _fail(name, f"row pointers are not {rows + 1} non-decreasing offsets from 0")
        if int(crow[-1]) != cols.numel() or (cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= row_length)):
            raise _fail(name, f"column indices do not fit {rows} rows of {row_length}")
        positions = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1]) * row_length + cols
        stored = torch.zeros(numel, dtype=torch.bool)
        stored[positions] = True
        if int(stored.sum()) != positions.numel():
            raise _fail(name, "column indices repeat within a row")
    if int(stored.sum()) != values.numel():
        raise _fail(name, f"holds {values.numel()} values for {int(stored.sum())} stored positions")
    flat = torch.zeros(numel, dtype=dtype)
    flat[stored] = values
    if "neg_zeros" in item:
        zeros = (~stored).nonzero().squeeze(1)
        signs = _tensor(item, "neg_zeros", name, torch.uint8)
        if signs.dim() != 1 or signs.numel() != (zeros.numel() + 7) // 8:
            raise _fail(name, f"holds {signs.numel()} zero-sign bytes for {zeros.numel()} zeros")
        negative = torch.from_numpy(np.unpackbits(signs.numpy(), count=zeros.numel()).astype(bool))
        flat[zeros[negative]] = -0.0
    return flat.reshape(shape)


def decompress_state_dict(compressed: Mapping[str, Any]) -> dict[str, Tensor]:
    """Exact inverse of :func:`compress_state_dict`; every field is checked (a crafted or damaged entry is a
    ``ValueError`` naming the tensor, never a bare ``KeyError`` or an out-of-bounds write).

    Example:
        >>> sd = {"w": torch.tensor([[0.0, 2.0], [3.0, 0.0]])}
        >>> torch.equal(decompress_state_dict(compress_state_dict(sd, min_sparsity=0.0))["w"], sd["w"])
        True
        >>> decompress_state_dict({"pat_callbacks_sparse": 1, "tensors": {"w": {"format": "zip"}}})
        Traceback (most recent call last):
        ...
        ValueError: tensor 'w': unknown format 'zip' (expected alias, bitmask, csr or dense)
    """
    if not isinstance(compressed, Mapping) or compressed.get("pat_callbacks_sparse") != FORMAT_VERSION:
        found = compressed.get("pat_callbacks_sparse") if isinstance(compressed, Mapping) else type(compressed)
        raise ValueError(f"Not a pat-callbacks sparse checkpoint (format {found!r})")
    tensors = compressed.get("tensors")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"Not a pat-callbacks sparse checkpoint ('tensors' is a {type(tensors).__name__})")
    out: dict[str, Tensor] = {}
    for name, item in tensors.items():
        if not isinstance(item, Mapping):
            raise _fail(name, f"entry is a {type(item).__name__}, not a mapping")
        kind = item.get("format")
        if kind == "alias":
            if item.get("of") not in out:
                raise _fail(name, f"is an alias of {item.get('of')!r}, which is not an earlier tensor")
            out[name] = out[item["of"]]
            continue
        if kind not in ("bitmask", "csr", "dense"):
            raise _fail(name, f"unknown format {kind!r} (expected alias, bitmask, csr or dense)")
        shape, dtype = _shape_dtype(item, name)
        if kind == "dense":
            tensor = _tensor(item, "tensor", name, dtype)
            if tuple(tensor.shape) != shape:
                raise _fail(name, f"dense tensor of shape {tuple(tensor.shape)}, expected {shape}")
            out[name] = tensor
        else:
            out[name] = _decode_sparse(item, name, shape, dtype)
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


def save_sparse(
    state: Mapping[str, Tensor] | nn.Module, path: str | Path, min_sparsity: float = 0.3, keep_zero_signs: bool = True
) -> SizeReport:
    """Write a compressed checkpoint of a state dict (or a module's) to ``path``; report its size vs dense.

    ``min_sparsity`` and ``keep_zero_signs``: see :func:`compress_state_dict`.

    Example:
        >>> import tempfile, os
        >>> report = save_sparse(nn.Linear(64, 64), os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> report.ratio > 0.9  # nothing sparse: stored dense
        True
    """
    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    torch.save(compress_state_dict(state_dict, min_sparsity, keep_zero_signs), path)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return SizeReport(sparse_bytes=Path(path).stat().st_size, dense_bytes=buffer.getbuffer().nbytes)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with one-line errors naming the file.

    ``weights_only=True`` unpickles tensors and plain containers only, so a crafted file cannot run code; a file
    holding other Python objects is refused with the way out for a file you trust.

    Raises:
        FileNotFoundError: ``path`` does not exist or is a folder.
        ValueError: the file is empty, truncated, not a torch file, or holds objects ``weights_only`` refuses.

    Example:
        >>> read_checkpoint("no/such.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no/such.pt: no such file
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:  # garbage bytes ("Unsupported operand 103"), not a refused object
            found = re.search(r"Unsupported [^\n.]*", str(error))
            reason = found.group(0).strip() if found else _first_line(error)
            raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
        first = f"found {refused.group(1)}"
        raise ValueError(
            f"{path} holds Python objects besides tensors and containers, which torch.load(weights_only=True) "
            f"refuses ({first}); if you trust the file, re-save its weights: "
            f"torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'weights.pt')"
        ) from None
    except Exception as error:  # empty, truncated, not a torch file: one line, not a traceback
        raise ValueError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` (with ``torch.load(weights_only=True)``) as a dense state dict.

    A missing, truncated or crafted file raises ``FileNotFoundError`` / ``ValueError`` with one line naming it.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> _ = save_sparse({"w": torch.zeros(3)}, path)
        >>> load_sparse(path)["w"].tolist()
        [0.0, 0.0, 0.0]
    """
    loaded = read_checkpoint(path)
    try:
        return decompress_state_dict(loaded)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
