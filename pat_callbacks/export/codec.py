"""One entry of a pat-callbacks checkpoint: how a tensor is stored, and how it is read back, every field checked.

An entry (a plain mapping, read with ``torch.load(weights_only=True)``) holds

- ``shape``, ``dtype``: those of the tensor it decodes to;
- ``format``: which positions are stored: ``dense`` (all of them), ``bitmask`` (``bits``: one bit per entry,
  ``numpy.packbits``) or ``csr`` (``crow``, ``cols``: compressed rows, in the smallest integer dtype that holds
  them); the writer picks the smallest of the three;
- ``values``: the stored positions' values in order (1-D), in ``dtype``;
- ``neg_zeros`` (optional, sparse formats): which of the zeros not stored are ``-0.0``, one bit each, so the round
  trip is bit-exact;
- ``quant`` (optional): a :class:`~pat_callbacks.recovery.quantization.QuantSpec` string (``"int8"``,
  ``"int4:g32"``), with ``scales`` (bf16, ``(channels, groups)``) and ``transposed`` (Hugging Face ``Conv1D``):
  ``values`` are then the int8 codes ``q`` of the stored positions (int4: packed two per byte, low nibble first,
  ``q + 8``), and the tensor is ``q · s`` (:func:`~pat_callbacks.recovery.quantization.dequantize_tensor`).

A tensor stored more than once (tied weights) is the checkpoint's business (:mod:`pat_callbacks.export.checkpoint`).

Example:
    >>> import torch
    >>> weight = torch.tensor([[0.0, 1.5, 0.0, -0.0]] * 8)
    >>> entry = encode_tensor(weight)
    >>> entry["format"], sorted(entry)
    ('bitmask', ['bits', 'dtype', 'format', 'neg_zeros', 'shape', 'values'])
    >>> decode_entry(entry, "w")[0].tolist()
    [0.0, 1.5, 0.0, -0.0]
    >>> q = encode_tensor(weight, quant=QuantSpec(bits=4))
    >>> q["quant"], q["values"].dtype, decode_entry(q, "w")[0].tolist()
    ('int4', torch.uint8, [0.0, 1.4970703125, 0.0, 0.0])
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pat_callbacks.recovery.quantization import QuantSpec, dequantize_tensor, quantize_tensor

__all__ = ["FORMATS", "decode_entry", "encode_tensor"]

FORMATS = ("alias", "bitmask", "csr", "dense")
# The dtypes a stored tensor may name (a crafted name must not reach getattr(torch, ...)).
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    )
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``: how an entry names its dtype.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return sys.intern(str(dtype).removeprefix("torch."))  # one object: pickled once per file, then referenced


# ------------------------------------------------------------------ writing
def _index_dtype(limit: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _pack(flags: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(flags.reshape(-1).numpy().astype(np.uint8)))


def _pack_int4(codes: Tensor) -> Tensor:
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _dense(tensor: Tensor) -> dict[str, Any]:
    return {"format": "dense", "values": tensor.reshape(-1).clone()}


def _bitmask(tensor: Tensor) -> dict[str, Any]:
    nonzero = tensor != 0
    return {"format": "bitmask", "bits": _pack(nonzero), "values": tensor[nonzero].clone()}


def _csr(tensor: Tensor) -> dict[str, Any]:
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    nonzero = rows != 0
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), nonzero.sum(1).cumsum(0)])
    cols = nonzero.nonzero()[:, 1]
    return {
        "format": "csr",
        "crow": crow.to(_index_dtype(int(crow[-1]))),
        "cols": cols.to(_index_dtype(max(rows.shape[1] - 1, 0))),
        "values": rows[nonzero].clone(),
    }


def _zero_signs(tensor: Tensor) -> dict[str, Any]:
    """``{"neg_zeros": bits}``: which of the tensor's zeros (in order) are ``-0.0``; empty when none is."""
    zeros = tensor.reshape(-1)[tensor.reshape(-1) == 0]
    negative = torch.signbit(zeros)
    return {"neg_zeros": _pack(negative)} if bool(negative.any()) else {}


def _nbytes(entry: Mapping[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, Tensor))


