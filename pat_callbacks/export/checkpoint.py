"""Compressed checkpoints: one file format for pruned weights, sparse and optionally quantized.

A pruned model trained with pat-callbacks is already a plain module (no hooks, no ``weight_orig``); what export
adds is storage that pays for the zeros. A file is one header and one entry per tensor::

    {"format": "pat-callbacks", "version": 2, "tensors": {name: entry}}

Each entry (:mod:`pat_callbacks.export.codec`) stores its tensor in the smallest exact encoding (``dense``,
``bitmask``: one bit per entry + the non-zero values, or ``csr``: compressed rows with the smallest integer dtype
that holds the column indices and row pointers), optionally quantized (a ``quant`` field such as ``"int4:g32"``:
:func:`~pat_callbacks.export.quantized.save_quantized`); a tensor that shares its storage with an earlier one (tied
weights) is an ``alias`` entry naming it.

At 90% sparsity a float32 weight takes about 13% of its dense bytes (bitmask: 1/32 + 10%). The round trip is
bit-exact: zeros that are ``-0.0`` (what multiplying a negative weight by a mask leaves) get one more bit per zero
(about +3% of dense at 90%), written only for a tensor that has one; ``keep_zero_signs=False`` stores every zero
as ``+0.0`` instead. Files are read with ``torch.load(weights_only=True)`` (no code runs from a crafted file) and
every field is checked before it is used: a crafted or truncated file is a one-line ``ValueError`` naming it and
the field. Files of version 1 (the former separate formats of ``save_sparse`` and ``save_quantized``) still load.

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
import pickle
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pat_callbacks.export.codec import decode_entry, dtype_name, encode_tensor, entry_error, entry_field, shape_dtype
from pat_callbacks.recovery.quantization import QuantSpec

FORMAT_NAME = "pat-callbacks"
FORMAT_VERSION = 2
_V1_SPARSE, _V1_QUANTIZED = "pat_callbacks_sparse", "pat_callbacks_quantized"  # the headers of version 1


def _storage_key(tensor: Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """Equal for two tensors that are the same view of the same storage (tied weights)."""
    storage = tensor.untyped_storage().data_ptr()
    return storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride())


def compress_state_dict(
    state_dict: Mapping[str, Tensor],
    min_sparsity: float = 0.3,
    keep_zero_signs: bool = True,
    *,
    quant: Mapping[str, QuantSpec | str] | None = None,
    transposed: Collection[str] = (),
) -> dict[str, Any]:
    """The file's content: every tensor in its smallest exact encoding; a tensor that shares its storage with an
    earlier one (tied weights) is stored once.

    Args:
        state_dict: names to tensors.
        min_sparsity: tensors with fewer zeros than this fraction are stored dense, in [0, 1].
        keep_zero_signs: store which zeros are ``-0.0`` (one bit per zero, only for tensors that have one), so the
            round trip is bit-exact; ``False`` decodes every zero as ``+0.0`` (a smaller file).
        quant: names to their quantization (``"int8"``, ``"int4:g32"`` or a
            :class:`~pat_callbacks.recovery.quantization.QuantSpec`); those tensors decode to ``q · s``.
        transposed: quantized names whose weights are stored ``(inputs, outputs)`` (Hugging Face ``Conv1D``).

    Example:
        >>> sd = {"w": torch.tensor([[0.0, 1.5, 0.0, -0.0]] * 8), "b": torch.ones(4)}
        >>> compressed = compress_state_dict(sd)
        >>> compressed["tensors"]["w"]["format"], compressed["tensors"]["b"]["format"]
        ('bitmask', 'dense')
        >>> decompress_state_dict(compressed)["w"][0].tolist()
        [0.0, 1.5, 0.0, -0.0]
        >>> compress_state_dict(sd, quant={"w": "int4"})["tensors"]["w"]["quant"]
        'int4'
    """
    if not isinstance(min_sparsity, (int, float)) or isinstance(min_sparsity, bool) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"Expected `min_sparsity` to be a float in [0, 1], but got {min_sparsity!r}")
    specs = {name: QuantSpec.parse(spec) for name, spec in (quant or {}).items()}
    transposed = frozenset(transposed)
    unknown = sorted((set(specs) | transposed) - set(state_dict))
    if unknown:
        raise ValueError(f"`quant` / `transposed` name tensors that are not in the state dict: {unknown}")
    tensors: dict[str, Any] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = _storage_key(tensor)
        if tensor.numel() > 0 and key in seen:  # a tied weight: stored once, the other names point to it
            tensors[name] = {"format": "alias", "of": seen[key]}
            continue
        seen[key] = name
        tensors[name] = encode_tensor(
            tensor,
            min_sparsity=min_sparsity,
            keep_zero_signs=keep_zero_signs,
            quant=specs.get(name),
            transposed=name in transposed,
        )
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": tensors}


def _v1_entry(item: Any, name: str, spec: str | None) -> Any:
    """A version-1 entry as the entry of today (checked as such afterwards)."""
    if not isinstance(item, Mapping) or item.get("format") == "alias":
        return item
    if spec is None:  # a sparse file: its dense entries held the tensor itself
        if item.get("format") != "dense":
            return item
        shape, dtype = shape_dtype(item, name)
        tensor = entry_field(item, "tensor", name, dtype)
        if tuple(tensor.shape) != shape:
            raise entry_error(name, f"dense tensor of shape {tuple(tensor.shape)}, expected {shape}")
        return {**{k: v for k, v in item.items() if k != "tensor"}, "values": tensor.reshape(-1)}
    if item.get("format") == "dense":  # a quantized file: plain tensors held as they were
        tensor = entry_field(item, "values", name)
        return {"format": "dense", "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
                "values": tensor.reshape(-1)}  # fmt: skip
    if item.get("format") != "quantized":
        return item
    keep = {k: item[k] for k in ("shape", "dtype", "transposed", "scales", "bits") if k in item}
    return {**keep, "format": "bitmask" if "bits" in item else "dense", "quant": spec, "values": item.get("q")}


def _version(loaded: Any) -> str | None:
    """``"2"``, ``"1-sparse"`` or ``"1-quantized"``: which header ``loaded`` has (``None``: none of them)."""
    if not isinstance(loaded, Mapping):
        return None
    if (loaded.get("format"), loaded.get("version")) == (FORMAT_NAME, FORMAT_VERSION):
        return str(FORMAT_VERSION)
    return "1-sparse" if loaded.get(_V1_SPARSE) == 1 else "1-quantized" if loaded.get(_V1_QUANTIZED) == 1 else None


def _entries(compressed: Any) -> Mapping[str, Any]:
    """The checked header's ``{name: entry}`` (version-1 files converted)."""
    version = _version(compressed)
    if version is None:
        keys = ("format", "version", _V1_SPARSE, _V1_QUANTIZED)
        found = {k: compressed[k] for k in keys if k in compressed} if isinstance(compressed, Mapping) else {}
        what = f"header {found}" if found else f"no header: a {type(compressed).__name__}"
        raise ValueError(
            f"Not a pat-callbacks sparse checkpoint ({what}; this release reads "
            f"{{'format': {FORMAT_NAME!r}, 'version': {FORMAT_VERSION}}} and the version-1 files)"
        )
    tensors = compressed.get("tensors")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"Not a pat-callbacks sparse checkpoint ('tensors' is a {type(tensors).__name__})")
    if version == str(FORMAT_VERSION):
        return tensors
    spec = None
    if version == "1-quantized":
        try:
            spec = str(QuantSpec.parse(compressed.get("spec")))
        except ValueError as error:
            raise ValueError(f"field 'spec': {error}") from None
    return {name: _v1_entry(item, name, spec) for name, item in tensors.items()}


