"""Export pruned models: permanent zeros, compressed sparse checkpoints, CSR (CPU) and 2:4 (GPU) inference.

- :mod:`~pat_callbacks.export.checkpoint`: :func:`save_sparse` / :func:`load_sparse` (exact bitmask or CSR
  encodings, ``torch.load(weights_only=True)``);
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
    FORMAT_VERSION,
    SizeReport,
    compress_state_dict,
    decompress_state_dict,
    load_sparse,
    save_sparse,
)
from pat_callbacks.export.cli import main
from pat_callbacks.export.semi_structured import SemiStructuredReport, semi_structured_unavailable, to_semi_structured
from pat_callbacks.export.sparse import FUSED_READERS, SparseLinear, make_permanent, to_sparse_inference

__all__ = [
    "FORMAT_VERSION",
    "FUSED_READERS",
    "SemiStructuredReport",
    "SizeReport",
    "SparseLinear",
    "compress_state_dict",
    "decompress_state_dict",
    "load_sparse",
    "main",
    "make_permanent",
    "save_sparse",
    "semi_structured_unavailable",
    "to_semi_structured",
    "to_sparse_inference",
]