def encode_tensor(
    tensor: Tensor,
    *,
    min_sparsity: float = 0.3,
    keep_zero_signs: bool = True,
    quant: QuantSpec | None = None,
    transposed: bool = False,
) -> dict[str, Any]:
    """The entry of ``tensor``: dense, or, when at least ``min_sparsity`` of its values are zero, the smallest of
    dense, bitmask and CSR; with ``quant`` its quantized codes are what is stored (see the module docstring).

    Example:
        >>> encode_tensor(torch.ones(4))["format"], encode_tensor(torch.zeros(50, 400))["format"]
        ('dense', 'csr')
    """
    tensor = tensor.detach().cpu()
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    stored, signs = tensor, {}
    if quant is not None:
        if not tensor.is_floating_point():
            raise ValueError(f"Only floating tensors are quantized, but got dtype {tensor.dtype}")
        stored, scales = quantize_tensor(tensor, quant, transposed=transposed)  # its dtype: see _scales
        entry.update(quant=sys.intern(str(quant)), scales=scales, transposed=bool(transposed))
    candidates = [_dense(stored)]
    sparse_able = (quant is not None or stored.is_floating_point()) and stored.numel() > 0
    if sparse_able and float((stored == 0).float().mean()) >= min_sparsity:
        signs = _zero_signs(stored) if keep_zero_signs and quant is None else {}
        candidates += [{**_bitmask(stored), **signs}, {**_csr(stored), **signs}]
    if quant is not None and quant.bits == 4:
        candidates = [{**candidate, "values": _pack_int4(candidate["values"])} for candidate in candidates]
    return {**entry, **min(candidates, key=_nbytes)}  # on a tie: dense, then bitmask


# ------------------------------------------------------------------ reading
def entry_error(name: str, problem: str) -> ValueError:
    """The error of an entry: ``tensor 'NAME': PROBLEM``.

    Example:
        >>> entry_error("w", "field 'bits' is missing")
        ValueError("tensor 'w': field 'bits' is missing")
    """
    return ValueError(f"tensor {name!r}: {problem}")