def is_checkpoint(loaded: Any) -> bool:
    """Whether ``loaded`` (what ``torch.load`` returned) has the header of a file this module writes or reads.

    Example:
        >>> is_checkpoint(compress_state_dict({"w": torch.zeros(2)})), is_checkpoint({"w": torch.zeros(2)})
        (True, False)
    """
    return _version(loaded) is not None


def decompress_state_dict(compressed: Mapping[str, Any]) -> dict[str, Tensor]:
    """Exact inverse of :func:`compress_state_dict` (quantized tensors: ``q · s``); every field is checked (a crafted
    or damaged entry is a ``ValueError`` naming the tensor and the field, never a bare ``KeyError`` or an
    out-of-bounds write). Reads the version-1 files of ``save_sparse`` and ``save_quantized`` too.

    Example:
        >>> sd = {"w": torch.tensor([[0.0, 2.0], [3.0, 0.0]])}
        >>> torch.equal(decompress_state_dict(compress_state_dict(sd, min_sparsity=0.0))["w"], sd["w"])
        True
        >>> decompress_state_dict({"format": "pat-callbacks", "version": 2, "tensors": {"w": {"format": "zip"}}})
        Traceback (most recent call last):
        ...
        ValueError: tensor 'w': unknown format 'zip' (expected alias, bitmask, csr or dense)
    """
    out: dict[str, Tensor] = {}
    for name, item in _entries(compressed).items():
        if isinstance(item, Mapping) and item.get("format") == "alias":
            if item.get("of") not in out:
                raise entry_error(name, f"is an alias of {item.get('of')!r}, which is not an earlier tensor")
            out[name] = out[item["of"]]
        else:
            out[name] = decode_entry(item, name)
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
    """Read a file written by :func:`save_sparse` or :func:`~pat_callbacks.export.quantized.save_quantized` (with
    ``torch.load(weights_only=True)``) as a dense state dict (quantized tensors: ``q · s``).

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
