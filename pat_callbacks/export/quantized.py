"""Sparse + quantized checkpoints: the checkpoint format of :mod:`pat_callbacks.export.checkpoint`, with the weight
matrices' entries quantized (a ``quant`` field such as ``"int8"`` or ``"int4:g32"``).

Each quantized weight stores its int8 codes (int4: packed two per byte) in the smallest of the format's encodings
(with a ``bitmask`` one bit per entry, set where the code is non-zero: a pruned weight, or a kept one that rounds
to zero, costs one bit) and bf16 scales, one per output channel or per group (see
:mod:`pat_callbacks.recovery.quantization`). With ``sparse=False`` every code is stored (quantized only). Every
other tensor (embeddings, norms, biases) is stored exactly; a tied weight once. Loading gives back exactly the
dequantized weights ``q · s`` that fake-quantized training used
(:func:`~pat_callbacks.recovery.quantization.fake_quantize`), and, since that quantization is idempotent, exactly
the weights of a model finalized by QAT. Files load with ``torch.load(weights_only=True)``, every field checked;
:func:`~pat_callbacks.export.checkpoint.load_sparse` reads them too.

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

import torch
from torch import Tensor, nn

from pat_callbacks.export.checkpoint import FORMAT_VERSION, compress_state_dict, decompress_state_dict, load_sparse
from pat_callbacks.recovery.quantization import QuantSpec, layer_specs, quantized_parameters

__all__ = [
    "FORMAT_VERSION",
    "dequantize_state_dict",
    "load_quantized",
    "quantize_state_dict",
    "save_quantized",
    "state_bytes",
]


def quantize_state_dict(
    model: nn.Module,
    spec: QuantSpec | str = "int8",
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    sparse: bool = True,
) -> dict[str, Any]:
    """:func:`~pat_callbacks.export.checkpoint.compress_state_dict` of the model's state_dict with its weight
    matrices quantized: those :func:`~pat_callbacks.recovery.quantization.quantized_parameters` picks, the weights
    QAT fake-quantizes (Linear, Conv, MultiheadAttention, Conv1D, frozen ones included), each with
    :meth:`~pat_callbacks.recovery.quantization.QuantSpec.for_inputs` of ``spec`` (per channel where the group size does
    not divide a weight's inputs), recorded per tensor in the file. ``sparse=False``: no sparse encoding (but of an
    all-zero tensor).

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> packed = quantize_state_dict(layer, "int8")
        >>> sorted(packed["tensors"]), packed["tensors"]["weight"]["quant"]
        (['bias', 'weight'], 'int8')
    """
    targets, transposed_targets = quantized_parameters(model, include, exclude)
    specs = layer_specs(targets, spec, transposed_targets)
    by_id = {id(p): name for name, p in targets.items()}
    state = model.state_dict(keep_vars=True)
    quantized = {name: by_id[id(tensor)] for name, tensor in state.items() if id(tensor) in by_id}
    transposed = [name for name, target in quantized.items() if target in transposed_targets]
    return compress_state_dict(
        state,
        0.0 if sparse else 1.0,
        quant={name: specs[target] for name, target in quantized.items()},
        transposed=transposed,
    )


def dequantize_state_dict(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    """The plain state_dict of a :func:`quantize_state_dict` result (weights dequantized, ``q · s``): the same
    reader as :func:`~pat_callbacks.export.checkpoint.decompress_state_dict`.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> state = dequantize_state_dict(quantize_state_dict(layer, "int8"))
        >>> torch.equal(state["bias"], layer.bias.detach()), state["weight"].shape
        (True, torch.Size([2, 4]))
    """
    return decompress_state_dict(packed)


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
    """The dequantized state_dict of a file written by :func:`save_quantized`: the same reader as
    :func:`~pat_callbacks.export.checkpoint.load_sparse` (``weights_only`` load, every field checked, errors naming
    the file).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "layer.pt"
        >>> _ = save_quantized(nn.Linear(8, 2), path, "int4")
        >>> sorted(load_quantized(path))
        ['bias', 'weight']
    """
    return load_sparse(path)