def entry_field(item: Mapping[str, Any], key: str, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """The field ``key`` of an entry, checked to be a dense tensor (of ``dtype`` when given).

    Example:
        >>> entry_field({"bits": [1, 0]}, "bits", "w")
        Traceback (most recent call last):
        ...
        ValueError: tensor 'w': field 'bits' is not a dense tensor (list)
    """
    value = item.get(key)
    if not isinstance(value, Tensor) or value.layout != torch.strided:
        raise entry_error(name, f"field {key!r} is not a dense tensor ({type(value).__name__})")
    if dtype is not None and value.dtype != dtype:
        raise entry_error(name, f"field {key!r} has dtype {value.dtype}, expected {dtype}")
    return value


def _vector(item: Mapping[str, Any], key: str, name: str, dtype: torch.dtype | None = None) -> Tensor:
    value = entry_field(item, key, name, dtype)
    if value.dim() != 1:
        raise entry_error(name, f"field {key!r} is not 1-D")
    return value


def shape_dtype(item: Mapping[str, Any], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """The checked ``shape`` and ``dtype`` fields of an entry.

    Example:
        >>> shape_dtype({"shape": [2, -1], "dtype": "float32"}, "w")
        Traceback (most recent call last):
        ...
        ValueError: tensor 'w': shape [2, -1] is not a list of non-negative integers
    """
    shape = item.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        raise entry_error(name, f"shape {shape!r} is not a list of non-negative integers")
    dtype = _DTYPES.get(item.get("dtype")) if isinstance(item.get("dtype"), str) else None
    if dtype is None:
        raise entry_error(name, f"dtype {item.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    return tuple(shape), dtype


def _indices(item: Mapping[str, Any], key: str, name: str) -> Tensor:
    value = _vector(item, key, name)
    if value.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise entry_error(name, f"field {key!r} is not a 1-D integer tensor")
    return value.long()


def _unpack(bits: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(bool))


def _stored(item: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> Tensor | None:
    """Which positions the entry stores (``None``: all of them, a dense entry)."""
    numel = math.prod(shape)
    if item["format"] == "dense":
        return None
    if item["format"] == "bitmask":
        bits = _vector(item, "bits", name, torch.uint8)
        if bits.numel() != (numel + 7) // 8:
            raise entry_error(name, f"holds {bits.numel()} bitmask bytes for {numel} entries")
        return _unpack(bits, numel)
    rows = shape[0] if len(shape) > 1 else 1  # csr
    row_length = numel // rows if rows else 0
    crow, cols = _indices(item, "crow", name), _indices(item, "cols", name)
    if crow.numel() != rows + 1 or int(crow[0]) != 0 or bool((crow[1:] < crow[:-1]).any()):
        raise entry_error(name, f"row pointers are not {rows + 1} non-decreasing offsets from 0")
    if int(crow[-1]) != cols.numel() or (cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= row_length)):
        raise entry_error(name, f"column indices do not fit {rows} rows of {row_length}")
    positions = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1]) * row_length + cols
    stored = torch.zeros(numel, dtype=torch.bool)
    stored[positions] = True
    if int(stored.sum()) != positions.numel():
        raise entry_error(name, "column indices repeat within a row")
    return stored


def _quant(item: Mapping[str, Any], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> QuantSpec | None:
    """The checked ``quant`` field (and its ``scales`` / ``transposed``), ``None`` for a plain entry."""
    if "quant" not in item:
        return None
    try:
        spec = QuantSpec.parse(item["quant"])
    except ValueError as error:
        raise entry_error(name, f"field 'quant': {error}") from None
    if not dtype.is_floating_point or len(shape) < 2:
        raise entry_error(
            name, f"is quantized ({spec}) but is not a floating weight of 2+ dimensions ({dtype}, {shape})"
        )
    if not isinstance(item.get("transposed"), bool):
        raise entry_error(name, f"field 'transposed' is {item.get('transposed')!r}, not True or False")
    channels, inputs = shape[0], math.prod(shape[1:])
    if item["transposed"]:
        channels, inputs = inputs, channels
    if spec.group_size and inputs % spec.group_size:
        raise entry_error(name, f"field 'quant' {spec}: the group size does not divide the {inputs} inputs")
    groups = inputs // spec.group_size if spec.group_size else 1
    scales = entry_field(item, "scales", name, torch.bfloat16)
    if tuple(scales.shape) != (channels, groups):
        raise entry_error(name, f"field 'scales' has shape {tuple(scales.shape)}, expected {(channels, groups)}")
    return spec


def _codes(item: Mapping[str, Any], name: str, spec: QuantSpec, count: int) -> Tensor:
    """The int8 codes of the stored positions (int4 unpacked), each in ``[-qmax, qmax]``."""
    if spec.bits == 8:
        codes = _vector(item, "values", name, torch.int8)
        packed = codes.numel()
    else:
        packed = _vector(item, "values", name, torch.uint8)
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count].to(torch.int16) - 8
        packed = packed.numel()
    if packed != (count if spec.bits == 8 else (count + 1) // 2):
        raise entry_error(name, f"holds {packed} bytes of {spec} values for {count} stored positions")
    if codes.numel() and int(codes.abs().max()) > spec.qmax:
        raise entry_error(name, f"field 'values' holds codes outside [-{spec.qmax}, {spec.qmax}] for {spec}")
    return codes.to(torch.int8)


def decode_entry(item: Mapping[str, Any], name: str) -> Tensor:
    """The tensor of a (non-alias) entry; every field is checked first: a crafted or damaged entry is a
    ``ValueError`` naming the tensor and the field, never a bare ``KeyError`` or an out-of-bounds write.

    Example:
        >>> decode_entry({"format": "zip"}, "w")
        Traceback (most recent call last):
        ...
        ValueError: tensor 'w': unknown format 'zip' (expected alias, bitmask, csr or dense)
    """
    if not isinstance(item, Mapping):
        raise entry_error(name, f"entry is a {type(item).__name__}, not a mapping")
    if item.get("format") not in FORMATS[1:]:
        raise entry_error(name, f"unknown format {item.get('format')!r} (expected alias, bitmask, csr or dense)")
    shape, dtype = shape_dtype(item, name)
    numel = math.prod(shape)
    spec = _quant(item, name, shape, dtype)
    stored = _stored(item, name, shape)
    count = numel if stored is None else int(stored.sum())
    values = _codes(item, name, spec, count) if spec is not None else _vector(item, "values", name, dtype)
    if values.numel() != count:
        raise entry_error(name, f"holds {values.numel()} values for {count} stored positions")
    if stored is None:
        flat = values
    else:
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[stored] = values
    if spec is not None:
        weight = dequantize_tensor(flat.reshape(shape), item["scales"], spec, transposed=item["transposed"])
        flat = weight.to(dtype).reshape(-1)
    if stored is not None and "neg_zeros" in item:
        zeros = (~stored).nonzero().squeeze(1)
        signs = _vector(item, "neg_zeros", name, torch.uint8)
        if signs.numel() != (zeros.numel() + 7) // 8:
            raise entry_error(name, f"holds {signs.numel()} zero-sign bytes for {zeros.numel()} zeros")
        flat[zeros[_unpack(signs, zeros.numel())]] = -0.0
    return flat.reshape(shape)
