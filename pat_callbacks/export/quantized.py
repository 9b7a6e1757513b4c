"""Sparse + quantized checkpoints: int8 / int4 values of the non-zero weights, a bitmask, and bf16 scales.

Each quantized weight is stored as

- ``bits``: one bit per entry (``numpy.packbits``), set where the quantized value is non-zero (a pruned weight,
  or a kept one that rounds to zero, costs one bit);
- ``q``: the non-zero quantized values, int8, or int4 packed two per byte (low nibble first, ``q + 8``);
- ``scales``: bf16, one per output channel or per group (see :mod:`pat_callbacks.recovery.quantization`).

With ``sparse=False`` the bitmask is left out and every value is stored (quantized only). Every other tensor
(embeddings, norms, biases) is stored as it is; a tied weight once. Loading gives back exactly the dequantized
weights ``q · s`` that fake-quantized training used (:func:`~pat_callbacks.recovery.quantization.fake_quantize`),
and, since that quantization is idempotent, exactly the weights of a model finalized by QAT. Files load with
``torch.load(weights_only=True)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pat_callbacks.recovery.quantization import QuantSpec, fake_quantize
    >>> torch.manual_seed(0) and None
    >>> layer = nn.Linear(64, 8)
    >>> with torch.no_grad():
    ...     _ = layer.weight.mul_(torch.rand(8, 64) > 0.75)                  # 75% pruned
    >>> packed = quantize_state_dict(layer, "int4:g32")
    >>> loaded = dequantize_state_dict(packed)
    >>> torch.equal(loaded["weight"], fake_quantize(layer.weight, QuantSpec(bits=4, group_size=32)))
    True
    >>> state_bytes(packed) < 0.15 * state_bytes({"weight": layer.weight, "bias": layer.bias})
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pat_callbacks.core.targets import select_parameters, target_roles
from pat_callbacks.recovery.quantization import QuantSpec, dequantize_tensor, quantize_tensor

__all__ = [
    "FORMAT_VERSION",
    "dequantize_state_dict",
    "load_quantized",
    "quantize_state_dict",
    "save_quantized",
    "state_bytes",
]

FORMAT_VERSION = 1


def _pack_int4(values: Tensor) -> Tensor:
    nibbles = (values.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_int4(packed: Tensor, count: int) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return (torch.stack([low, high], dim=1).reshape(-1)[:count].to(torch.int16) - 8).to(torch.int8)


def _encode(weight: Tensor, spec: QuantSpec, transposed: bool, sparse: bool) -> dict[str, Any]:
    q, scales = quantize_tensor(weight.detach().float().cpu(), spec, transposed=transposed)
    flat = q.reshape(-1)
    item: dict[str, Any] = {
        "format": "quantized",
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "transposed": bool(transposed),
        "scales": scales,
    }
    if sparse:
        nonzero = flat != 0
        item["bits"] = torch.from_numpy(np.packbits(nonzero.numpy().astype(np.uint8)))
        flat = flat[nonzero]
    item["count"] = int(flat.numel())
    item["q"] = _pack_int4(flat) if spec.bits == 4 else flat.clone()
    return item


def _decode(item: Mapping[str, Any], spec: QuantSpec) -> Tensor:
    shape, count = list(item["shape"]), int(item["count"])
    values = _unpack_int4(item["q"], count) if spec.bits == 4 else item["q"]
    numel = int(np.prod(shape))
    if "bits" in item:
        nonzero = torch.from_numpy(np.unpackbits(item["bits"].numpy(), count=numel).astype(bool))
        q = torch.zeros(numel, dtype=torch.int8)
        q[nonzero] = values
    else:
        q = values
    weight = dequantize_tensor(q.reshape(shape), item["scales"], spec, transposed=bool(item["transposed"]))
    return weight.to(getattr(torch, item["dtype"]))


def quantize_state_dict(
    model: nn.Module,
    spec: QuantSpec | str = "int8",
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    sparse: bool = True,
) -> dict[str, Any]:
    """The model's state_dict with its weight matrices quantized (by default those
    :func:`~pat_callbacks.core.targets.select_parameters` picks: Linear, Conv, MultiheadAttention, Conv1D).

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> sorted(quantize_state_dict(layer, "int8")["tensors"])
        ['bias', 'weight']
    """
    spec = QuantSpec.parse(spec)
    targets = select_parameters(model, include, exclude, include_frozen=True)
    roles = target_roles(model)
    by_id = {id(p): name for name, p in targets.items()}
    tensors: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:  # a tied tensor: stored once
            tensors[name] = {"format": "alias", "of": seen[key]}
            continue
        seen[key] = name
        if key in by_id:
            role = roles.get(by_id[key])
            tensors[name] = _encode(tensor, spec, bool(role and role.transposed), sparse)
        else:
            tensors[name] = {"format": "dense", "values": tensor.detach().cpu().clone()}
    return {"pat_callbacks_quantized": FORMAT_VERSION, "spec": str(spec), "tensors": tensors}


def dequantize_state_dict(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    """The plain state_dict of a :func:`quantize_state_dict` result (weights dequantized, ``q · s``).

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> state = dequantize_state_dict(quantize_state_dict(layer, "int8"))
        >>> torch.equal(state["bias"], layer.bias.detach()), state["weight"].shape
        (True, torch.Size([2, 4]))
    """
    version = packed.get("pat_callbacks_quantized")
    if version != FORMAT_VERSION:
        raise ValueError(f"Not a pat-callbacks quantized checkpoint of version {FORMAT_VERSION} (got {version!r})")
    spec = QuantSpec.parse(packed["spec"])
    out: dict[str, Tensor] = {}
    items = packed["tensors"]
    for name, item in items.items():
        if item["format"] == "dense":
            out[name] = item["values"]
        elif item["format"] == "quantized":
            out[name] = _decode(item, spec)
    for name, item in items.items():
        if item["format"] == "alias":
            out[name] = out[item["of"]]
    return {name: out[name] for name in items}


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors in a (nested) state: what a checkpoint holds besides pickle overhead; a tensor
    shared by several names counts once.

    Example:
        >>> state_bytes({"a": torch.zeros(4), "b": {"c": torch.zeros(2, dtype=torch.int8)}})
        18
    """
    seen: dict[int, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            seen[value.untyped_storage().data_ptr() or id(value)] = value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(state)
    return sum(seen.values())


def save_quantized(
    model: nn.Module, path: str | Path, spec: QuantSpec | str = "int8", *, sparse: bool = True, **kwargs: Any
) -> int:
    """Write :func:`quantize_state_dict` of ``model`` to ``path``; return the file's size in bytes.

    Example:
        >>> import tempfile
        >>> from pat_callbacks.recovery.quantization import fake_quantize
        >>> layer = nn.Linear(256, 256, bias=False)
        >>> path = Path(tempfile.mkdtemp()) / "layer.pt"
        >>> save_quantized(layer, path, "int8", sparse=False) < 256 * 256 * 4 / 3   # about a quarter of fp32
        True
        >>> torch.equal(load_quantized(path)["weight"], fake_quantize(layer.weight, QuantSpec(bits=8)))
        True
    """
    torch.save(quantize_state_dict(model, spec, sparse=sparse, **kwargs), path)
    return Path(path).stat().st_size


def load_quantized(path: str | Path) -> dict[str, Tensor]:
    """The dequantized state_dict of a file written by :func:`save_quantized` (``weights_only`` load).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "layer.pt"
        >>> _ = save_quantized(nn.Linear(8, 2), path, "int4")
        >>> sorted(load_quantized(path))
        ['bias', 'weight']
    """
    return dequantize_state_dict(torch.load(path, weights_only=True))
