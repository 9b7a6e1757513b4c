"""Export pruned models: permanent zeros, compressed (sparse, optionally quantized) checkpoints, CSR (CPU) and 2:4
(GPU) inference.

- :mod:`~pat_callbacks.export.checkpoint`: the one checkpoint format (a header, one entry per tensor, tied weights
  once, every field checked on load, ``torch.load(weights_only=True)``): :func:`save_sparse` / :func:`load_sparse`;
- :mod:`~pat_callbacks.export.codec`: one entry: dense, bitmask or CSR, optionally quantized (``"int4:g32"``);
- :mod:`~pat_callbacks.export.quantized`: :func:`save_quantized` / :func:`load_quantized` (weight matrices as int8 /
  int4 codes and bf16 scales, in the same format);
- :mod:`~pat_callbacks.export.sparse`: :func:`make_permanent`, :func:`to_sparse_inference` (CSR ``SparseLinear``);
- :mod:`~pat_callbacks.export.semi_structured`: :func:`to_semi_structured` (2:4 kernels on CUDA where faster);
- :mod:`~pat_callbacks.export.cli`: the ``pat-export`` command.

Example:
    >>> import torch
    >>> from pat_callbacks.export import compress_state_dict, decompress_state_dict
    >>> w = torch.zeros(8, 8); w[0, 0] = 1.0
    >>> torch.equal(decompress_state_dict(compress_state_dict({"w": w}))["w"], w)
    True
"""

from pat_callbacks.export.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SizeReport,
    compress_state_dict,
    decompress_state_dict,
    is_checkpoint,
    load_sparse,
    read_checkpoint,
    save_sparse,
)
from pat_callbacks.export.cli import find_state_dict, main
from pat_callbacks.export.quantized import (
    dequantize_state_dict,
    load_quantized,
    quantize_state_dict,
    save_quantized,
    state_bytes,
)
from pat_callbacks.export.semi_structured import SemiStructuredReport, semi_structured_unavailable, to_semi_structured
from pat_callbacks.export.sparse import FUSED_READERS, SparseLinear, make_permanent, to_sparse_inference

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FUSED_READERS",
    "SemiStructuredReport",
    "SizeReport",
    "SparseLinear",
    "compress_state_dict",
    "decompress_state_dict",
    "dequantize_state_dict",
    "find_state_dict",
    "is_checkpoint",
    "load_quantized",
    "load_sparse",
    "main",
    "make_permanent",
    "quantize_state_dict",
    "read_checkpoint",
    "save_quantized",
    "save_sparse",
    "semi_structured_unavailable",
    "state_bytes",
    "to_semi_structured",
    "to_sparse_inference",
]
